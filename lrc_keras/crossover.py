"""The measured timing model: the density below which the gated op beats TF's GEMM + mask.

The gated op's time grows with the density ρ of computed units; the dense path's does not.
`measure(model)` times both on this machine for each gated layer's shape (d, n, r) and a few
batch sizes (gated at several densities, set exactly through the margin, since its time is not
linear in ρ: sparse selections fill its row blocks less well), and saves the density below
which gated wins in `$LRC_CACHE_DIR/cost_model.json` (default ~/.cache/lrc_keras), where later
processes find it. `lrc_keras.dispatch` compares the density a layer last recorded (in training,
or by `measure_gates` or `calibrate`) against that crossover for the batch at hand. A shape never
measured uses DEFAULT_CROSSOVERS: nothing is timed, and no file written, behind the user's back.
"""

import json
import os
import platform
import warnings

import numpy as np
import tensorflow as tf

from lrc_keras import ops
from lrc_keras.estimators import estimate
from lrc_keras.estimators import pack_factors
from lrc_keras.gating import margin_for_density
from lrc_keras.timing import median_times

MEASURED_BATCHES = (1, 16, 256)
MEASURED_DENSITIES = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0)
# The crossovers where none was measured: what `measure` gave on 2 idle CPU cores (AVX-512) for
# 784→1000 and 1000→1000 layers at rank 20, 4000→2000 at 40 and 3072→4000 at 50, the smallest of
# the four rounded down (batch 1: 1.4 to 4.2, gated wins at every density; 16 rows: 0.50 to 0.79;
# 256 rows: 0.21 to 0.29).
DEFAULT_CROSSOVERS = {1: 1.0, 16: 0.5, 256: 0.2}
_measured = {}


def cache_file():
    directory = os.environ.get("LRC_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "lrc_keras"))
    return os.path.join(directory, "cost_model.json")


def _key(input_dim, units, rank):
    # Measured where TF places ops by default: the first GPU when there is one.
    device = "gpu" if tf.config.list_logical_devices("GPU") else f"{platform.machine()}-{os.cpu_count()}cpu"
    return f"tf{tf.__version__}/{device}/{input_dim}x{units}/r{rank}"


def crossover_densities(input_dim, units, rank):
    """{batch: density below which the gated op beats the dense path} for this shape: measured
    by `measure` (in this process or an earlier one), else DEFAULT_CROSSOVERS. Times nothing."""
    key = _key(input_dim, units, rank)
    if key not in _measured:
        saved = _saved().get(key)
        _measured[key] = dict(DEFAULT_CROSSOVERS) if saved is None else {
            int(batch): density for batch, density in saved.items()}
    return _measured[key]


def measure(model):
    """Time the gated op against the GEMM + mask for the shape of every LowRankGatedDense in
    `model` (a model or one layer), on this machine, and save the crossovers for this process
    and later ones (`cache_file()`). A few seconds per shape, once; returns {layer name:
    {batch: crossover density}}. Functions traced before keep the crossovers they were traced
    with: compile the model again (or call it anew) after measuring."""
    from lrc_keras.audit import gated_layers  # audit imports the layer, which imports this module

    layers = gated_layers(model)
    saved = _saved()
    for layer in layers:
        shape = (layer.kernel.shape[1], layer.units, layer.rank)
        key = _key(*shape)
        if key not in saved:
            with tf.init_scope():  # eagerly, even when called while tracing
                saved[key] = _measure(*shape)
        _measured[key] = {int(batch): density for batch, density in saved[key].items()}
    path = cache_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(saved, f, indent=1, sort_keys=True)
    except OSError as error:
        warnings.warn(f"lrc_keras: could not save the crossovers to {path} ({error}); this process uses them",
                      RuntimeWarning, stacklevel=2)
    return {layer.name: _measured[_key(layer.kernel.shape[1], layer.units, layer.rank)] for layer in layers}


def _saved():
    try:
        with open(cache_file()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _measure(input_dim, units, rank):
    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.standard_normal((units, input_dim), np.float32) / float(np.sqrt(input_dim)))
    bias = tf.zeros([units])
    estimator_u = tf.constant(rng.standard_normal((input_dim, rank), np.float32))
    estimator_v = tf.constant(rng.standard_normal((rank, units), np.float32) / float(np.sqrt(input_dim)))
    factors, rank_now = pack_factors(estimator_u, estimator_v), tf.constant(rank)

    def layer_op(x, z, margin):
        return ops.gated_layer(x, factors, kernel, bias, margin, z, rank_now, rank, 0, "crossover")[0]

    crossovers = {}
    for batch in MEASURED_BATCHES:
        x = tf.constant(rng.standard_normal((batch, input_dim), np.float32))
        z_hat = estimate(x, estimator_u, estimator_v, bias).numpy()
        # Both paths run the layer's op as `lrc_keras.dispatch.infer` does: the "gemm" path after
        # TF's GEMM of every row, the gated one without it.
        paths = {"dense": lambda x: layer_op(x, ops.kernel_product(x, kernel), 0.0)}
        for density in MEASURED_DENSITIES:
            margin = margin_for_density(z_hat, density)
            paths[density] = (lambda margin: lambda x: layer_op(x, tf.zeros([0, units]), margin))(margin)
        # Few calls a graph: the Python call adds the same time to every path, which leaves where
        # they cross unchanged, and measure() stays quick.
        times = median_times(paths, x, min_seconds=0.0)
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
