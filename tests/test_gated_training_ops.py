"""The gated training path's backward (LrcGatedDenseGrad, through lrc_keras.gated_training):
gradients of x, W and b against float64 numpy, on every instruction-set copy, and the CUDA
kernels' logic run on the CPU through tests/cuda_shim.
"""

import ctypes
import json
import os
import subprocess
import sys

import cuda_shim_library
import numpy as np
import pytest
import tensorflow as tf
from conftest import calls_that_differed
from cuda_shim_library import FLOAT_P, pointer

from lrc_keras import ops
from lrc_keras.gated_training import gated_dense_train, gated_dense_train_with_density

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not ops.is_compiled(), reason="the compiled ops are not loaded")


def layer_inputs(rng, batch, input_dim, units):
    """x, kernel [units, input_dim], bias, an estimate product independent of x, and dL/dy."""
    x = rng.standard_normal((batch, input_dim)).astype(np.float32)
    kernel = (rng.standard_normal((units, input_dim)) / np.sqrt(input_dim)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(units)).astype(np.float32)
    product = rng.standard_normal((batch, units)).astype(np.float32)
    cotangent = rng.standard_normal((batch, units)).astype(np.float32)
    return x, kernel, bias, product, cotangent


def reference_gradients(x, kernel, bias, product, margin, cotangent, tolerance=1e-4):
    """float64 gradients of Σ y·cotangent for y = relu(x·Wᵀ + b) where ẑ = product + b > -margin
    (or NaN), else 0: only the pairs computed and positive pass gradient.

    Returns (dx, dW, db, rows_near, units_near): the rows and units with a pair within
    `tolerance` of a boundary (z = 0 or ẑ = -margin), whose float32 decision may differ.
    """
    x, kernel, bias, product, cotangent = (np.asarray(a, np.float64) for a in (x, kernel, bias, product, cotangent))
    z = x @ kernel.T + bias
    z_hat = product + bias
    passes = ~(z_hat <= -margin) & (z > 0)
    g = np.where(passes, cotangent, 0.0)
    near = (np.abs(z) < tolerance) | (np.abs(z_hat + margin) < tolerance)
    return g @ kernel, g.T @ x, g.sum(axis=0), near.any(axis=1), near.any(axis=0)


def op_gradients(x, kernel, bias, product, margin, cotangent):
    """y and the gradients of Σ y·cotangent wrt x, W, b through gated_dense_train."""
    x, kernel, bias = (tf.constant(a) for a in (x, kernel, bias))
    with tf.GradientTape() as tape:
        tape.watch([x, kernel, bias])
        y = gated_dense_train(x, kernel, bias, product, margin)
        loss = tf.reduce_sum(y * cotangent)
    return (y.numpy(), *(g.numpy() for g in tape.gradient(loss, [x, kernel, bias])))


def assert_gradients_match(x, kernel, bias, product, margin, cotangent, tolerance=1e-4):
    _, dx, dw, db = op_gradients(x, kernel, bias, product, margin, cotangent)
    expected_dx, expected_dw, expected_db, rows_near, units_near = reference_gradients(
        x, kernel, bias, product, margin, cotangent
    )
    assert dx.shape == x.shape and dw.shape == kernel.shape and db.shape == bias.shape
    np.testing.assert_allclose(dx[~rows_near], expected_dx[~rows_near], rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(dw[~units_near], expected_dw[~units_near], rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(db[~units_near], expected_db[~units_near], rtol=tolerance, atol=tolerance)
    return dx, dw, db


# Shapes: empty batch, single row, input_dim 1, one unit, input_dim spanning several 64-column
# chunks with narrower last ones (131, 200), a multiple of 256 (512: W's chunks are packed),
# more rows than units.
SHAPES = [(0, 5, 3), (1, 1, 1), (1, 37, 20), (33, 1, 7), (33, 37, 1), (33, 131, 70), (5, 200, 300),
          (70, 67, 20), (9, 512, 40)]


@pytest.mark.parametrize("batch, input_dim, units", SHAPES)
@pytest.mark.parametrize("margin", [-np.inf, 0.3, np.inf])  # density 0, partial, 1
def test_gradients_match_numpy(rng, batch, input_dim, units, margin):
    inputs = layer_inputs(rng, batch, input_dim, units)
    dx, dw, db = assert_gradients_match(*inputs[:4], margin, inputs[4])
    if margin == -np.inf:  # nothing computed, nothing passes gradient: exactly zero
        assert not dx.any() and not dw.any() and not db.any()


def test_density_one_equals_the_dense_relu_gradient(rng):
    x, kernel, bias, product, cotangent = layer_inputs(rng, 17, 90, 40)
    _, dx, dw, db = op_gradients(x, kernel, bias, product, np.inf, cotangent)
    xt, wt, bt = (tf.constant(a, tf.float64) for a in (x, kernel, bias))
    with tf.GradientTape() as tape:
        tape.watch([xt, wt, bt])
        loss = tf.reduce_sum(tf.nn.relu(xt @ tf.transpose(wt) + bt) * cotangent)
    for got, expected in zip((dx, dw, db), tape.gradient(loss, [xt, wt, bt])):
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_nan_rows_pass_no_gradient_and_leave_the_rest_exact(rng):
    # A NaN input makes its row's estimates NaN, which compute every unit, so its outputs are all
    # NaN; NaN passes no gradient (as tf.nn.relu's), so the row adds nothing to dW and db and gets
    # dx = 0, while a dense GEMM's 0·NaN would make all of dW NaN.
    x, kernel, bias, _, cotangent = layer_inputs(rng, 12, 40, 25)
    estimator = (rng.standard_normal((40, 25)) / 6).astype(np.float32)
    nan_rows = np.array([2, 7])
    x[nan_rows, 3] = np.nan
    product = x @ estimator
    y, dx, dw, db = op_gradients(x, kernel, bias, product, 0.2, cotangent)
    assert np.all(np.isnan(y[nan_rows])) and not np.isnan(np.delete(y, nan_rows, 0)).any()
    assert np.all(dx[nan_rows] == 0.0)
    keep = np.setdiff1d(np.arange(12), nan_rows)
    expected_dx, expected_dw, expected_db, rows_near, units_near = reference_gradients(
        x[keep], kernel, bias, product[keep], 0.2, cotangent[keep]
    )
    np.testing.assert_allclose(dx[keep][~rows_near], expected_dx[~rows_near], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw[~units_near], expected_dw[~units_near], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db[~units_near], expected_db[~units_near], rtol=1e-4, atol=1e-4)


def test_nan_upstream_gradient_reaches_its_row_and_unit(rng):
    x, kernel, bias, product, cotangent = layer_inputs(rng, 6, 30, 8)
    y, *_ = op_gradients(x, kernel, bias, product, np.inf, cotangent)
    row, unit = np.argwhere(y > 0.01)[0]
    cotangent[row, unit] = np.nan
    _, dx, dw, db = op_gradients(x, kernel, bias, product, np.inf, cotangent)
    assert np.isnan(dx[row]).all() and np.isnan(dw[unit]).all() and np.isnan(db[unit])
    assert not np.isnan(np.delete(dx, row, 0)).any() and not np.isnan(np.delete(dw, unit, 0)).any()


@pytest.mark.parametrize("input_dim", [1024, 1030])
def test_large_kernel_written_past_the_caches(rng, input_dim):
    # A kernel of 8 MiB or more: grad_kernel is stored with streaming stores, where rows are
    # aligned (1024 floats) and around misaligned ones (1030: each row starts 24 bytes later).
    x, kernel, bias, product, cotangent = layer_inputs(rng, 3, input_dim, 2048)
    assert kernel.nbytes >= 8 << 20
    assert_gradients_match(x, kernel, bias, product, 0.5, cotangent)


def test_function_and_only_the_fraction_used(rng):
    x, kernel, bias, product, cotangent = layer_inputs(rng, 10, 20, 30)
    kernel_variable = tf.Variable(kernel)

    @tf.function
    def gradients(x):
        y, fraction = gated_dense_train_with_density(x, kernel_variable, bias, product, 0.3)
        return tf.gradients(tf.reduce_sum(y * cotangent), [x, kernel_variable]), fraction

    (dx, dw), fraction = gradients(tf.constant(x))
    expected_dx, expected_dw, _, rows_near, units_near = reference_gradients(x, kernel, bias, product, 0.3, cotangent)
    np.testing.assert_allclose(dx.numpy()[~rows_near], expected_dx[~rows_near], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw.numpy()[~units_near], expected_dw[~units_near], rtol=1e-4, atol=1e-4)
    assert float(fraction) == pytest.approx(np.mean(product + bias > -0.3), abs=1e-6)
    with tf.GradientTape() as tape:  # the fraction has no gradient: zeros, not an error
        _, fraction = gated_dense_train_with_density(x, kernel_variable, bias, product, 0.3)
    assert not tape.gradient(fraction, kernel_variable).numpy().any()


def test_deterministic_and_thread_safe(rng):
    # Wide enough (17 chunks of 64 columns, ~20 000 pairs) for each call to split its chunks
    # over the worker threads, while three Python threads call the op at once.
    inputs = [layer_inputs(rng, 64, 1030, 512) for _ in range(3)]
    expected = [op_gradients(*i[:4], 0.3, i[4])[1:] for i in inputs]
    assert not calls_that_differed(lambda index: op_gradients(*inputs[index][:4], 0.3, inputs[index][4])[1:],
                                   expected, repeats=10)
    for i in inputs:  # and right, not only the same every time
        assert_gradients_match(*i[:4], 0.3, i[4])


def test_float64_is_refused_with_the_input_named(rng):
    x, kernel, bias, product, _ = layer_inputs(rng, 3, 4, 5)
    with pytest.raises(TypeError, match="bias must be float32.*float64"):
        gated_dense_train(x, kernel, bias.astype(np.float64), product, 0.0)


def test_grad_op_rejects_mismatched_shapes():
    grad_y, y, sample, x, kernel = (np.zeros(s, np.float32) for s in ((4, 6), (4, 6), (1, 6), (4, 5), (7, 5)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"LrcGatedDenseGrad expects .*kernel \[7,5\]"):
        tf.function(ops._library.lrc_gated_dense_grad, input_signature=[tf.TensorSpec(None, tf.float32)] * 6)(
            grad_y, y, sample, sample, x, kernel
        )
    grad_y, y, sample, x, kernel = (np.zeros(s, np.float32) for s in ((4, 6), (4, 6), (5, 6), (4, 5), (6, 5)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"sample_rows <= batch.*skipped \[5,6\]"):
        tf.function(ops._library.lrc_gated_dense_grad, input_signature=[tf.TensorSpec(None, tf.float32)] * 6)(
            grad_y, y, sample, sample, x, kernel
        )


ISA_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, %r)
from test_gated_training_ops import SHAPES, assert_gradients_match, layer_inputs
from lrc_keras import ops
rng = np.random.default_rng(5)
for batch, input_dim, units in SHAPES + [(20, 1030, 2048)]:
    inputs = layer_inputs(rng, batch, input_dim, units)
    assert_gradients_match(*inputs[:4], 0.3, inputs[4])
print('OK', ops.is_compiled())
"""


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_every_instruction_set_copy_matches_numpy(isa, tmp_path):
    # The kernels are chosen once per process: run the narrower copies in their own.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(ops.__file__)))
    result = subprocess.run(
        [sys.executable, "-c", ISA_SCRIPT % HERE], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "LRC_ISA": isa, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": package_root},
    )
    assert result.returncode == 0 and "OK True" in result.stdout, result.stderr[-2000:]


@pytest.fixture(scope="module")
def grad_shim(tmp_path_factory):
    shim = cuda_shim_library.build("run_grad_kernels.cc", tmp_path_factory.mktemp("cuda_shim"))
    shim.run_gated_dense_grad.restype = None
    shim.run_gated_dense_grad.argtypes = [ctypes.c_int64] * 3 + [FLOAT_P] * 7
    return shim


def shim_gradients(shim, grad_y, y, x, kernel):
    """The CUDA kernels' dx, dW, db, every element first set to NaN so that each must be written."""
    batch, input_dim = x.shape
    outputs = [np.full(shape, np.nan, np.float32) for shape in (x.shape, kernel.shape, kernel.shape[:1])]
    arrays = [np.ascontiguousarray(a, np.float32) for a in (grad_y, y, x, kernel)] + outputs
    shim.run_gated_dense_grad(batch, input_dim, kernel.shape[0], *(pointer(a) for a in arrays))
    return outputs


def forward_output(x, kernel, bias, product, margin):
    """y in float64, then float32: its positive entries are exactly the reference's pairs."""
    z = x.astype(np.float64) @ kernel.T.astype(np.float64) + bias
    computed = ~(product.astype(np.float64) + bias <= -margin)
    return np.where(computed, np.maximum(z, 0.0), 0.0).astype(np.float32)


# Tiles of 128 columns, blocks of 8 owners: one and several of each, with partial last ones.
@pytest.mark.parametrize("batch, input_dim, units", [(0, 5, 3), (1, 1, 1), (33, 37, 1), (9, 131, 70),
                                                     (40, 1, 33), (3, 300, 9), (2, 0, 4)])
@pytest.mark.parametrize("margin", [-np.inf, 0.3, np.inf])
def test_cuda_backward_kernels_match_numpy(grad_shim, rng, batch, input_dim, units, margin):
    x, kernel, bias, product, cotangent = layer_inputs(rng, batch, input_dim, units)
    y = forward_output(x, kernel, bias, product, margin)
    dx, dw, db = shim_gradients(grad_shim, cotangent, y, x, kernel)
    expected_dx, expected_dw, expected_db, _, _ = reference_gradients(x, kernel, bias, product, margin, cotangent)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, expected_dw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, expected_db, rtol=1e-4, atol=1e-4)


def test_cuda_backward_kernels_pass_no_gradient_through_nan(grad_shim, rng):
    x, kernel, bias, product, cotangent = layer_inputs(rng, 5, 20, 12)
    y = forward_output(x, kernel, bias, product, np.inf)
    y[1] = np.nan  # the outputs of a NaN input row
    x[1] = np.nan
    dx, dw, db = shim_gradients(grad_shim, cotangent, y, x, kernel)
    keep = [0, 2, 3, 4]
    expected_dx, expected_dw, expected_db, _, _ = reference_gradients(
        x[keep], kernel, bias, product[keep], np.inf, cotangent[keep]
    )
    assert np.all(dx[1] == 0.0)
    np.testing.assert_allclose(dx[keep], expected_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, expected_dw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, expected_db, rtol=1e-4, atol=1e-4)


def test_gpu_backward_kernel_registered_when_built_with_cuda():
    from tensorflow.python.framework import kernels

    with open(os.path.join(os.path.dirname(ops.__file__), "_lrc_ops.json")) as f:
        if not json.load(f).get("cuda"):
            pytest.skip("this library was built without CUDA (no nvcc, LRC_CUDA=0, or a CPU-only TensorFlow)")
    devices = {kernel.device_type for kernel in kernels.get_registered_kernels_for_op("LrcGatedDenseGrad").kernel}
    assert devices == {"CPU", "GPU"}


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="no GPU visible to TensorFlow")
def test_gpu_gradients_match_numpy_on_device(rng):
    inputs = layer_inputs(rng, 33, 131, 70)
    with tf.device("/GPU:0"):
        assert_gradients_match(*inputs[:4], 0.3, inputs[4])


@pytest.mark.parametrize("batch, sample_rows", [(9, 0), (9, 4), (9, 9), (1, 1), (33, 32)])
def test_grad_op_passes_the_sampled_rows_skipped_pairs(batch, sample_rows):
    """Pairs of y's positive entries take grad_y; in the first rows, skipped's positive entries
    (where y is not positive) take grad_skipped: one backward for both, against float64 numpy."""
    rng = np.random.default_rng(batch + sample_rows)
    units, input_dim = 70, 13
    x = rng.standard_normal((batch, input_dim)).astype(np.float32)
    kernel = rng.standard_normal((units, input_dim)).astype(np.float32)
    y = np.where(rng.random((batch, units)) < 0.3, rng.random((batch, units)) + 0.1, 0.0).astype(np.float32)
    skipped = np.where((y[:sample_rows] == 0) & (rng.random((sample_rows, units)) < 0.3), 0.5, 0.0).astype(np.float32)
    grad_y = rng.standard_normal((batch, units)).astype(np.float32)
    grad_skipped = rng.standard_normal((sample_rows, units)).astype(np.float32)
    grad_z = np.where(y > 0, grad_y, 0.0).astype(np.float64)
    grad_z[:sample_rows] += np.where(skipped > 0, grad_skipped, 0.0)
    got = ops._library.lrc_gated_dense_grad(grad_y, y, grad_skipped, skipped, x, kernel)
    for value, want in zip(got, (grad_z @ kernel, grad_z.T @ x, grad_z.sum(axis=0))):
        np.testing.assert_allclose(value.numpy(), want, rtol=1e-5, atol=1e-5)
