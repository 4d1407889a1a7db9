"""LowRankGatedDense(training_path="gated"): the layer's training step on the compiled gated
forward and backward, against float64 numpy, under MirroredStrategy, and its float32 fallback.

The kernels themselves (odd shapes, every instruction-set copy, CUDA through the shim) are
tested in test_gated_training_ops.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import away_from_boundary, compiled_ops_that_ran, numpy_gated_dense

from lrc_keras import LowRankGatedDense, dispatch, ops
from lrc_keras.estimators import InputSVDEstimator

pytestmark = pytest.mark.skipif(not ops.is_compiled(), reason="the gated path needs the compiled ops")


def gated_layer(rng, input_dim, units, rank, training_path="gated", **settings):
    layer = LowRankGatedDense(units, rank=rank, training_path=training_path, **settings)
    layer.build((None, input_dim))
    layer.kernel.assign(rng.standard_normal((units, input_dim)).astype("float32") / np.sqrt(input_dim))
    layer.bias.assign(0.1 * rng.standard_normal(units).astype("float32"))
    # An estimator that is right about most signs and wrong about some: both kinds of pairs.
    layer.assign_estimator(rng.standard_normal((input_dim, rank)).astype("float32"),
                           rng.standard_normal((rank, units)).astype("float32") / np.sqrt(input_dim))
    return layer


@pytest.mark.parametrize("batch, input_dim, units, rank", [(0, 24, 32, 4), (1, 24, 32, 4), (33, 24, 32, 4),
                                                          (5, 1, 7, 1), (9, 17, 1, 1), (130, 70, 50, 3)])
def test_outputs_and_gradients_match_numpy(rng, batch, input_dim, units, rank):
    """y, dL/dx, dL/dW, dL/db of a training call: only computed, positive units pass gradient."""
    layer = gated_layer(rng, input_dim, units, rank)
    x = tf.constant(rng.standard_normal((batch, input_dim)).astype("float32"))
    cotangent = rng.standard_normal((batch, units))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * cotangent)
    grad_x, grad_kernel, grad_bias = tape.gradient(loss, [x, layer.kernel, layer.bias])
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    expected, mask, z_hat, z = numpy_gated_dense(x.numpy(), kernel, bias, layer.estimator_u.numpy(),
                                                 layer.estimator_v.numpy(), 0.0)
    near = ~away_from_boundary(z_hat, 0.0) | (np.abs(z) < 1e-3)
    rows, columns = near.any(axis=1), near.any(axis=0)
    if batch:
        assert np.any(mask & (z > 0)) and np.any(~mask & (z > 0)), "needs computed and skipped active units"
    g = np.where(mask & (z > 0), cotangent, 0.0)
    np.testing.assert_allclose(y.numpy()[~rows], expected[~rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_x.numpy()[~rows], (g @ kernel.astype(np.float64))[~rows], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_kernel.numpy()[~columns], (g.T @ x.numpy().astype(np.float64))[~columns],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_bias.numpy()[~columns], g.sum(axis=0)[~columns], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_gradients_with_the_skipped_unit_penalty_match_numpy(rng, batch):
    """L1(λ) on the output and on the skipped active units (the whole batch is the sample):
    computed active pairs pass c + λ/B, skipped active pairs λ/B, through one backward op."""
    layer = gated_layer(rng, 24, 32, 4)
    layer.activity_regularizer = keras.regularizers.L1(0.01)
    weights = [v.numpy() for v in (layer.kernel, layer.bias, layer.estimator_u, layer.estimator_v)]
    for _ in range(50):  # inputs whose gate decisions and signs float32 rounding cannot flip
        x = rng.standard_normal((batch, 24)).astype("float32")
        _, _, z_hat, z = numpy_gated_dense(x, *weights, 0.0)
        if away_from_boundary(z_hat, 0.0).all() and (np.abs(z) > 1e-3).all():
            break
    x = tf.constant(x)
    cotangent = rng.standard_normal((batch, 32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * cotangent) + tf.add_n(layer.losses)
    grad_x, grad_kernel, grad_bias = tape.gradient(loss, [x, layer.kernel, layer.bias])
    kernel, bias = layer.kernel.numpy().astype(np.float64), layer.bias.numpy()
    _, mask, z_hat, z = numpy_gated_dense(x.numpy(), kernel, bias, layer.estimator_u.numpy(),
                                          layer.estimator_v.numpy(), 0.0)
    assert away_from_boundary(z_hat, 0.0).all() and (np.abs(z) > 1e-3).all()
    assert np.any(~mask & (z > 0)), "needs skipped active units"
    g = np.where(mask & (z > 0), cotangent + 0.01 / batch, np.where(~mask & (z > 0), 0.01 / batch, 0.0))
    np.testing.assert_allclose(grad_x.numpy(), g @ kernel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_kernel.numpy(), g.T @ x.numpy().astype(np.float64), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_bias.numpy(), g.sum(axis=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("observed_density, runs_gated", [
    (dispatch.GATED_TRAINING_MAX_DENSITY, True), (dispatch.GATED_TRAINING_MAX_DENSITY + 0.01, False),
])
def test_auto_trains_gated_up_to_the_crossover_density(rng, tmp_path, observed_density, runs_gated):
    """The two paths give the same y; the profiler's trace shows which ran (the dense path runs
    no LrcGatedDense)."""
    layer = gated_layer(rng, 24, 32, 4, training_path="auto")
    x = tf.constant(rng.standard_normal((40, 24)).astype("float32"))
    step = tf.function(lambda x: layer(x, training=True))
    step(x)  # the first call traces: keep it out of the profile
    layer.observed_density.assign(observed_density)  # which that call overwrote with its own
    assert compiled_ops_that_ran(step, x, tmp_path) == ({"LrcGatedDense"} if runs_gated else set())
    layer.observed_density.assign(observed_density)
    y = step(x).numpy()
    expected, _, z_hat, _ = numpy_gated_dense(x.numpy(), *(v.numpy() for v in (layer.kernel, layer.bias,
                                                                                layer.estimator_u, layer.estimator_v)), 0.0)
    keep = away_from_boundary(z_hat, 0.0)
    np.testing.assert_allclose(y[keep], expected[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training_path", ["gated", "auto"])
def test_fit_under_mirrored_strategy_equals_one_device(rng, mirrored_strategy, training_path):
    """Two replicas of half the batch each end where one device ends (refits included)."""
    x = rng.standard_normal((96, 20)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")

    def fitted(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(7)
            model = keras.Sequential([
                keras.Input((20,)),
                LowRankGatedDense(48, rank=4, training_path=training_path, estimator=InputSVDEstimator(refit_every=2)),
                keras.layers.Dense(3),
            ])
            model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        return [v.numpy() for v in model.layers[0].trainable_variables + model.layers[0].non_trainable_variables
                if v.name in ("kernel", "bias", "estimator_factors", "training_steps")]

    one_device = fitted(tf.distribute.get_strategy())
    mirrored = fitted(mirrored_strategy)
    assert len(one_device) == 4
    for a, b in zip(one_device, mirrored):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_low_precision_trains_by_the_dense_path_with_one_warning(rng, monkeypatch):
    from lrc_keras import dispatch

    monkeypatch.setattr(dispatch, "_warned", set())
    layer = LowRankGatedDense(16, rank=3, training_path="gated", dtype="mixed_bfloat16")
    x = rng.standard_normal((8, 12)).astype("float32")
    layer.build((None, 12))
    with pytest.warns(RuntimeWarning, match="gated training kernels are float32 only and the inputs are bfloat16") as record:
        for _ in range(2):
            with tf.GradientTape() as tape:
                total = tf.reduce_sum(tf.cast(layer(x, training=True), tf.float32))
            grad_kernel = tape.gradient(total, layer.kernel)
    assert len([w for w in record if "training kernels" in str(w.message)]) == 1, "warned once"
    # The dense path's gradient of Σ y: Σ over computed active pairs of x_i, for unit j.
    weights = [np.asarray(w, np.float64) for w in (layer.kernel, layer.bias, layer.estimator_u, layer.estimator_v)]
    _, mask, z_hat, z = numpy_gated_dense(np.asarray(tf.cast(x, tf.bfloat16), np.float64), *weights, 0.0)
    units = (away_from_boundary(z_hat, 0.0, tolerance=0.1) & (np.abs(z) > 0.1)).all(axis=0)
    expected = ((mask & (z > 0)).T.astype(np.float64) @ np.asarray(tf.cast(x, tf.bfloat16), np.float64))
    np.testing.assert_allclose(np.asarray(grad_kernel, np.float64)[units], expected[units], rtol=0.05, atol=0.05)
