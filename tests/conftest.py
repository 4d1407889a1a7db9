import os
import re
import tempfile
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The dispatch cost model measured by the tests stays out of the user's cache.
os.environ["LRC_CACHE_DIR"] = tempfile.mkdtemp(prefix="lrc_keras_test_cache_")

import numpy as np
import pytest
import tensorflow as tf

# Two logical CPUs for the MirroredStrategy test; must happen before TF initialises devices.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)


def numpy_gated_dense(x, kernel, bias, estimator_u, estimator_v, margin):
    """float64 reference: (y, mask, z_hat, z) in the layer's stored layout."""
    x, kernel, bias = (np.asarray(a, np.float64) for a in (x, kernel, bias))
    z_hat = (x @ np.asarray(estimator_u, np.float64)) @ np.asarray(estimator_v, np.float64) + bias
    z = x @ kernel.T + bias
    mask = ~(z_hat <= -margin)
    return np.where(mask, np.maximum(z, 0.0), 0.0), mask, z_hat, z


def op_inputs(x, kernel, bias, estimator_u, estimator_v):
    """The compiled op's inputs (x, kernel, bias, product) for the layer's weights: the product
    (x·U)·V as `lrc_keras.estimators.low_rank_product` computes it, in float32."""
    product = (np.asarray(x, np.float32) @ np.asarray(estimator_u, np.float32)) @ np.asarray(estimator_v, np.float32)
    return x, kernel, bias, product


# The compiled ops, a longer name before its prefix, and TensorFlow's GEMM as an einsum (the
# layer's x·Wᵀ: `lrc_keras.ops.kernel_product`), which tells the "gemm" path from the "gated" one.
TRACED_OPS = re.compile(rb"LrcGatedLayer|LrcGatedDenseGrad|LrcGatedDense|LrcMaskedRelu|Einsum")


def compiled_ops_that_ran(function, x, trace_dir):
    """The compiled ops whose kernels ran in one call, and "Einsum" where TensorFlow's GEMM of the
    layer ran, from the profiler's host trace (an untaken tf.cond branch runs none)."""
    tf.profiler.experimental.start(str(trace_dir))
    function(x)
    tf.profiler.experimental.stop()
    trace = b"".join(open(os.path.join(root, name), "rb").read()
                     for root, _, names in os.walk(trace_dir) for name in names if name.endswith(".xplane.pb"))
    return {name.decode() for name in TRACED_OPS.findall(trace)}


def away_from_boundary(z_hat, margin, tolerance=1e-3):
    """Entries whose gate decision cannot flip with float32 rounding."""
    return np.abs(z_hat + margin) > tolerance


def random_weights(rng, input_dim, units, rank, scale=1.0):
    kernel = (rng.standard_normal((units, input_dim)) / np.sqrt(input_dim)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(units)).astype(np.float32)
    estimator_u = (scale * rng.standard_normal((input_dim, rank))).astype(np.float32)
    estimator_v = (rng.standard_normal((rank, units)) / np.sqrt(input_dim)).astype(np.float32)
    return kernel, bias, estimator_u, estimator_v


def calls_that_differed(call, expected, repeats):
    """The indices i whose `call(i)`, run `repeats` times in a Python thread of its own (one
    thread an index, all at once), ever returned arrays other than `expected[i]` to the bit."""
    failures = []

    def worker(index):
        for _ in range(repeats):
            if not all(np.array_equal(got, want) for got, want in zip(call(index), expected[index], strict=True)):
                failures.append(index)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(expected))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs for the whole session: a second instance
    in the same process reuses collective instance keys and its all-reduces abort."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
