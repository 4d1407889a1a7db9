import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import away_from_boundary, calls_that_differed, numpy_gated_dense, op_inputs, random_weights

from lrc_keras import LowRankGatedDense, ops
from lrc_keras.estimators import estimate, low_rank_product

HERE = os.path.dirname(os.path.abspath(__file__))


def test_compiled_op_is_loaded():
    # pip install . compiles the op; a silent fallback to the pure path would hide a broken build.
    assert ops.is_compiled(), "the compiled op did not load (see the RuntimeWarning at import)"
    assert os.path.isfile(ops.library_path())


COMPILED_PATHS = {
    "gated": ops.gated_dense_with_density,  # LrcGatedDense
    "gemm": ops.gemm_then_mask_with_density,  # TF's GEMM, then LrcMaskedRelu
}


def run_both(x, kernel, bias, estimator_u, estimator_v, margin, path="gated"):
    inputs = op_inputs(x, kernel, bias, estimator_u, estimator_v)
    compiled, fraction = COMPILED_PATHS[path](*inputs, margin)
    reference, _ = ops.reference_with_density(*inputs, margin)
    return compiled.numpy(), float(fraction), reference.numpy()


@pytest.mark.parametrize("path", sorted(COMPILED_PATHS))
@pytest.mark.parametrize("batch", [0, 1, 2, 33])
@pytest.mark.parametrize(
    "input_dim, units, rank", [(1, 7, 1), (37, 1, 1), (19, 23, 5), (40, 24, 24), (131, 70, 9)]
)
@pytest.mark.parametrize("margin", [-0.5, 0.0, 0.4])
def test_op_matches_numpy_and_reference(rng, path, batch, input_dim, units, rank, margin):
    rank = min(rank, input_dim, units)
    weights = random_weights(rng, input_dim, units, rank)
    x = rng.standard_normal((batch, input_dim)).astype(np.float32)
    compiled, fraction, reference = run_both(x, *weights, margin, path)
    expected, mask, z_hat, _ = numpy_gated_dense(x, *weights, margin)
    assert compiled.shape == (batch, units)
    keep = away_from_boundary(z_hat, margin)
    np.testing.assert_allclose(compiled[keep], expected[keep], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(compiled[keep], reference[keep], rtol=1e-5, atol=1e-5)
    assert np.all(compiled[~mask & keep] == 0.0)
    if batch:
        # Boundary entries may flip with rounding; the fraction is within their count.
        assert abs(fraction - mask.mean()) <= np.mean(~keep) + 1e-6
    else:
        assert fraction == 0.0


@pytest.mark.parametrize("path", sorted(COMPILED_PATHS))
@pytest.mark.parametrize("margin, expected_fraction", [(-np.inf, 0.0), (np.inf, 1.0)])
def test_all_or_no_units_masked(rng, path, margin, expected_fraction):
    weights = random_weights(rng, 50, 60, 4)
    x = rng.standard_normal((9, 50)).astype(np.float32)
    compiled, fraction, _ = run_both(x, *weights, margin, path)
    assert fraction == expected_fraction
    dense = np.maximum(x.astype(np.float64) @ weights[0].T.astype(np.float64) + weights[1], 0)
    np.testing.assert_allclose(compiled, dense * expected_fraction, rtol=1e-5, atol=1e-5)


def assert_matches_numpy(y, x, weights, margin):
    """y against the float64 reference, away from the gate's boundary."""
    expected, _, z_hat, _ = numpy_gated_dense(x, *weights, margin)
    keep = away_from_boundary(z_hat, margin)
    np.testing.assert_allclose(y[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_layer_inference_uses_op_for_3d_inputs(rng):
    layer = LowRankGatedDense(30, rank=4)
    layer.inference_path = "gated"
    x = rng.standard_normal((2, 3, 20)).astype(np.float32)
    y = layer(x).numpy()
    weights = (layer.kernel.numpy(), layer.bias.numpy(), layer.estimator_u.numpy(), layer.estimator_v.numpy())
    assert_matches_numpy(y.reshape(6, 30), x.reshape(6, 20), weights, 0.0)
    # The pure-TF path gives the same numbers: only the graph tells that the compiled op ran.
    traced = tf.function(lambda x: layer(x)).get_concrete_function(tf.TensorSpec(x.shape, tf.float32))
    assert "LrcGatedLayer" in {op.type for op in traced.graph.get_operations()}
    assert_matches_numpy(traced(tf.constant(x)).numpy().reshape(6, 30), x.reshape(6, 20), weights, 0.0)


def compiled_op(x, kernel, bias, product, margin):
    return ops._library.lrc_gated_dense(x, kernel, bias, product, margin)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((4, 5), (6, 5), (6,), (4, 6), ()), None),
        (((4, 5, 1), (6, 5), (6,), (4, 6), ()), "must be rank 2|expects x"),
        (((4, 5), (6, 7), (6,), (4, 6), ()), r"5 and 7|x \[4,5\], kernel \[6,7\]"),
        (((4, 5), (6, 5), (3,), (4, 6), ()), r"6 and 3|bias \[3\]"),
        (((4, 5), (6, 5), (6,), (4, 2), ()), r"6 and 2|product \[4,2\]"),
        (((4, 5), (6, 5), (6,), (3, 6), ()), r"4 and 3|product \[3,6\]"),
        (((4, 5), (6, 5), (6,), (4, 6), (1,)), "must be rank 0|scalar margin"),
    ],
)
def test_op_rejects_bad_shapes(shapes, message):
    arrays = [np.zeros(shape, np.float32) for shape in shapes]
    if message is None:
        assert compiled_op(*arrays)[0].shape == (4, 6)
        return
    # Eagerly the shape function speaks first; in a graph with unknown shapes, the kernel does.
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        compiled_op(*arrays)
    unknown = tf.function(
        compiled_op, input_signature=[tf.TensorSpec(None, tf.float32)] * 5
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        unknown(*arrays)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((4, 6), (6,), (4, 6), ()), None),
        (((4, 6, 1), (6,), (4, 6), ()), "must be rank 2|expects z"),
        (((4, 6), (5,), (4, 6), ()), r"6 and 5|bias \[5\]"),
        (((4, 6), (6,), (4, 7), ()), r"6 and 7|product \[4,7\]"),
        (((4, 6), (6,), (3, 6), ()), r"4 and 3|product \[3,6\]"),
        (((4, 6), (6,), (4, 6), (2,)), "must be rank 0|scalar margin"),
    ],
)
def test_masked_relu_op_rejects_bad_shapes(shapes, message):
    arrays = [np.zeros(shape, np.float32) for shape in shapes]
    if message is None:
        assert ops._library.lrc_masked_relu(*arrays)[0].shape == (4, 6)
        return
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        ops._library.lrc_masked_relu(*arrays)
    unknown = tf.function(
        ops._library.lrc_masked_relu, input_signature=[tf.TensorSpec(None, tf.float32)] * 4
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        unknown(*arrays)


def test_op_rejects_bad_dtype():
    arrays = [np.zeros(s, np.float32) for s in ((4, 5), (6, 5), (6,), (4, 6), ())]
    arrays[0] = tf.constant(arrays[0], tf.float64)
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError), match="float|double"):
        compiled_op(*arrays)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_every_instruction_set_copy_matches_numpy(isa, tmp_path):
    # The kernel is chosen once per process: run the narrower copies in their own.
    script = (
        "import numpy as np, sys\n"
        "sys.path.insert(0, %r)\n"
        "from conftest import numpy_gated_dense, op_inputs, random_weights, away_from_boundary\n"
        "from lrc_keras import ops\n"
        "rng = np.random.default_rng(5)\n"
        "for batch, d, n in [(1, 37, 20), (9, 64, 33), (33, 131, 70)]:\n"
        "    weights = random_weights(rng, d, n, 3)\n"
        "    x = rng.standard_normal((batch, d)).astype(np.float32)\n"
        "    expected, mask, z_hat, _ = numpy_gated_dense(x, *weights, 0.1)\n"
        "    y = ops.gated_dense(*op_inputs(x, *weights), 0.1).numpy()\n"
        "    keep = away_from_boundary(z_hat, 0.1)\n"
        "    np.testing.assert_allclose(y[keep], expected[keep], rtol=1e-5, atol=1e-5)\n"
        "print('OK', ops.is_compiled())\n"
    ) % HERE
    # The same lrc_keras as this process imported (python -c would prefer the current directory).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(ops.__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "LRC_ISA": isa, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": package_root},
    )
    assert result.returncode == 0 and "OK True" in result.stdout, result.stderr[-2000:]


def test_deterministic_and_thread_safe(rng):
    weights = random_weights(rng, 300, 400, 10)
    inputs = [rng.standard_normal((17, 300)).astype(np.float32) for _ in range(4)]
    kernel, bias, estimator_u, estimator_v = weights
    function = tf.function(lambda x: ops.gated_dense(x, kernel, bias, low_rank_product(x, estimator_u, estimator_v), 0.0))
    expected = [function(x).numpy() for x in inputs]  # one at a time, before the threads
    assert not calls_that_differed(lambda index: [function(inputs[index]).numpy()], [[y] for y in expected],
                                   repeats=25)
    for x, y in zip(inputs, expected):  # and right, not just the same every time
        assert_matches_numpy(y, x, weights, 0.0)


def test_a_row_does_not_depend_on_its_batch(rng):
    weights = random_weights(rng, 77, 50, 6)
    x = rng.standard_normal((13, 77)).astype(np.float32)
    _, kernel, bias, product = op_inputs(x, *weights)
    whole = ops.gated_dense(x, kernel, bias, product, 0.0).numpy()
    assert_matches_numpy(whole, x, weights, 0.0)
    for i in (0, 5, 12):
        alone = ops.gated_dense(x[i : i + 1], kernel, bias, product[i : i + 1], 0.0).numpy()[0]
        np.testing.assert_array_equal(alone, whole[i])


def test_wide_inputs_span_several_tiles(rng):
    # 4099 inputs: the CPU kernel takes ~23 units x 23 rows a tile (weights and rows kept in L2),
    # so 61 units x 50 rows are 3 x 3 tiles, the last ones partial; 4099 also leaves vector tails.
    input_dim, units, batch = 4099, 61, 50
    kernel, bias, _, _ = random_weights(rng, input_dim, units, 1)
    x = rng.standard_normal((batch, input_dim)).astype(np.float32)
    product = rng.standard_normal((batch, units)).astype(np.float32)
    y, fraction = ops._library.lrc_gated_dense(x, kernel, bias, product, 0.2)
    mask = product + bias > -0.2
    expected = np.where(mask, np.maximum(x.astype(np.float64) @ kernel.T.astype(np.float64) + bias, 0), 0)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert np.all(y.numpy()[~mask] == 0.0)
    assert float(fraction) == pytest.approx(mask.mean())
    for i in (0, 22, 23, 49):  # first and last rows of tiles: the same bits as when alone
        alone = ops._library.lrc_gated_dense(x[i : i + 1], kernel, bias, product[i : i + 1], 0.2)[0]
        np.testing.assert_array_equal(alone.numpy()[0], y.numpy()[i])


@pytest.mark.parametrize("path", sorted(COMPILED_PATHS))
def test_gradient_matches_finite_differences(rng, path):
    kernel, bias, estimator_u, estimator_v = random_weights(rng, 6, 5, 2)
    x = rng.standard_normal((3, 6)).astype(np.float64)
    product = op_inputs(x, kernel, bias, estimator_u, estimator_v)[3]  # the mask is a constant

    def through_op(x, kernel, bias):
        return COMPILED_PATHS[path](
            tf.cast(x, tf.float32), tf.cast(kernel, tf.float32), tf.cast(bias, tf.float32), product, 0.0,
        )[0]

    theoretical, numerical = tf.test.compute_gradient(
        through_op, [x, kernel.astype(np.float64), bias.astype(np.float64)], delta=1e-3
    )
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, atol=2e-2)
    # And against the closed form: only computed, positive units pass gradient.
    _, mask, _, z = numpy_gated_dense(x, kernel, bias, estimator_u, estimator_v, 0.0)
    xt = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        total = tf.reduce_sum(COMPILED_PATHS[path](xt, kernel, bias, product, 0.0)[0])
    np.testing.assert_allclose(
        tape.gradient(total, xt).numpy(), np.where(mask & (z > 0), 1.0, 0.0) @ kernel, rtol=1e-5, atol=1e-6
    )


def copied_package(tmp_path, tensorflow_version):
    package = os.path.dirname(ops.__file__)
    copy = tmp_path / "lrc_keras"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "_lrc_ops.json", "w") as f:
        json.dump({"tensorflow_version": tensorflow_version}, f)
    return tmp_path


def import_warnings(root):
    """stderr of importing the lrc_keras under `root` in a fresh Python."""
    result = subprocess.run(
        [sys.executable, "-c", "import warnings; warnings.simplefilter('always'); import lrc_keras.ops"],
        cwd=root, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.mark.parametrize(
    "version, expect_warning",
    [("0.0.1", f"built against TensorFlow 0.0.1, but TensorFlow {tf.__version__} is running"), (tf.__version__, None)],
)
def test_version_mismatch_warns_once_and_falls_back(tmp_path, version, expect_warning):
    root = copied_package(tmp_path, version)
    script = (
        "import warnings; warnings.simplefilter('always')\n"
        "import numpy as np, lrc_keras, lrc_keras.ops as ops\n"
        "import importlib; importlib.import_module('lrc_keras.layers')\n"
        "y = lrc_keras.LowRankGatedDense(4, rank=2)(np.ones((2, 3), 'float32'))\n"
        "print('COMPILED', ops.is_compiled(), ops.library_path(), y.shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr
    if expect_warning:
        assert result.stderr.count("compiled ops unavailable") == 1
        assert expect_warning in result.stderr and "--no-build-isolation" in result.stderr
        assert "COMPILED False None (2, 4)" in result.stdout
    else:
        assert "compiled ops unavailable" not in result.stderr
        assert "COMPILED True" in result.stdout


def test_build_skipped_on_request_says_so(tmp_path):
    # setup.py with LRC_BUILD_OPS=0 records the skip (and drops a library an earlier build left).
    build = tmp_path / "build"
    (build / "lrc_keras").mkdir(parents=True)
    (build / "lrc_keras" / "_lrc_ops.so").write_bytes(b"stale")
    repository = os.path.dirname(HERE)
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build), "build_ops", "--build-lib", str(build)],
        cwd=repository,
        check=True, capture_output=True, env={**os.environ, "LRC_BUILD_OPS": "0"},
    )
    assert not (build / "lrc_keras" / "_lrc_ops.so").exists()
    stderr = import_warnings(build)
    assert stderr.count("compiled ops unavailable") == 1, stderr
    assert "the build was skipped on request (LRC_BUILD_OPS=0)" in stderr, stderr
    assert "To fix" not in stderr and "--no-build-isolation" not in stderr, stderr


def test_missing_library_says_how_to_rebuild(tmp_path):
    root = copied_package(tmp_path, tf.__version__)
    os.remove(root / "lrc_keras" / "_lrc_ops.so")
    stderr = import_warnings(root)
    assert "_lrc_ops.so was not built" in stderr and "--no-build-isolation" in stderr, stderr


@pytest.mark.parametrize("u_shape, v_shape", [((7, 3), (3, 5)), ((6, 2), (3, 5))])
def test_factors_of_the_wrong_shape_are_named(rng, u_shape, v_shape):
    x = rng.standard_normal((4, 6)).astype("float32")
    u, v = np.ones(u_shape, "float32"), np.ones(v_shape, "float32")
    with pytest.raises(ValueError, match=rf"estimator_u \({u_shape[0]}, {u_shape[1]}\) and estimator_v "
                                         rf"\({v_shape[0]}, {v_shape[1]}\) do not make an estimate for inputs of width 6"):
        estimate(x, u, v, np.zeros(5, "float32"))
