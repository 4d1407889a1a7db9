"""The CUDA kernels' logic, executed on the CPU through tests/cuda_shim, and GPU registration.

Select with `pytest -k "cuda or gpu"`. Tests that need a GPU are skipped where none is visible.
"""

import ctypes
import json
import os

import cuda_shim_library
import numpy as np
import pytest
import tensorflow as tf
import test_gated_layer_op
from conftest import away_from_boundary
from cuda_shim_library import FLOAT_P, pointer
from test_gated_layer_op import MARGIN, SHAPES, case, expected
from tensorflow.python.framework import kernels

from lrc_keras import ops


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    shim = cuda_shim_library.build("run_kernels.cc", tmp_path_factory.mktemp("cuda_shim"))
    shim.run_gated_dense.restype = ctypes.c_float
    shim.run_gated_dense.argtypes = [ctypes.c_int64] * 3 + [FLOAT_P] * 4 + [ctypes.c_float, FLOAT_P] + [ctypes.c_uint] * 2 + [ctypes.c_int]
    shim.run_masked_relu.restype = ctypes.c_float
    shim.run_masked_relu.argtypes = [ctypes.c_int64] * 2 + [FLOAT_P] * 3 + [ctypes.c_float, FLOAT_P] + [ctypes.c_uint] * 2
    shim.run_gated_layer.restype = None
    shim.run_gated_layer.argtypes = [ctypes.c_int64] * 6 + [FLOAT_P] * 4 + [ctypes.c_float] + [FLOAT_P] * 5
    shim.run_multiply.restype = ctypes.c_int64
    shim.run_multiply.argtypes = [ctypes.c_int64] * 3 + [FLOAT_P] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_uint]
    shim.multiply_chunks.restype = ctypes.c_int64
    shim.multiply_chunks.argtypes = [ctypes.c_int64] * 3
    return shim


def inputs(rng, batch, input_dim, units):
    x = rng.standard_normal((batch, input_dim)).astype(np.float32)
    kernel = (rng.standard_normal((units, input_dim)) / np.sqrt(input_dim)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(units)).astype(np.float32)
    product = rng.standard_normal((batch, units)).astype(np.float32)
    return x, kernel, bias, product


def expected_output(z, bias, product, margin):
    selected = ~(product.astype(np.float64) + bias <= -margin)
    return np.where(selected, np.maximum(z.astype(np.float64) + bias, 0.0), 0.0), selected


def check_gated_dense(shim, rng, batch, input_dim, units, margin, layout=(0, 0, 0)):
    """Runs the gated kernel with `layout` (grid, grid_y, rows_per_tile; 0s: the op's own)."""
    x, kernel, bias, product = inputs(rng, batch, input_dim, units)
    y = np.full((batch, units), np.nan, np.float32)  # every element must be written
    fraction = shim.run_gated_dense(batch, input_dim, units, pointer(x), pointer(kernel), pointer(bias),
                                    pointer(product), margin, pointer(y), *layout)
    expected, selected = expected_output(x.astype(np.float64) @ kernel.T.astype(np.float64), bias, product, margin)
    keep = away_from_boundary(product.astype(np.float64) + bias, margin)
    np.testing.assert_allclose(y[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert np.all(y[~selected & keep] == 0.0)
    assert fraction == pytest.approx(selected.mean() if batch else 0.0, abs=np.mean(~keep) + 1e-6 if batch else 0)


@pytest.mark.parametrize("batch", [0, 1, 2, 33])
@pytest.mark.parametrize("input_dim, units", [(1, 7), (37, 1), (131, 70), (64, 9)])
@pytest.mark.parametrize("margin", [-0.5, 0.0, 0.7])
def test_cuda_gated_dense_kernel_matches_numpy(shim, rng, batch, input_dim, units, margin):
    check_gated_dense(shim, rng, batch, input_dim, units, margin)


# Row tiles of the shipped heights (4 to 32) with batches that end inside a tile, one row a
# tile, and fewer blocks along y than tiles (the stride over tiles); margin -0.5 selects ~70%,
# so passes of 4 selected rows end part-filled.
@pytest.mark.parametrize(
    "batch, units, grid, grid_y, rows_per_tile",
    [(33, 9, 2, 2, 32), (70, 16, 2, 3, 32), (37, 9, 2, 3, 4), (19, 8, 1, 4, 8), (5, 9, 2, 2, 1), (45, 3, 1, 1, 16)],
)
def test_cuda_gated_dense_row_tiles_match_numpy(shim, rng, batch, units, grid, grid_y, rows_per_tile):
    check_gated_dense(shim, rng, batch, 45, units, -0.5, (grid, grid_y, rows_per_tile))


# grid 0: the op's own launch geometry.
@pytest.mark.parametrize("batch, units, grid, block", [(3, 50, 2, 64), (1, 5, 1, 32), (3, 50, 0, 0), (40, 33, 0, 0), (0, 4, 0, 0)])
def test_cuda_masked_relu_kernel_matches_numpy(shim, rng, batch, units, grid, block):
    _, _, bias, product = inputs(rng, batch, 1, units)
    z = rng.standard_normal((batch, units)).astype(np.float32)
    if batch:
        z[0, 0], product[0, 1] = np.nan, np.nan  # NaN z where selected stays NaN; NaN estimate selects
    y = np.full((batch, units), -7.0, np.float32)
    fraction = shim.run_masked_relu(batch, units, pointer(z), pointer(bias), pointer(product), 0.1, pointer(y), grid, block)
    expected, selected = expected_output(z, bias, product, 0.1)
    if batch:
        expected[0, 0] = np.nan if selected[0, 0] else 0.0
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    assert fraction == pytest.approx(selected.mean() if batch else 0.0)


def test_cuda_gated_dense_kernel_propagates_nan(shim, rng):
    x, kernel, bias, product = inputs(rng, 2, 40, 9)
    x[1, 3] = np.nan
    product[1, :] = np.nan  # a NaN input makes its estimates NaN, which select every unit
    y = np.zeros((2, 9), np.float32)
    shim.run_gated_dense(2, 40, 9, pointer(x), pointer(kernel), pointer(bias), pointer(product), 0.0, pointer(y), 0, 0, 0)
    assert np.all(np.isnan(y[1])) and not np.any(np.isnan(y[0]))


def run_gated_layer(shim, x, factors, kernel, bias, z, rank, sample_rows):
    """LrcGatedLayer's CUDA launches on the CPU: y, skipped, gate counts, active fraction, each
    output first NaN, so that each element must be written."""
    (batch, input_dim), units, dense_rows = x.shape, kernel.shape[0], z.shape[0]
    rows = min(sample_rows, dense_rows)
    y, skipped = np.full((batch, units), np.nan, np.float32), np.full((rows, units), np.nan, np.float32)
    counts, fraction = np.full(4, np.nan, np.float32), np.full(1, np.nan, np.float32)
    arrays = [np.ascontiguousarray(a, np.float32) for a in (x, factors, kernel, bias, z)]
    shim.run_gated_layer(batch, input_dim, units, rank, dense_rows, rows, *map(pointer, arrays[:4]), MARGIN,
                         pointer(arrays[4]), pointer(y), pointer(skipped), pointer(counts), pointer(fraction))
    return y, skipped, counts, fraction[0]


# Batches 0, 1, 33; input_dim 1; units 1; ranks 1 and full (rank = input_dim); rows computed
# densely none, some and all; sampled rows none, 1, all and more than the dense ones; an
# input_dim of 300 splits x·U into 19 chunks.
LAYER_SHAPES = [  # batch, input_dim, units, rank, dense_rows, sample_rows
    (0, 5, 4, 2, 0, 0), (1, 37, 20, 3, 0, 0), (1, 37, 20, 3, 1, 1), (33, 1, 9, 1, 10, 4), (33, 40, 1, 1, 33, 40),
    (33, 70, 45, 5, 10, 1), (33, 70, 45, 5, 0, 0), (33, 20, 45, 20, 33, 32), (9, 40, 30, 40, 5, 9),
    (3, 300, 9, 4, 1, 1),
]


@pytest.mark.parametrize("batch, input_dim, units, rank, dense_rows, sample_rows", LAYER_SHAPES)
def test_cuda_gated_layer_kernels_match_numpy(shim, batch, input_dim, units, rank, dense_rows, sample_rows):
    rng = np.random.default_rng(batch * 1000 + input_dim + units + dense_rows)
    x, estimator_u, estimator_v, factors, kernel, bias, z = case(rng, batch, input_dim, units, rank, dense_rows)
    y, skipped, counts, fraction = run_gated_layer(shim, x, factors, kernel, bias, z, rank, sample_rows)
    want_y, want_skipped, want_counts, want_fraction, clear = expected(
        x, estimator_u, estimator_v, kernel, bias, sample_rows, dense_rows)
    assert np.isfinite(y).all() and np.isfinite(skipped).all()  # every element written
    np.testing.assert_allclose(y[clear], want_y[clear], rtol=1e-5, atol=1e-5)
    rows = want_skipped.shape[0]
    assert skipped.shape == (rows, units)
    np.testing.assert_allclose(skipped[clear[:rows]], want_skipped[clear[:rows]], rtol=1e-5, atol=1e-5)
    assert counts.sum() == rows * units
    if clear[:rows].all():
        np.testing.assert_array_equal(counts, want_counts)
    if clear.all():
        assert fraction == pytest.approx(want_fraction, abs=1e-6)


def test_cuda_gated_layer_kernels_pass_nan_rows_through(shim):
    rng = np.random.default_rng(1)
    x, _, _, factors, kernel, bias, _ = case(rng, 6, 20, 30, 4, 3)
    x[1] = np.nan  # a dense row (z is NaN there too) and a gated one
    x[4] = np.nan
    z = (x[:3].astype(np.float64) @ kernel.T).astype(np.float32)
    y, skipped, counts, fraction = run_gated_layer(shim, x, factors, kernel, bias, z, 4, 3)
    assert np.isnan(y[[1, 4]]).all() and np.isfinite(y[[0, 2, 3, 5]]).all()
    assert np.isfinite(skipped).all() and np.all(skipped[1] == 0)  # a NaN estimate computes the unit
    assert counts.sum() == 3 * 30 and 2 * 30 / 180 <= fraction <= 1


# The estimate's multiply with layouts of the test's: one chunk or several (the last one short),
# one block along y striding over every row tile.
@pytest.mark.parametrize("rows, depth, columns, chunks, chunk_depth, grid_y", [
    (33, 70, 5, 1, 80, 1), (33, 70, 5, 3, 32, 2), (17, 16, 20, 1, 16, 1), (40, 1, 3, 1, 16, 3), (5, 100, 33, 7, 16, 1),
])
def test_cuda_estimate_multiply_layouts_match_numpy(shim, rng, rows, depth, columns, chunks, chunk_depth, grid_y):
    a = rng.standard_normal((rows, depth)).astype(np.float32)
    b = rng.standard_normal((depth, columns)).astype(np.float32)
    c = np.full((rows, columns), np.nan, np.float32)
    assert shim.run_multiply(rows, depth, columns, pointer(a), pointer(b), pointer(c), chunks, chunk_depth, grid_y) == chunks
    np.testing.assert_allclose(c, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows, depth, columns, chunks", [
    (1, 784, 20, 49), (1, 3072, 50, 64), (256, 3072, 50, 5), (256, 20, 1000, 1), (3, 0, 4, 1), (3, 300, 9, 19),
])
def test_cuda_estimate_multiply_splits_the_depth_to_fill_the_gpu(shim, rows, depth, columns, chunks):
    """The op's own layout: x·U of a small batch in chunks of the depth, a wide (x·U)·V in one."""
    assert shim.multiply_chunks(rows, depth, columns) == chunks


def build_record():
    with open(os.path.join(os.path.dirname(ops.__file__), "_lrc_ops.json")) as f:
        return json.load(f)


def test_gpu_kernels_registered_when_built_with_cuda():
    if not build_record().get("cuda"):
        pytest.skip("this library was built without CUDA (no nvcc, LRC_CUDA=0, or a CPU-only TensorFlow)")
    for op in ("LrcGatedDense", "LrcMaskedRelu", "LrcGatedLayer"):
        devices = {kernel.device_type for kernel in kernels.get_registered_kernels_for_op(op).kernel}
        assert devices == {"CPU", "GPU"}, (op, devices)


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="no GPU visible to TensorFlow")
@pytest.mark.parametrize("path", ["gated", "gemm"])
def test_gpu_op_matches_numpy_on_device(rng, path):
    x, kernel, bias, _ = inputs(rng, 33, 131, 70)
    estimator_u = rng.standard_normal((131, 6)).astype(np.float32)
    estimator_v = (rng.standard_normal((6, 70)) / 12).astype(np.float32)
    function = ops.gated_dense_with_density if path == "gated" else ops.gemm_then_mask_with_density
    with tf.device("/GPU:0"):
        y, fraction = function(x, kernel, bias, (x @ estimator_u) @ estimator_v, 0.1)
    assert "GPU" in y.device
    product = (x.astype(np.float64) @ estimator_u) @ estimator_v
    expected, selected = expected_output(x.astype(np.float64) @ kernel.T.astype(np.float64), bias, product, 0.1)
    keep = away_from_boundary(product + bias, 0.1)
    np.testing.assert_allclose(y.numpy()[keep], expected[keep], rtol=1e-4, atol=1e-4)
    assert float(fraction) == pytest.approx(selected.mean(), abs=np.mean(~keep) + 1e-6)


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="no GPU visible to TensorFlow")
@pytest.mark.parametrize("batch, input_dim, units, rank, dense_rows, sample_rows", SHAPES)
def test_gpu_gated_layer_op_matches_numpy_on_device(batch, input_dim, units, rank, dense_rows, sample_rows):
    """LrcGatedLayer's GPU kernel, through TensorFlow (margin and rank_now in host memory)."""
    with tf.device("/GPU:0"):
        test_gated_layer_op.test_outputs_match_numpy(batch, input_dim, units, rank, dense_rows, sample_rows)
