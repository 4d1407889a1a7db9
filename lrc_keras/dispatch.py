"""Which inference path is faster: the gated op or TensorFlow's dense GEMM with the mask applied.

The gated op's time grows with the density ρ of computed units; the dense path's does not.
For a layer shape (d, n, r) and a few batch sizes, `crossover_densities` times both once on
this machine (gated at ρ = 0 and ρ = 1, which brackets the linear cost a + b·ρ, and the dense
path) and caches the density below which gated wins in
`$LRC_CACHE_DIR/cost_model.json` (default ~/.cache/lrc_keras). The layer compares the density
it last observed against that crossover for the batch at hand.
"""

import json
import os
import platform
import time

import numpy as np
import tensorflow as tf

from lrc_keras import ops

MEASURED_BATCHES = (1, 16, 256)
_REPEATS = 7
_CALLS_PER_REPEAT = 5
_measured = {}


def cache_file():
    directory = os.environ.get("LRC_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "lrc_keras"))
    return os.path.join(directory, "cost_model.json")


def _key(input_dim, units, rank):
    return f"tf{tf.__version__}/{platform.machine()}/{os.cpu_count()}cpu/{input_dim}x{units}/r{rank}"


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
    estimator_v = tf.constant(rng.standard_normal((units, rank), np.float32) / float(np.sqrt(input_dim)))
    densities = {}
    for batch in MEASURED_BATCHES:
        x = tf.constant(rng.standard_normal((batch, input_dim), np.float32))
        paths = {
            "none": tf.function(lambda x: ops.gated_dense(x, kernel, bias, estimator_u, estimator_v, -3e38)),
            "all": tf.function(lambda x: ops.gated_dense(x, kernel, bias, estimator_u, estimator_v, 3e38)),
            "dense": tf.function(lambda x: ops.gated_dense_reference(x, kernel, bias, estimator_u, estimator_v, 0.0)),
        }
        times = median_times(paths, x)
        slope = max(times["all"] - times["none"], 1e-9)
        densities[str(batch)] = float((times["dense"] - times["none"]) / slope)
    return densities


def median_times(functions, x, repeats=_REPEATS, calls=_CALLS_PER_REPEAT):
    """Median seconds per call of each function, timed interleaved after a warm-up."""
    for function in functions.values():
        function(x)
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(calls):
                result = function(x)
            np.asarray(result)
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: float(np.median(values)) for name, values in samples.items()}


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
