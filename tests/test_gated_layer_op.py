"""LrcGatedLayer, a gated layer's whole forward in one op (custom_ops/gated_layer.h): the estimate,
the mask, y (from TensorFlow's z for its rows, by the gated kernel beyond), the sampled rows'
skipped active units and gate counts, and the traced-rank check, against float64 numpy."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from lrc_keras import ops

pytestmark = pytest.mark.skipif(not ops.is_compiled(), reason="the compiled ops are not built")
MARGIN = 0.1


def case(rng, batch, input_dim, units, rank, dense_rows):
    x = rng.standard_normal((batch, input_dim)).astype(np.float32)
    estimator_u = (rng.standard_normal((input_dim, rank)) / np.sqrt(input_dim)).astype(np.float32)
    estimator_v = rng.standard_normal((rank, units)).astype(np.float32)
    kernel = (rng.standard_normal((units, input_dim)) / np.sqrt(input_dim)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(units)).astype(np.float32)
    factors = np.concatenate([estimator_u.ravel(), estimator_v.ravel()])
    z = (x[:dense_rows].astype(np.float64) @ kernel.T.astype(np.float64)).astype(np.float32)
    return x, estimator_u, estimator_v, factors, kernel, bias, z


def expected(x, estimator_u, estimator_v, kernel, bias, sample_rows, dense_rows):
    """y, skipped, gate counts, active fraction and the pairs far enough from the gate's boundary
    that float32 rounding cannot flip them, in float64."""
    x64 = x.astype(np.float64)
    z_hat = x64 @ estimator_u.astype(np.float64) @ estimator_v.astype(np.float64) + bias
    computed = ~(z_hat <= -MARGIN)
    z = x64 @ kernel.T.astype(np.float64) + bias
    y = np.where(computed & (z > 0), z, 0.0)
    rows = min(sample_rows, dense_rows)
    skipped = np.where(~computed[:rows] & (z[:rows] > 0), z[:rows], 0.0)
    selected, positive = computed[:rows], z[:rows] > 0
    counts = [np.sum(selected & positive), np.sum(selected & ~positive), np.sum(~selected & positive),
              np.sum(~selected & ~positive)]
    fraction = computed.mean() if computed.size else 0.0
    clear = (np.abs(z_hat + MARGIN) > 1e-4) & (np.abs(z) > 1e-4)
    return y, skipped, np.array(counts, np.float64), fraction, clear


def run(x, factors, kernel, bias, z, rank, sample_rows, rank_now=None, margin=MARGIN):
    return ops.compiled_library().lrc_gated_layer(
        x, factors, kernel, bias, margin, z, rank if rank_now is None else rank_now, rank=rank,
        sample_rows=sample_rows, layer="dense_3")


SHAPES = [  # batch, input_dim, units, rank, dense_rows, sample_rows
    (0, 5, 4, 2, 0, 0), (1, 37, 20, 3, 0, 0), (1, 37, 20, 3, 1, 1), (33, 70, 45, 5, 0, 0),
    (33, 70, 45, 5, 10, 4), (33, 70, 45, 5, 33, 32), (33, 70, 45, 5, 33, 40), (130, 17, 3, 3, 7, 9),
    (130, 64, 100, 64, 130, 32), (5, 1, 1, 1, 2, 1), (9, 40, 100, 40, 9, 0), (16, 33, 1, 1, 5, 5),
]


@pytest.mark.parametrize("batch, input_dim, units, rank, dense_rows, sample_rows", SHAPES)
def test_outputs_match_numpy(batch, input_dim, units, rank, dense_rows, sample_rows):
    rng = np.random.default_rng(batch * 1000 + input_dim + units)
    x, estimator_u, estimator_v, factors, kernel, bias, z = case(rng, batch, input_dim, units, rank, dense_rows)
    y, skipped, counts, fraction = run(x, factors, kernel, bias, z, rank, sample_rows)
    want_y, want_skipped, want_counts, want_fraction, clear = expected(
        x, estimator_u, estimator_v, kernel, bias, sample_rows, dense_rows)
    np.testing.assert_allclose(y.numpy()[clear], want_y[clear], rtol=1e-5, atol=1e-5)
    rows = want_skipped.shape[0]
    assert skipped.shape == (rows, units)
    np.testing.assert_allclose(skipped.numpy()[clear[:rows]], want_skipped[clear[:rows]], rtol=1e-5, atol=1e-5)
    if clear[:rows].all():
        np.testing.assert_array_equal(counts.numpy(), want_counts)
    if clear.all():
        assert fraction.numpy() == pytest.approx(want_fraction, abs=1e-6)


def test_nan_rows_reach_the_output():
    rng = np.random.default_rng(1)
    x, _, _, factors, kernel, bias, z = case(rng, 6, 20, 30, 4, 3)
    x[1] = np.nan  # a dense row (z is NaN there too) and a gated one
    x[4] = np.nan
    z = (x[:3].astype(np.float64) @ kernel.T).astype(np.float32)
    y, skipped, counts, _ = run(x, factors, kernel, bias, z, 4, 3)
    assert np.isnan(y.numpy()[[1, 4]]).all() and np.isfinite(y.numpy()[[0, 2, 3, 5]]).all()
    assert not np.isnan(skipped.numpy()).any()  # a NaN estimate computes the unit: none is skipped
    assert counts.numpy().sum() == 3 * 30


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_every_instruction_set(isa, tmp_path):
    """The narrower instruction sets' copies (LRC_ISA caps the choice, made once per process)."""
    script = (
        "import numpy as np, sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import test_gated_layer_op as t\n"
        "for shape in t.SHAPES:\n"
        "    t.test_outputs_match_numpy(*shape)\n"
        "print('OK')\n"
    )
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(ops.__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "LRC_ISA": isa, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": package_root},
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_a_function_traced_for_another_rank_fails_naming_the_layer():
    rng = np.random.default_rng(2)
    x, _, _, factors, kernel, bias, z = case(rng, 4, 10, 12, 3, 0)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"dense_3: set_rank changed the rank .*model.compile.*traced for rank 3.*has rank 4"):
        run(x, factors, kernel, bias, z, 3, 0, rank_now=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"needs 66 factors .* 65 factors"):
        run(x, factors[:-1], kernel, bias, z, 3, 0)


@pytest.mark.parametrize("change, message", [
    (dict(margin=float("nan")), r"margin must be finite, got nan"),
    (dict(margin=float("inf")), r"margin must be finite, got inf"),
    (dict(kernel=np.zeros((12, 11), np.float32)), r"input_dim must agree.*kernel \[12,11\]"),
    (dict(z=np.zeros((5, 12), np.float32)), r"at most x's rows.*z \[5,12\]"),
    (dict(bias=np.zeros(13, np.float32)), r"units between.*bias \[13\]"),
    (dict(x=np.zeros(10, np.float32)), r"expects x \[batch, input_dim\].*x \[10\]"),
])
def test_bad_input_is_an_error_naming_it(change, message):
    rng = np.random.default_rng(3)
    x, _, _, factors, kernel, bias, z = case(rng, 4, 10, 12, 3, 0)
    arguments = dict(x=x, factors=factors, kernel=kernel, bias=bias, z=z, margin=MARGIN, **{})
    arguments.update(change)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        run(arguments["x"], arguments["factors"], arguments["kernel"], arguments["bias"], arguments["z"], 3, 0,
            margin=arguments["margin"])


def test_negative_sample_rows_is_refused():
    rng = np.random.default_rng(4)
    x, _, _, factors, kernel, bias, z = case(rng, 4, 10, 12, 3, 0)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="sample_rows"):
        run(x, factors, kernel, bias, z, 3, -1)


@pytest.mark.parametrize("batch, dense_rows, sample_rows", [(9, 0, 0), (9, 4, 3), (9, 9, 9), (1, 0, 0), (0, 0, 0)])
def test_registered_gradient_matches_numpy(rng, batch, dense_rows, sample_rows):
    """The op's own gradient (inference calls differentiate it): dL/dx, dL/dW and dL/db through
    y's computed positive units and skipped's positive ones, where z came from TF's GEMM for the
    first rows and the op computed the rest, against float64 numpy."""
    x, estimator_u, estimator_v, factors, kernel, bias, _ = case(rng, batch, 12, 10, 3, dense_rows)
    y_cotangent = rng.standard_normal((batch, 10))
    skipped_cotangent = rng.standard_normal((min(sample_rows, dense_rows), 10))
    xt, kernel_t, bias_t = (tf.constant(a) for a in (x, kernel, bias))
    with tf.GradientTape() as tape:
        tape.watch([xt, kernel_t, bias_t])
        z = ops.kernel_product(xt[:dense_rows], kernel_t)
        y, skipped, _, _ = run(xt, factors, kernel_t, bias_t, z, 3, sample_rows)
        loss = tf.reduce_sum(y * y_cotangent) + tf.reduce_sum(skipped * skipped_cotangent)
    grads = [g.numpy() for g in tape.gradient(loss, [xt, kernel_t, bias_t])]
    y64, skipped64, _, _, clear = expected(x, estimator_u, estimator_v, kernel, bias, sample_rows, dense_rows)
    g = np.where(y64 > 0, y_cotangent, 0.0)
    g[:len(skipped64)] += np.where(skipped64 > 0, skipped_cotangent, 0.0)
    assert clear.all(), "a pair near a boundary: pick another seed"
    np.testing.assert_allclose(grads[0], g @ kernel.astype(np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[1], g.T @ x.astype(np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[2], g.sum(axis=0), rtol=1e-5, atol=1e-5)
