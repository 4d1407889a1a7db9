"""Conditional computation for models that already exist: convert Dense+ReLU layers, calibrate them."""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from lrc_keras import ops
from lrc_keras.audit import capture_inputs
from lrc_keras.audit import gated_layers
from lrc_keras.dispatch import margin_for_density
from lrc_keras.estimators import low_rank_product
from lrc_keras.estimators import truncated_svd_factors
from lrc_keras.layers import LowRankGatedDense
from lrc_keras.cost import cost_model_speedup

DEFAULT_CANDIDATE_RANKS = (5, 10, 20, 50, 100, 200)


def convert(model, rank, layers=None, **layer_kwargs):
    """A copy of `model` whose Dense+ReLU layers are LowRankGatedDense (`from_dense`).

    Args:
        model: A Sequential or functional Keras model (nested ones included).
        rank: An int; a float in (0, 1], the fraction of each layer's
            min(input_dim, units) (rounded up); or a dict {layer name: int or
            fraction}, in which case only the named layers are converted.
        layers: Optional names of the layers to convert (each must be a Dense
            with ReLU activation); default: every Dense with ReLU activation.
        **layer_kwargs: Passed to `LowRankGatedDense` (e.g. `margin`, `estimator`).

    Returns:
        A new model; every other layer is a copy with the original's weights.
        At full rank its predictions equal the original's.
    """
    _check_rewirable(model, "convert")
    candidates = {
        layer.name: layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.Dense) and layer.activation is keras.activations.relu
    }
    wanted = _layers_to_convert(model, candidates, rank, layers)
    return _clone_replacing(
        model,
        lambda layer: LowRankGatedDense.from_dense(layer, _rank_for(layer, rank), **layer_kwargs)
        if layer.name in wanted
        else None,
    )


def to_dense(model):
    """A copy of `model` whose LowRankGatedDense layers are their Dense twins (`to_dense`).

    The inverse of `convert`: the twin computes every unit, so it is the reference for the
    gated model's accuracy and speed. Every other layer is a copy with the original's weights.
    """
    _check_rewirable(model, "to_dense")
    return _clone_replacing(
        model, lambda layer: layer.to_dense() if isinstance(layer, LowRankGatedDense) else None
    )


def _check_rewirable(model, caller):
    if not isinstance(model, keras.Sequential) and not _is_functional(model):
        raise ValueError(
            f"{caller} needs a Sequential or functional model; {model.name!r} is a subclassed "
            f"{type(model).__name__}, whose layers cannot be rewired"
        )


def _clone_replacing(model, replacement):
    """A copy of `model` where `replacement(layer)` stands for each layer it returns one for.

    Every other layer is re-created from its config and given the original's weights, so the
    copy shares no variable with `model`.
    """
    copied = []

    def clone(layer):
        replaced = replacement(layer)
        if replaced is not None:
            return replaced
        duplicate = layer.__class__.from_config(layer.get_config())
        copied.append((layer, duplicate))
        return duplicate

    cloned = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for original, duplicate in copied:
        duplicate.set_weights(original.get_weights())
    return cloned


def _is_functional(model):
    return isinstance(model, keras.Model) and hasattr(model, "_operations") and bool(model.inputs)


def _layers_to_convert(model, candidates, rank, layers):
    if isinstance(rank, dict):
        names = list(rank)
    elif layers is not None:
        names = list(layers)
    else:
        names = list(candidates)
    for name in names:
        if name not in candidates:
            raise ValueError(
                f"layer {name!r} is not a Dense layer with ReLU activation in {model.name!r}; "
                f"those are {sorted(candidates)}"
            )
    if not isinstance(rank, dict):
        _check_rank(rank, "rank")
    else:
        for name, value in rank.items():
            _check_rank(value, f"rank[{name!r}]")
    return set(names)


def _check_rank(rank, label):
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise ValueError(f"{label} must be an int or a fraction in (0, 1], got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if rank < 1:
            raise ValueError(f"{label} must be a positive int or a fraction in (0, 1], got {rank!r}")
    elif not 0 < rank <= 1:
        raise ValueError(f"{label} as a fraction must be in (0, 1], got {rank!r}")


def _rank_for(layer, rank):
    value = rank[layer.name] if isinstance(rank, dict) else rank
    full = min(layer.kernel.shape)
    if isinstance(value, numbers.Integral):
        return min(int(value), full)
    return max(1, math.ceil(value * full))


class CalibrationReport:
    """Per gated layer: the rank and margin chosen, and what they give on the calibration data.

    `rows` is a list of dicts with keys layer, rank, margin, recall,
    predicted_density, cost_model_speedup, target_reached; `str(report)`
    is a table.
    """

    def __init__(self, target_recall, rows):
        self.target_recall = target_recall
        self.rows = rows

    def __str__(self):
        lines = [
            f"calibrated for recall >= {self.target_recall}",
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


def calibrate(model, x, target_recall=0.99, ranks=None):
    """Choose each gated layer's rank and margin for `target_recall` at the lowest cost.

    Layer by layer (each sees the inputs the already-calibrated layers before it
    produce), every candidate rank gets the smallest margin whose recall of truly
    active units on `x` reaches `target_recall`; the candidate with the lowest
    cost-model cost r·(d + n) + ρ·d·n wins, if that is below the dense cost d·n.
    Otherwise the target is reported as not reached for that layer, which keeps
    the candidate that comes closest (the highest recall at dense cost).

    Args:
        model: A model with LowRankGatedDense layers (e.g. from `convert`).
        x: Calibration inputs (not empty).
        target_recall: In (0, 1].
        ranks: Candidate ranks (default 5, 10, 20, 50, 100, 200 and the
            layer's own), those above min(input_dim, units) dropped.

    Returns:
        A CalibrationReport. The layers are changed in place (`set_rank`,
        `margin`): compile the model again before training it.
    """
    if isinstance(target_recall, bool) or not isinstance(target_recall, numbers.Real) or not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall!r}")
    x = np.asarray(x)
    if x.size == 0 or x.ndim < 2:
        raise ValueError(f"calibrate needs calibration inputs; got an empty or 1-D x of shape {x.shape}")
    if ranks is not None and (not ranks or any(isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1 for r in ranks)):
        raise ValueError(f"ranks must be a non-empty list of positive ints, got {ranks!r}")
    layers = gated_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no LowRankGatedDense layer to calibrate")
    rows = []
    for layer in layers:
        with capture_inputs([layer]) as captured:
            model(x, training=False)
        inputs = tf.concat(captured[layer.name], axis=0)
        row = _choose(layer, inputs, target_recall, ranks)
        if row["rank"] != layer.rank:
            layer.set_rank(row["rank"])
        layer.margin = row["margin"]
        rows.append(row)
    model.predict_function = model.test_function = model.train_function = None
    return CalibrationReport(target_recall, rows)


def _choose(layer, inputs, target_recall, ranks):
    input_dim, units = layer.kernel.shape[1], layer.units
    full = min(input_dim, units)
    candidates = sorted({r for r in (ranks or DEFAULT_CANDIDATE_RANKS + (layer.rank,)) if r <= full})
    if not candidates:
        raise ValueError(f"{layer.name}: no candidate rank in {ranks} is <= min(input_dim, units) = {full}")
    estimator_u, estimator_v, _ = truncated_svd_factors(layer.kernel, max(candidates))
    bias = np.zeros(units, np.float32) if layer.bias is None else layer.bias.numpy()
    positive = ops.dense_preactivation(inputs, layer.kernel, layer.bias).numpy() > 0
    estimates = {
        rank: low_rank_product(inputs, estimator_u[:, :rank], estimator_v[:rank]).numpy() + bias
        for rank in candidates
    }

    def option(rank, margin):
        computed = ops.gate_mask(estimates[rank], margin).numpy()
        density = float(computed.mean())
        return {
            "layer": layer.name,
            "rank": rank,
            "margin": margin,
            "recall": float(np.sum(computed & positive) / positive.sum()) if positive.any() else 1.0,
            "predicted_density": density,
            "cost_model_speedup": cost_model_speedup(input_dim, units, rank, density),
        }

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


def margin_for_recall(positive_estimates, target_recall, all_estimates):
    """The largest threshold t (margin -t) that still keeps recall >= target_recall.

    Units are computed where ẑ > t: at most floor((1 - target)·P) of the P positive
    estimates may lie at or below t.
    """
    if positive_estimates.size == 0:
        return -float(np.nextafter(np.max(all_estimates), np.inf))  # nothing needs computing
    ordered = np.sort(positive_estimates.astype(np.float32))
    allowed_misses = int(math.floor((1 - target_recall) * ordered.size + 1e-9))
    threshold = np.nextafter(ordered[allowed_misses], -np.inf, dtype=np.float32)
    return -float(threshold)
