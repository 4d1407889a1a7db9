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


def inputs_away_from_boundaries(rng, weights, batch, tolerance=1e-3, dtype=np.float32):
    """`batch` float32 rows of standard normals, each of whose gate decisions and ReLU signs
    (under `weights`: kernel, bias, U, V) sits more than `tolerance` from its boundary, so that
    rounding cannot flip one: a row with one nearer is drawn again. The rows are exactly
    representable in `dtype` (the dtype the layer computes in)."""
    x = np.empty((batch, weights[0].shape[1]), np.float32)
    for i in range(batch):
        while True:
            x[i] = rng.standard_normal(x.shape[1]).astype(dtype)
            _, _, z_hat, z = numpy_gated_dense(x[i:i + 1], *weights, 0.0)
            if away_from_boundary(z_hat, 0.0, tolerance).all() and (np.abs(z) > tolerance).all():
                break
    return x


def layer_weights(layer):
    return [np.asarray(v, np.float64) for v in (layer.kernel, layer.bias, layer.estimator_u, layer.estimator_v)]


@pytest.mark.parametrize("batch, input_dim, units, rank", [(0, 24, 32, 4), (1, 24, 32, 4), (33, 24, 32, 4),
                                                          (5, 1, 7, 1), (9, 17, 1, 1), (130, 70, 50, 3)])
def test_outputs_and_gradients_match_numpy(rng, batch, input_dim, units, rank):
    """y, dL/dx, dL/dW, dL/db of a training call: only computed, positive units pass gradient."""
    layer = gated_layer(rng, input_dim, units, rank)
    x = tf.constant(inputs_away_from_boundaries(rng, layer_weights(layer), batch))
    cotangent = rng.standard_normal((batch, units))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * cotangent)
    grad_x, grad_kernel, grad_bias = tape.gradient(loss, [x, layer.kernel, layer.bias])
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    expected, mask, _, z = numpy_gated_dense(x.numpy(), kernel, bias, layer.estimator_u.numpy(),
                                             layer.estimator_v.numpy(), 0.0)
    if batch:
        assert np.any(mask & (z > 0)) and np.any(~mask & (z > 0)), "needs computed and skipped active units"
    g = np.where(mask & (z > 0), cotangent, 0.0)
    # Every entry: no decision of these inputs is near enough a boundary for rounding to flip it.
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_x.numpy(), g @ kernel.astype(np.float64), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_kernel.numpy(), g.T @ x.numpy().astype(np.float64), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_bias.numpy(), g.sum(axis=0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_gradients_with_the_skipped_unit_penalty_match_numpy(rng, batch):
    """L1(λ) on the output and on the skipped active units (the whole batch is the sample):
    computed active pairs pass c + λ/B, skipped active pairs λ/B, through one backward op."""
    layer = gated_layer(rng, 24, 32, 4)
    layer.activity_regularizer = keras.regularizers.L1(0.01)
    x = tf.constant(inputs_away_from_boundaries(rng, layer_weights(layer), batch))
    cotangent = rng.standard_normal((batch, 32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * cotangent) + tf.add_n(layer.losses)
    grad_x, grad_kernel, grad_bias = tape.gradient(loss, [x, layer.kernel, layer.bias])
    kernel, bias = layer.kernel.numpy().astype(np.float64), layer.bias.numpy()
    _, mask, _, z = numpy_gated_dense(x.numpy(), kernel, bias, layer.estimator_u.numpy(),
                                      layer.estimator_v.numpy(), 0.0)
    assert np.any(~mask & (z > 0)), "needs skipped active units"
    g = np.where(mask & (z > 0), cotangent + 0.01 / batch, np.where(~mask & (z > 0), 0.01 / batch, 0.0))
    np.testing.assert_allclose(grad_x.numpy(), g @ kernel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_kernel.numpy(), g.T @ x.numpy().astype(np.float64), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_bias.numpy(), g.sum(axis=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("observed_density, runs_gated", [
    (dispatch.GATED_TRAINING_MAX_DENSITY, True), (dispatch.GATED_TRAINING_MAX_DENSITY + 0.01, False),
])
def test_auto_trains_gated_up_to_the_crossover_density(rng, tmp_path, observed_density, runs_gated):
    """The two paths give the same y; the profiler's trace shows which ran (the dense path's
    backward runs no LrcGatedDenseGrad)."""
    layer = gated_layer(rng, 24, 32, 4, training_path="auto")
    x = tf.constant(inputs_away_from_boundaries(rng, layer_weights(layer), 40))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(y)
        return y, tape.gradient(loss, layer.kernel)

    step(x)  # the first call traces: keep it out of the profile
    layer.observed_density.assign(observed_density)  # which that call overwrote with its own
    ran = {"LrcGatedLayer", "Einsum"} | ({"LrcGatedDenseGrad"} if runs_gated else set())
    assert compiled_ops_that_ran(step, x, tmp_path) == ran
    layer.observed_density.assign(observed_density)
    y = step(x)[0].numpy()
    expected, _, _, _ = numpy_gated_dense(x.numpy(), *layer_weights(layer), 0.0)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


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
    layer.build((None, 12))
    # bfloat16 inputs (cast exactly) whose decisions bfloat16 rounding (~0.4% a product) cannot flip.
    x = inputs_away_from_boundaries(rng, layer_weights(layer), 8, tolerance=0.1, dtype=tf.bfloat16.as_numpy_dtype)
    with pytest.warns(RuntimeWarning, match="gated training kernels are float32 only and the inputs are bfloat16") as record:
        for _ in range(2):
            with tf.GradientTape() as tape:
                total = tf.reduce_sum(tf.cast(layer(x, training=True), tf.float32))
            grad_kernel = tape.gradient(total, layer.kernel)
    assert len([w for w in record if "training kernels" in str(w.message)]) == 1, "warned once"
    # The dense path's gradient of Σ y: Σ over computed active pairs of x_i, for unit j (every unit).
    _, mask, _, z = numpy_gated_dense(x.astype(np.float64), *layer_weights(layer), 0.0)
    assert np.any(mask & (z > 0)) and np.any(~mask & (z > 0)), "needs computed and skipped active units"
    expected = (mask & (z > 0)).T.astype(np.float64) @ x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(grad_kernel, np.float64), expected, rtol=0.05, atol=0.05)
