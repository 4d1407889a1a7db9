"""calibrate: choose each gated layer's margin (and rank) for a target recall or density."""

import numbers

import numpy as np

from lrc_keras import crossover
from lrc_keras import ops
from lrc_keras.audit import gated_layers
from lrc_keras.audit import inputs_of
from lrc_keras.cost import cost_model_speedup
from lrc_keras.estimators import low_rank_product
from lrc_keras.gating import gate_mask
from lrc_keras.gating import margin_for_density
from lrc_keras.gating import margin_for_recall
from lrc_keras.inputs import checked_model_inputs


class CalibrationReport:
    """Per gated layer: the rank and margin chosen, and what they give on the calibration data.

    `rows` is a list of dicts with keys layer, rank, margin, recall, predicted_density,
    cost_model_speedup, target_reached; `str(report)` is a table.
    """

    def __init__(self, target, rows):
        self.target = target
        self.rows = rows

    def __str__(self):
        lines = [
            f"calibrated for {self.target}",
            "| layer | rank | margin | recall | predicted density | cost-model speedup | target |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            verdict = "reached" if row["target_reached"] else (
                "NOT reached: no candidate gets there below dense cost; closest kept"
            )
            lines.append(
                f"| {row['layer']} | {row['rank']} | {row['margin']:.4g} | {row['recall']:.4f} "
                f"| {row['predicted_density']:.4f} | {row['cost_model_speedup']:.2f}x | {verdict} |"
            )
        return "\n".join(lines)

    __repr__ = __str__


def calibrate(model, x, target_recall=None, target_density=None, ranks=None):
    """Choose each gated layer's margin (and, given candidate `ranks`, its rank) for a target.

    Layer by layer (each sees the inputs the already-calibrated layers before it produce), on
    the estimator the layer actually uses:
    - `target_recall`: the smallest margin whose recall of truly active units on `x` reaches
      it. With several candidate ranks the cheapest under the cost model r·(d + n) + ρ·d·n
      wins, if it is below the dense cost d·n; otherwise the target is reported as not reached
      and the candidate with the highest recall at dense cost is kept.
    - `target_density`: the margin that computes that fraction of the units on `x`; with
      several candidate ranks, the one with the highest recall there wins.
    Recall protects accuracy, density sets speed: compare the model's accuracy before and
    after, since a high recall target can multiply the density for little accuracy.

    Args:
        model: A model with LowRankGatedDense layers (e.g. from `convert`).
        x: Calibration inputs (not empty, finite).
        target_recall: In (0, 1]. Default 0.99 when no target_density is given.
        target_density: In (0, 1]; exclusive with target_recall.
        ranks: Candidate ranks, or None: keep each layer's rank and its own U, V. A candidate
            other than the layer's own rank is fitted by the layer's estimator rule on the
            layer's inputs from `x`; ranks above min(input_dim, units) are dropped.

    Returns:
        A CalibrationReport. The layers are changed in place (`set_rank`, `margin`, and the
        predicted density inference_path="auto" reads), and the crossovers of their shapes are
        measured on this machine (`lrc_keras.crossover.measure`): compile the model again
        before training it.
    """
    if target_recall is not None and target_density is not None:
        raise ValueError(
            f"give target_recall or target_density, not both (got target_recall={target_recall!r}, "
            f"target_density={target_density!r})"
        )
    if target_density is None:
        target_recall = 0.99 if target_recall is None else target_recall
        _check_fraction("target_recall", target_recall)
    else:
        _check_fraction("target_density", target_density)
    x = checked_model_inputs(x, "x")
    if ranks is not None and (not ranks or any(isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1 for r in ranks)):
        raise ValueError(f"ranks must be a non-empty list of positive ints, got {ranks!r}")
    layers = gated_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no LowRankGatedDense layer to calibrate")
    rows = []
    for layer in layers:
        inputs = inputs_of(model, layer, x)
        row = _choose(layer, inputs, target_recall, target_density, ranks)
        if row["rank"] != layer.rank:
            layer.set_rank(row["rank"], sample_inputs=inputs)
        layer.margin = row["margin"]
        row["margin"] = layer.margin  # as the layer holds it: the float32 the gate compares with
        layer.observed_density.assign(row["predicted_density"])
        rows.append(row)
    crossover.measure(model)
    model.predict_function = model.test_function = model.train_function = None
    target = f"recall >= {target_recall}" if target_density is None else f"predicted density {target_density}"
    return CalibrationReport(target, rows)


def _check_fraction(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {name}={value!r}")


def _choose(layer, inputs, target_recall, target_density, ranks):
    input_dim, units = layer.kernel.shape[1], layer.units
    full = min(input_dim, units)
    candidates = sorted({r for r in (ranks or (layer.rank,)) if r <= full})
    if not candidates:
        raise ValueError(f"{layer.name}: no candidate rank in {ranks} is <= min(input_dim, units) = {full}")
    bias = 0.0 if layer.bias is None else layer.bias.numpy()
    positive = ops.dense_preactivation(inputs, layer.kernel, layer.bias).numpy() > 0

    def factors(rank):  # the layer's own U, V at its own rank
        if rank == layer.rank:
            return layer.current_factors()
        return layer.estimator.factors(layer, inputs, rank)

    estimates = {rank: low_rank_product(inputs, *factors(rank)).numpy() + bias for rank in candidates}

    def option(rank, margin):
        computed = gate_mask(estimates[rank], margin).numpy()
        density = float(computed.mean())
        return {
            "layer": layer.name,
            "rank": rank,
            "margin": margin,
            "recall": float(np.sum(computed & positive) / positive.sum()) if positive.any() else 1.0,
            "predicted_density": density,
            "cost_model_speedup": cost_model_speedup(input_dim, units, rank, density),
        }

    if target_density is not None:
        options = [option(rank, margin_for_density(estimates[rank], target_density)) for rank in candidates]
        return {**max(options, key=lambda o: (o["recall"], -o["rank"])), "target_reached": True}
    reaching = [
        option(rank, margin_for_recall(estimates[rank][positive], target_recall, estimates[rank]))
        for rank in candidates
    ]
    affordable = [o for o in reaching if o["cost_model_speedup"] > 1]
    if affordable:
        return {**max(affordable, key=lambda o: o["cost_model_speedup"]), "target_reached": True}
    # Nothing reaches the target below dense cost: the highest recall at dense cost.
    at_dense_cost = [
        option(rank, margin_for_density(estimates[rank], 1 - rank * (input_dim + units) / (input_dim * units)))
        for rank in candidates
        if rank * (input_dim + units) < input_dim * units
    ]
    if not at_dense_cost:
        raise ValueError(
            f"{layer.name}: every candidate rank costs more than the dense layer "
            f"({input_dim}x{units}); gating cannot pay off here"
        )
    return {**max(at_dense_cost, key=lambda o: o["recall"]), "target_reached": False}
