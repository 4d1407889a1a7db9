"""Measuring the gate where z is otherwise never computed: evaluate/predict, and on demand."""

import contextlib

import numpy as np
import tensorflow as tf

from lrc_keras import ops
from lrc_keras.layers import LowRankGatedDense
from lrc_keras.metrics import GATE_RATES
from lrc_keras.metrics import confusion_counts
from lrc_keras.cost import cost_model_speedup
from lrc_keras.metrics import rates_from_counts


def gated_layers(model):
    """Every LowRankGatedDense in `model` (a model, nested ones included, or one layer), in order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=True)
        if isinstance(layer, LowRankGatedDense)
    ]


def set_audit(model, enabled=True):
    """Make `evaluate`/`predict` compute z densely and update the gate metrics.

    Auditing costs the dense GEMM that the gated op avoids; switch it off again
    for fast inference. The model's compiled test and predict functions are
    dropped so that the next call traces the new path.
    """
    for layer in gated_layers(model):
        layer.audit = bool(enabled)
    model.test_function = None
    model.predict_function = None


@contextlib.contextmanager
def capture_inputs(layers):
    """Record the 2-D input each layer sees during an eager inference call."""
    for layer in layers:
        layer.captured_inputs = []
    try:
        yield {layer.name: layer.captured_inputs for layer in layers}
    finally:
        for layer in layers:
            layer.captured_inputs = None


def measure_gates(model, x):
    """Per gated layer, the gate's statistics on inputs `x` against the dense truth.

    Returns a list of dicts, one per LowRankGatedDense in model order, with the
    GATE_RATES rates, `cost_model_speedup` (at the measured predicted
    density), `estimate_error` (ẑ - z, flattened), `singular_values` of the
    kernel and `energy_captured` (the share of Σσ² in the first `rank`). Each layer records
    the predicted density (its `observed_density`), which inference_path="auto" compares with
    the crossover (`lrc_keras.crossover`).
    """
    layers = gated_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no LowRankGatedDense layer to measure")
    with capture_inputs(layers) as captured:
        model(x, training=False)
    reports = []
    for layer in layers:
        if not captured[layer.name]:
            raise ValueError(f"layer {layer.name!r} was not called when running {model.name!r} on x")
        inputs = tf.concat(captured[layer.name], axis=0)
        z_hat, mask = layer.gate(inputs)
        z = ops.dense_preactivation(inputs, layer.kernel, layer.bias)
        rates = rates_from_counts(confusion_counts(mask, z > 0)).numpy()
        report = {"layer": layer.name, **{key: float(rate) for key, rate in zip(GATE_RATES, rates)}}
        singular_values = kernel_singular_values(layer.kernel.numpy())
        energy = singular_values**2
        report.update(
            input_dim=int(inputs.shape[-1]),
            units=layer.units,
            rank=layer.rank,
            cost_model_speedup=cost_model_speedup(
                int(inputs.shape[-1]), layer.units, layer.rank, report["predicted_density"]
            ),
            estimate_error=(z_hat - z).numpy().ravel(),
            singular_values=singular_values,
            energy_captured=float(energy[: layer.rank].sum() / max(energy.sum(), 1e-30)),
        )
        reports.append(report)
        layer.observed_density.assign(report["predicted_density"])
    return reports


def kernel_singular_values(kernel):
    """A kernel's singular values, largest first: the square roots of the eigenvalues of its Gram
    matrix on the smaller side.

    The Gram matrix is formed in float32 (one GEMM) and its eigenvalues taken in float64: for a
    3072x4000 kernel this costs about a twelfth of an SVD, which GateSummaries pays at every
    epoch's end. Float32 rounding moves the singular values below ~1e-3 of the largest.
    """
    kernel = np.asarray(kernel, np.float32)
    gram = kernel.T @ kernel if kernel.shape[1] <= kernel.shape[0] else kernel @ kernel.T
    eigenvalues = np.linalg.eigvalsh(gram.astype(np.float64))[::-1]
    return np.sqrt(np.clip(eigenvalues, 0.0, None))


def inputs_of(model, layer, x):
    """The 2-D inputs `layer` sees when `model` runs on x (inference)."""
    with capture_inputs([layer]) as captured:
        model(x, training=False)
    return tf.concat(captured[layer.name], axis=0).numpy()
