"""Dispatch: the one place that decides how a gated layer's inference runs, and says why
(and, in `choose_training_path`, how its training step runs).

`choose_path` picks one of the implementations of `lrc_keras.ops` (`infer` runs it for a layer):
    "reference"  plain TensorFlow, when the compiled ops are not loaded or the dtype is not
                 float32 (warned once per reason, naming the faster choice)
    "gated"      the compiled LrcGatedDense
    "gemm"       TF's dense GEMM, then the compiled LrcMaskedRelu
    "auto"       gated or gemm inside the graph, by the density last observed against the
                 crossover density measured for this shape and batch (the cost model below)

The gated op's time grows with the density ρ of computed units; the dense path's does not.
For a layer shape (d, n, r) and a few batch sizes, `crossover_densities` times both once on
this machine (gated at several densities, set exactly through the margin, since its time is
not linear in ρ: sparse selections fill its row blocks less well) and caches the density
below which gated wins in
`$LRC_CACHE_DIR/cost_model.json` (default ~/.cache/lrc_keras). The layer compares the density
it last observed against that crossover for the batch at hand.
"""

import json
import os
import platform
import warnings

import numpy as np
import tensorflow as tf

from lrc_keras import ops
from lrc_keras.estimators import estimate
from lrc_keras.estimators import low_rank_product
from lrc_keras.gating import margin_for_density
from lrc_keras.timing import median_times

INFERENCE_PATHS = ("auto", "gated", "gemm")
_warned = set()


def choose_path(requested, dtype, input_dim, units, rank, batch):
    """`(path, crossover, reason)` for inference of a layer (see the module docstring).

    `requested` is the layer's `inference_path`; `batch` an int or a scalar tensor. `crossover`
    is the density below which "auto" runs the gated op (None for the other paths).
    """
    if requested not in INFERENCE_PATHS:
        raise ValueError(f"inference_path must be one of {INFERENCE_PATHS}, got {requested!r}")
    if not ops.is_compiled():
        return "reference", None, "the compiled ops are not loaded"
    if dtype != tf.float32:
        reason = f"the compiled ops are float32 only and the inputs are {dtype.name}"
        _warn_once(
            ("dtype", dtype.name),
            f"lrc_keras: {reason}, so LowRankGatedDense computes every unit in plain TensorFlow "
            f"(no speed-up). Run inference in float32 (inputs and dtype policy) for the compiled ops.",
        )
        return "reference", None, reason
    if requested != "auto":
        return requested, None, f"inference_path={requested!r}"
    crossover = crossover_for_batch(crossover_densities(input_dim, units, rank), batch)
    if isinstance(crossover, float) and not 0.0 < crossover < 1.0:
        path = "gated" if crossover >= 1.0 else "gemm"
        return path, None, f"the cost model measured {path} faster at every density for batch {batch}"
    return "auto", crossover, "the cost model's crossover density against the last observed density"


TRAINING_PATHS = ("auto", "dense", "gated")

# Predicted density above which a layer's training step on the compiled gated kernels costs
# about as much as on the GEMMs: measured with `python -m lrc_keras.benchmark_gated_training`
# at batch 128, the two break even near 0.52 for 784→1000 and 1000→1000, and above 0.5 for
# 3072→4000 (1.32x faster there); the gated step's time grows about linearly with the density
# (BENCHMARKS.md).
GATED_TRAINING_MAX_DENSITY = 0.5


def choose_training_path(requested, dtype):
    """"dense", "gated" or "auto" (gated while the layer's last observed density is at most
    GATED_TRAINING_MAX_DENSITY, decided in the graph at every step) for a training call.

    The gated kernels need the compiled library and float32; otherwise "dense", warned once.
    """
    if requested not in TRAINING_PATHS:
        raise ValueError(f"training_path must be one of {TRAINING_PATHS}, got {requested!r}")
    if requested == "dense" or not ops.is_compiled():  # without the library, the import warned
        return "dense"
    if dtype != tf.float32:
        _warn_once(
            ("training dtype", dtype.name),
            f"lrc_keras: the compiled gated training kernels are float32 only and the inputs are "
            f"{dtype.name}, so LowRankGatedDense trains by training_path=\"dense\" (a GEMM, then the mask).",
        )
        return "dense"
    return requested


def infer(layer, x):
    """`(y, active_fraction)` of a built LowRankGatedDense's inference on 2-D x, by the
    implementation `choose_path` picks for it: the estimate is computed once, here, and every
    implementation takes it."""
    batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
    path, crossover, _ = choose_path(layer.inference_path, x.dtype, layer.kernel.shape[1], layer.units,
                                     layer.rank, batch)
    product = low_rank_product(x, layer.estimator_u, layer.estimator_v)
    args = (x, layer.kernel, layer.bias, product, tf.cast(layer.gate_margin, x.dtype))
    if path == "reference":
        return ops.reference_with_density(*args)
    if path == "gated":
        return ops.gated_dense_with_density(*args)
    if path == "gemm":
        return ops.gemm_then_mask_with_density(*args)
    return tf.cond(
        layer.observed_density <= crossover,
        lambda: ops.gated_dense_with_density(*args),
        lambda: ops.gemm_then_mask_with_density(*args),
    )


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

MEASURED_BATCHES = (1, 16, 256)
MEASURED_DENSITIES = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0)
_measured = {}


def cache_file():
    directory = os.environ.get("LRC_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "lrc_keras"))
    return os.path.join(directory, "cost_model.json")


def _key(input_dim, units, rank):
    # Measured where TF places ops by default: the first GPU when there is one.
    device = "gpu" if tf.config.list_logical_devices("GPU") else f"{platform.machine()}-{os.cpu_count()}cpu"
    return f"tf{tf.__version__}/{device}/{input_dim}x{units}/r{rank}"


def crossover_densities(input_dim, units, rank):
    """{batch: density below which the gated op beats the dense path}, measured once per shape."""
    key = _key(input_dim, units, rank)
    if key not in _measured:
        path = cache_file()
        try:
            with open(path) as f:
                cached = json.load(f)
        except (OSError, ValueError):
            cached = {}
        if key not in cached:
            with tf.init_scope():  # measure eagerly even when called while tracing
                cached[key] = _measure(input_dim, units, rank)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump(cached, f, indent=1, sort_keys=True)
            except OSError:
                pass  # an unwritable cache only costs a re-measurement next process
        _measured[key] = {int(batch): density for batch, density in cached[key].items()}
    return _measured[key]


def _measure(input_dim, units, rank):
    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.standard_normal((units, input_dim), np.float32) / float(np.sqrt(input_dim)))
    bias = tf.zeros([units])
    estimator_u = tf.constant(rng.standard_normal((input_dim, rank), np.float32))
    estimator_v = tf.constant(rng.standard_normal((rank, units), np.float32) / float(np.sqrt(input_dim)))
    crossovers = {}
    for batch in MEASURED_BATCHES:
        x = tf.constant(rng.standard_normal((batch, input_dim), np.float32))
        z_hat = estimate(x, estimator_u, estimator_v, bias).numpy()
        # Both paths compute the estimate, as in the layer.
        paths = {
            "dense": lambda x: ops.gemm_then_mask_with_density(
                x, kernel, bias, low_rank_product(x, estimator_u, estimator_v), 0.0
            )[0]
        }
        for density in MEASURED_DENSITIES:
            margin = margin_for_density(z_hat, density)
            paths[density] = (
                lambda margin: lambda x: ops.gated_dense(
                    x, kernel, bias, low_rank_product(x, estimator_u, estimator_v), margin
                )
            )(margin)
        times = median_times(paths, x)
        crossovers[str(batch)] = crossover(
            MEASURED_DENSITIES, [times[d] for d in MEASURED_DENSITIES], times["dense"]
        )
    return crossovers


def crossover(densities, gated_times, dense_time):
    """The density where the measured gated times, linearly interpolated, first exceed dense_time.

    Past the last measured density the last segment's slope is extended (a crossover above 1
    means gated wins at every density).
    """
    points = list(zip(densities, gated_times))
    if gated_times[0] >= dense_time:
        return 0.0
    for (d0, t0), (d1, t1) in zip(points, points[1:]):
        if t1 >= dense_time:
            return float(d0 + (d1 - d0) * (dense_time - t0) / (t1 - t0))
    (d0, t0), (d1, t1) = points[-2], points[-1]
    slope = max((t1 - t0) / (d1 - d0), 1e-12)
    return float(d1 + (dense_time - t1) / slope)


def crossover_for_batch(crossovers, batch):
    """Interpolate the measured crossovers in log2(batch); a tensor when `batch` is one."""
    batches = sorted(crossovers)
    logs = [float(np.log2(b)) for b in batches]
    values = [crossovers[b] for b in batches]
    if isinstance(batch, int):
        return float(np.interp(np.log2(max(batch, 1)), logs, values))
    log_batch = tf.math.log(tf.cast(tf.maximum(batch, 1), tf.float32)) / np.log(2.0)
    result = tf.constant(values[0], tf.float32)
    for (x0, y0), (x1, y1) in zip(zip(logs, values), zip(logs[1:], values[1:])):
        segment = y0 + (y1 - y0) * (log_batch - x0) / (x1 - x0)
        result = tf.where(log_batch > x0, segment, result)
    return tf.where(log_batch > logs[-1], values[-1], result)
