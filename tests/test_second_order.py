"""Second-order gradients through LowRankGatedDense's training step, on every training path:
a gradient of a scalar built from first-order gradients (gradient penalties, Hessian-vector
products), against float64 numpy, and a gradient-penalty model trained by `fit` on each path.

The gated path's backward (LrcGatedDenseGrad) is differentiated by its registered gradient
(`lrc_keras.ops`); the dense path by TensorFlow's GEMM gradients.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import away_from_boundary, numpy_gated_dense
from test_gated_training_path import gated_layer

from lrc_keras import LowRankGatedDense, ops
from lrc_keras.estimators import InputSVDEstimator

pytestmark = pytest.mark.skipif(not ops.is_compiled(), reason="the gated path needs the compiled ops")

# (training_path, observed density before the call): "auto" at 0.9 takes its dense branch.
PATHS = [("gated", 0.0), ("dense", 0.0), ("auto", 0.0), ("auto", 0.9)]


def numpy_second_order(x, kernel, bias, computed, cotangent, grad_x_weight, grad_kernel_weight, grad_bias_weight):
    """float64 d P / d(x, W, b) for L = Σ C·y + ½ Σ y² and P = Σ A·dL/dx + Σ B·dL/dW + Σ c·dL/db,
    y = relu(x·Wᵀ + b) on the `computed` pairs, 0 elsewhere (W in the stored (units, input_dim) layout).

    With M the computed positive pairs, G = M·(C + y) and H = M·(A·Wᵀ + x·Bᵀ + c) (derived by hand):
        dP/dx = G·B + H·W,   dP/dW = Gᵀ·A + Hᵀ·x,   dP/db = Σ_rows H.
    """
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    z = x @ kernel.T + bias
    pairs = computed & (z > 0)
    y = np.where(pairs, z, 0.0)
    g = np.where(pairs, cotangent + y, 0.0)
    h = np.where(pairs, grad_x_weight @ kernel.T + x @ grad_kernel_weight.T + grad_bias_weight, 0.0)
    return g @ grad_kernel_weight + h @ kernel, g.T @ grad_x_weight + h.T @ x, h.sum(axis=0)


def second_order(layer, x, cotangent, grad_x_weight, grad_kernel_weight, grad_bias_weight):
    """d P / d(x, W, b) through the layer's training call (P as in `numpy_second_order`)."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * cotangent) + 0.5 * tf.reduce_sum(tf.square(y))
        grad_x, grad_kernel, grad_bias = inner.gradient(loss, [x, layer.kernel, layer.bias])
        penalty = (tf.reduce_sum(grad_x * grad_x_weight) + tf.reduce_sum(grad_kernel * grad_kernel_weight)
                   + tf.reduce_sum(grad_bias * grad_bias_weight))
    return outer.gradient(penalty, [x, layer.kernel, layer.bias])


@pytest.mark.parametrize("path, observed_density", PATHS)
@pytest.mark.parametrize("batch, input_dim, units, rank", [(0, 24, 32, 4), (1, 24, 32, 4), (33, 24, 32, 4),
                                                          (5, 1, 7, 1), (9, 17, 1, 1)])
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf.function"])
def test_second_order_gradients_match_numpy(rng, path, observed_density, batch, input_dim, units, rank, traced):
    layer = gated_layer(rng, input_dim, units, rank, training_path=path,
                        estimator=InputSVDEstimator(refit_every=None))
    layer.observed_density.assign(observed_density)
    x = tf.constant(rng.standard_normal((batch, input_dim)).astype("float32"))
    weights = [rng.standard_normal(shape).astype("float32") for shape in
               [(batch, units), (batch, input_dim), (units, input_dim), (units,)]]
    compute = tf.function(lambda x: second_order(layer, x, *weights)) if traced else (
        lambda x: second_order(layer, x, *weights))
    got = [g.numpy() for g in compute(x)]
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    _, computed, z_hat, z = numpy_gated_dense(x.numpy(), kernel, bias, layer.estimator_u.numpy(),
                                              layer.estimator_v.numpy(), 0.0)
    expected = numpy_second_order(x.numpy(), kernel, bias, computed, *weights)
    if batch:
        assert np.any(computed & (z > 0)) and np.abs(expected[1]).max() > 0.1, "needs pairs with gradient"
    # Rows and units with a gate decision or a sign float32 rounding could flip are left out.
    near = ~away_from_boundary(z_hat, 0.0) | (np.abs(z) < 1e-3)
    rows, units_kept = ~near.any(axis=1), ~near.any(axis=0)
    np.testing.assert_allclose(got[0][rows], expected[0][rows], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1][units_kept], expected[1][units_kept], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[2][units_kept], expected[2][units_kept], rtol=1e-4, atol=1e-4)


def test_nan_rows_pass_no_second_order_gradient(rng):
    """A NaN input row adds nothing on the gated path: the other rows' results are exact, its own
    dP/dx is 0, and dP/dW and dP/db stay finite."""
    layer = gated_layer(rng, 17, 23, 3, estimator=InputSVDEstimator(refit_every=None))
    x = rng.standard_normal((9, 17)).astype("float32")
    x[[2, 6]] = np.nan
    weights = [rng.standard_normal(shape).astype("float32") for shape in [(9, 23), (9, 17), (23, 17), (23,)]]
    got = [g.numpy() for g in second_order(layer, tf.constant(x), *weights)]
    finite = np.isfinite(x).all(axis=1)
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    _, computed, z_hat, z = numpy_gated_dense(x[finite], kernel, bias, layer.estimator_u.numpy(),
                                              layer.estimator_v.numpy(), 0.0)
    assert np.all(away_from_boundary(z_hat, 0.0)) and np.all(np.abs(z) > 1e-3)
    cotangent, grad_x_weight, grad_kernel_weight, grad_bias_weight = weights
    expected = numpy_second_order(x[finite], kernel, bias, computed, cotangent[finite], grad_x_weight[finite],
                                  grad_kernel_weight, grad_bias_weight)
    np.testing.assert_array_equal(got[0][~finite], 0.0)
    np.testing.assert_allclose(got[0][finite], expected[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[2], expected[2], rtol=1e-4, atol=1e-4)


class GradientPenaltyCritic(keras.Model):
    """A WGAN-GP-style critic: squared error plus 10·(‖d score / d x‖ − 1)², a second-order
    gradient through the gated layer at every step."""

    def train_step(self, data):
        x, target = data
        with tf.GradientTape() as tape:
            with tf.GradientTape() as input_tape:
                input_tape.watch(x)
                score = self(x, training=True)[:, 0]
            grad_x = input_tape.gradient(score, x)
            penalty = tf.reduce_mean(tf.square(tf.norm(grad_x, axis=1) - 1.0))
            loss = tf.reduce_mean(tf.square(score - target)) + 10.0 * penalty + tf.add_n(self.losses)
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
        return {"loss": loss}


def critic(training_path):
    inputs = keras.Input((10,))
    hidden = LowRankGatedDense(24, rank=3, training_path=training_path, activity_regularizer=keras.regularizers.L1(1e-3),
                               estimator=InputSVDEstimator(refit_every=2))(inputs)
    return GradientPenaltyCritic(inputs, keras.layers.Dense(1)(hidden))


def test_gradient_penalty_fit_ends_at_the_same_weights_on_every_path(rng):
    x = rng.standard_normal((64, 10)).astype("float32")
    target = (x[:, 0] - x[:, 1]).astype("float32")
    start, trained = None, {}
    for path in ["dense", "gated", "auto"]:
        model = critic(path)
        if start is None:
            start = model.get_weights()
        model.set_weights(start)
        model.compile(keras.optimizers.SGD(0.02))
        model.fit(x, target, batch_size=16, epochs=3, shuffle=False, verbose=0)
        trained[path] = [v.numpy() for v in model.trainable_variables]
    kernel_at_start = start[0]
    assert np.abs(trained["dense"][0] - kernel_at_start).max() > 1e-2, "the fit must move the weights"
    for path in ["gated", "auto"]:
        for a, b in zip(trained[path], trained["dense"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=path)
