"""The estimate stage: the estimator rules against float64 numpy references."""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from lrc_keras import LowRankGatedDense, estimators
from lrc_keras.estimators import InputSVDEstimator, input_aware_factors


def whitened_svd_reference(kernel, moment, rank, ridge=1e-3):
    """float64: U·V minimising ‖Lᵀ(W − U·V)‖ with L·Lᵀ = C + ridge·tr(C)/d·I, by a full SVD."""
    w = kernel.T.astype(np.float64)
    moment = moment.astype(np.float64)
    d = moment.shape[0]
    lower = np.linalg.cholesky(moment + (ridge * np.trace(moment) / d + 1e-12) * np.eye(d))
    left, s, right_t = np.linalg.svd(lower.T @ w, full_matrices=False)
    best = left[:, :rank] * s[:rank] @ right_t[:rank]
    return np.linalg.solve(lower.T, best)


def correlated_inputs(rng, count, input_dim):
    mixing = rng.standard_normal((input_dim, input_dim)) * np.linspace(2.0, 0.05, input_dim)[:, None]
    return rng.standard_normal((count, input_dim)) @ mixing


def product(factors):
    u, v = factors
    return u.numpy().astype(np.float64) @ v.numpy().astype(np.float64)


@pytest.mark.parametrize("input_dim, units, rank", [(30, 40, 5), (50, 20, 8)])
def test_input_aware_factors_match_the_whitened_svd(rng, input_dim, units, rank):
    x = correlated_inputs(rng, 400, input_dim)
    moment = x.T @ x / len(x)
    # A kernel with a decaying spectrum, as trained layers have: the randomized SVD is then exact.
    kernel = (rng.standard_normal((units, input_dim)) * 0.7 ** np.arange(input_dim)).astype(np.float32)
    expected = whitened_svd_reference(kernel, moment, rank)
    actual = product(input_aware_factors(kernel, moment.astype(np.float32), rank, seed=[1, 2]))
    np.testing.assert_allclose(actual, expected, atol=2e-4 * np.abs(expected).max())
    # What it is for: x·U·V reproduces x·W better than the plain SVD does on these inputs.
    w = kernel.T.astype(np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    plain = u[:, :rank] * s[:rank] @ vt[:rank]
    assert np.linalg.norm(x @ (w - actual)) < 0.9 * np.linalg.norm(x @ (w - plain))


def test_white_inputs_give_the_plain_truncated_svd(rng):
    kernel = (rng.standard_normal((40, 30)) * 0.8 ** np.arange(30)).astype(np.float32)
    u, s, vt = np.linalg.svd(kernel.T.astype(np.float64), full_matrices=False)
    expected = u[:, :6] * s[:6] @ vt[:6]
    actual = product(input_aware_factors(kernel, np.eye(30, dtype=np.float32), 6, seed=[0, 0]))
    np.testing.assert_allclose(actual, expected, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("inputs", ["zero", "dead_columns", "constant"])
def test_singular_inputs_do_not_fail(rng, inputs):
    x = rng.standard_normal((64, 12)).astype(np.float32)
    if inputs == "zero":
        x[:] = 0.0
    elif inputs == "dead_columns":
        x[:, 3:9] = 0.0
    else:
        x[:] = 1.5
    layer = LowRankGatedDense(10, rank=3)
    layer.build((None, 12))
    layer.refit(x)
    factors = (layer.estimator_u.numpy(), layer.estimator_v.numpy())
    assert all(np.all(np.isfinite(f)) for f in factors)
    expected = whitened_svd_reference(layer.kernel.numpy(), x.T.astype(np.float64) @ x / len(x), 3)
    np.testing.assert_allclose(factors[0] @ factors[1], expected, atol=1e-3 * max(np.abs(expected).max(), 1e-6))


def moment_reference(batches, decay=InputSVDEstimator.decay, rows=InputSVDEstimator.moment_rows):
    moment, count = 0.0, 0.0
    for batch in batches:
        sample = batch[:rows].astype(np.float64)
        moment = decay * moment + sample.T @ sample
        count = decay * count + len(sample)
    return moment, count


def gathering_model(input_dim=6):
    model = keras.Sequential([keras.Input((input_dim,)), LowRankGatedDense(5, rank=2, refit_every=None), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    return model


def test_second_moment_is_gathered_in_the_train_step(rng):
    x = rng.standard_normal((5 * 48, 6)).astype(np.float32)
    x[7, 2] = np.nan  # a non-finite row is left out of the statistics
    model = gathering_model()
    layer = model.layers[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, np.zeros(len(x)), batch_size=48, epochs=1, shuffle=False, verbose=0)
    batches = [np.where(np.isfinite(b).all(1, keepdims=True), b, 0.0) for b in np.split(x, 5)]
    moment, count = moment_reference(batches)
    count -= InputSVDEstimator.decay ** 4  # the NaN row of the first batch
    np.testing.assert_allclose(layer.input_count.numpy(), count, rtol=1e-5)
    np.testing.assert_allclose(layer.input_moment.numpy(), moment, rtol=1e-4, atol=1e-3)


def test_second_moment_under_mirrored_strategy_is_all_reduced(rng, mirrored_strategy):
    x = rng.standard_normal((4 * 32, 6)).astype(np.float32)
    with mirrored_strategy.scope():
        model = gathering_model()
    model.fit(x, np.zeros(len(x)), batch_size=32, epochs=1, shuffle=False, verbose=0)
    layer = model.layers[0]
    # Each replica sees 16 rows of each global batch of 32: together, the whole batch.
    moment, count = moment_reference(np.split(x, 4))
    np.testing.assert_allclose(layer.input_count.numpy(), count, rtol=1e-5)
    np.testing.assert_allclose(layer.input_moment.numpy(), moment, rtol=1e-4, atol=1e-3)


def test_refit_in_training_uses_the_gathered_moment(rng):
    x = correlated_inputs(rng, 96, 8).astype(np.float32)
    model = keras.Sequential([keras.Input((8,)), LowRankGatedDense(12, rank=3, refit_every=3), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.0), "mse")  # weights fixed: the refit sees this kernel
    model.fit(x, np.zeros(96), batch_size=32, epochs=1, shuffle=False, verbose=0)
    layer = model.layers[0]
    moment, count = moment_reference(np.split(x, 3))
    expected = whitened_svd_reference(layer.kernel.numpy(), moment / count, 3)
    actual = layer.estimator_u.numpy() @ layer.estimator_v.numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-3 * np.abs(expected).max())


def test_save_and_load_keep_the_input_statistics(rng, tmp_path):
    x = rng.standard_normal((64, 6)).astype(np.float32)
    model = gathering_model()
    model.fit(x, np.zeros(64), batch_size=32, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path).layers[0]
    assert float(loaded.input_count.numpy()) > 0
    np.testing.assert_array_equal(loaded.input_moment.numpy(), model.layers[0].input_moment.numpy())
    np.testing.assert_array_equal(loaded.input_count.numpy(), model.layers[0].input_count.numpy())


@pytest.mark.parametrize(
    "sample, message",
    [
        (np.ones((4, 5), np.float32), r"sample_inputs must be a non-empty 2-D array of width 6 .* got shape \(4, 5\)"),
        (np.ones((0, 6), np.float32), r"got shape \(0, 6\)"),
        (np.array([[1, 2, np.nan, 0, 0, 0]], np.float32), r"finite numbers; got float32 with nan at \(0, 2\)"),
    ],
)
def test_bad_sample_inputs_are_refused_before_any_weight_changes(rng, sample, message):
    layer = LowRankGatedDense(5, rank=2)
    layer.build((None, 6))
    before = [w.copy() for w in layer.get_weights()]
    with pytest.raises(ValueError, match=message):
        layer.refit(sample)
    with pytest.raises(ValueError, match=message):
        layer.set_rank(1, sample_inputs=sample)
    assert layer.rank == 2
    for old, new in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_a_new_estimator_is_one_registered_class(rng):
    """Registering a rule is all it takes: the layer builds, fits and trains it by name."""

    @estimators.register
    class Scaled(estimators.Estimator):
        name = "test_scaled_svd"
        default_refit_every = None

        def factors(self, sample_inputs=None, rank=None):
            u, v = super().factors(sample_inputs, rank)
            return 2.0 * u, v

    try:
        layer = LowRankGatedDense(6, rank=2, estimator="test_scaled_svd")
        layer.build((None, 5))
        u, s, vt = np.linalg.svd(layer.kernel.numpy().T.astype(np.float64), full_matrices=False)
        np.testing.assert_allclose(
            layer.estimator_u.numpy() @ layer.estimator_v.numpy(), 2 * (u[:, :2] * s[:2] @ vt[:2]), atol=1e-5
        )
        layer(rng.standard_normal((3, 5)).astype(np.float32), training=True)
        assert LowRankGatedDense.from_config(layer.get_config()).estimator == "test_scaled_svd"
    finally:
        del estimators.ESTIMATORS["test_scaled_svd"]


def test_joint_starts_from_the_input_aware_factors_of_its_first_batch(rng):
    x = correlated_inputs(rng, 32, 8).astype(np.float32)
    model = keras.Sequential([keras.Input((8,)), LowRankGatedDense(12, rank=3, estimator="joint"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.0), "mse")  # no gradient step: U, V are the warm start
    layer = model.layers[0]
    model.fit(x, np.zeros(32), batch_size=32, epochs=1, verbose=0)
    expected = whitened_svd_reference(layer.kernel.numpy(), x.T.astype(np.float64) @ x / 32, 3)
    np.testing.assert_allclose(layer.estimator_u.numpy() @ layer.estimator_v.numpy(), expected, atol=1e-3 * np.abs(expected).max())


def test_joint_trains_under_mirrored_strategy(rng, mirrored_strategy):
    x = rng.standard_normal((64, 8)).astype(np.float32)
    with mirrored_strategy.scope():
        model = keras.Sequential([keras.Input((8,)), LowRankGatedDense(12, rank=3, estimator="joint"), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.1), "mse")
    layer = model.layers[0]
    model.fit(x, x[:, :1], batch_size=32, epochs=1, verbose=0)
    start = layer.estimator_u.numpy().copy()
    model.fit(x, x[:, :1], batch_size=32, epochs=2, verbose=0)
    assert int(layer.training_steps.numpy()) == 6
    assert np.all(np.isfinite(layer.estimator_u.numpy())) and not np.allclose(layer.estimator_u.numpy(), start)
