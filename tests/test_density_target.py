"""Density targets: the adaptive L1 strength reaches and holds a predicted density, stays usable, is saved,
agrees across replicas, and its setting round-trips."""

import contextlib
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import lrc_keras
from lrc_keras import LowRankGatedDense
from lrc_keras.density_target import MAX_STRENGTH
from lrc_keras.density_target import MIN_STRENGTH
from lrc_keras.density_target import DensityTarget
from lrc_keras.estimators import SVDEstimator


def synthetic_task(rng, rows=1024):
    x = rng.standard_normal((rows, 20)).astype("float32")
    return x, np.argmax(x[:, :3] + 0.5 * x[:, 3:6], axis=1).astype("int32")


def classifier(target, bias=0.0, **layer_kwargs):
    """20 → 64 gated (a full-rank estimator refitted every step: its gate is the true sign of z) → 3."""
    model = keras.Sequential([
        keras.Input((20,)),
        LowRankGatedDense(64, rank=20, estimator=SVDEstimator(refit_every=1), target_density=target,
                          bias_initializer=keras.initializers.Constant(bias), name="gated", **layer_kwargs),
        keras.layers.Dense(3),
    ])
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("start_bias, starts", [(0.0, "above"), (-1.0, "below")])
def test_the_strength_adapts_until_the_density_holds_at_the_target(rng, start_bias, starts):
    """Biases 0 start at half the units active (above 0.2), biases -1 at a twelfth (below): either
    way the trained layer computes 0.2 of its units, measured afresh on the data."""
    keras.utils.set_random_seed(0)
    x, y = synthetic_task(rng)
    model = classifier(DensityTarget(0.2, initial_strength=1e-2, rate=0.2), bias=start_bias)
    history = model.fit(x, y, batch_size=64, epochs=12, verbose=0).history
    first = history["gated_predicted_density"][0]
    assert (first > 0.3) if starts == "above" else (first < 0.15), first
    assert abs(lrc_keras.measure_gates(model, x)[0]["predicted_density"] - 0.2) < 0.03
    strengths = history["gated_density_penalty"]  # logged once per epoch, for fit's logs and TensorBoard
    assert len(strengths) == 12 and all(MIN_STRENGTH <= s <= MAX_STRENGTH for s in strengths)


def test_the_penalty_is_l1_of_the_true_activity_at_the_logged_strength(rng):
    """One training call on 24 rows (all of them sampled): the added loss is the logged strength
    times Σ relu(z) / rows, the skipped active units included, as a float64 reference computes."""
    layer = LowRankGatedDense(16, rank=2, target_density=0.3)
    x = rng.standard_normal((24, 10)).astype("float32")
    layer.build(x.shape)
    z = x.astype(np.float64) @ layer.kernel.numpy().T.astype(np.float64) + layer.bias.numpy()
    layer(x, training=True)
    strength = float(layer.density_penalty_metric.result())
    assert np.isfinite(strength) and strength != pytest.approx(1e-4), "the logged strength is the adapted one"
    np.testing.assert_allclose(float(tf.add_n(layer.losses)), strength * np.maximum(z, 0.0).sum() / 24, rtol=1e-5)


def strength_after(layer, x, steps):
    """The strength after `steps` training calls on `x`, and the last call's loss."""

    @tf.function
    def step(v):
        layer(v, training=True)
        return tf.add_n(layer.losses)

    for _ in range(steps):
        loss = step(x)
    return float(layer.density_penalty.numpy()), loss


@pytest.mark.parametrize("bias, expected", [(-100.0, MIN_STRENGTH), (100.0, MAX_STRENGTH)])
def test_the_strength_stays_positive_and_finite_at_densities_0_and_1(rng, bias, expected):
    """A layer that computes no unit (or every unit), step after step: the strength falls (rises)
    to its bound and stays there, never 0, negative or infinite."""
    layer = LowRankGatedDense(8, rank=2, target_density=0.5, bias_initializer=keras.initializers.Constant(bias))
    x = rng.standard_normal((16, 6)).astype("float32")
    layer.build(x.shape)
    strength, loss = strength_after(layer, x, 1000)
    assert strength == pytest.approx(expected, rel=1e-6) and np.isfinite(float(loss))


def test_empty_and_nan_batches_leave_the_strength_finite(rng):
    layer = LowRankGatedDense(8, rank=2, target_density=0.5)
    layer.build((None, 6))
    before = float(layer.density_penalty.numpy())
    strength, _ = strength_after(layer, np.zeros((0, 6), "float32"), 3)
    assert strength == before, "nothing measured, nothing changed"
    nan_rows = np.full((16, 6), np.nan, "float32")
    strength, _ = strength_after(layer, nan_rows, 50)
    assert np.isfinite(strength) and MIN_STRENGTH <= strength <= MAX_STRENGTH
    layer.density_penalty.assign(float("nan"))  # however it got there, a non-finite strength restarts
    strength, _ = strength_after(layer, rng.standard_normal((16, 6)).astype("float32"), 1)
    assert np.isfinite(strength) and strength == pytest.approx(1e-4, rel=0.2)


def test_save_and_load_mid_training_resumes_the_strength(rng, tmp_path):
    keras.utils.set_random_seed(0)
    x, y = synthetic_task(rng, rows=256)
    model = classifier(DensityTarget(0.1, initial_strength=1e-3, rate=0.2))
    model.fit(x[:128], y[:128], batch_size=32, epochs=2, shuffle=False, verbose=0)
    strength = float(model.layers[0].density_penalty.numpy())
    assert strength != pytest.approx(1e-3), "training moved it"
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert float(loaded.layers[0].density_penalty.numpy()) == strength
    assert [w.name for w in loaded.layers[0].weights] == [w.name for w in model.layers[0].weights]
    for network in (model, loaded):
        network.fit(x[128:], y[128:], batch_size=32, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(loaded.layers[0].density_penalty.numpy(), model.layers[0].density_penalty.numpy(),
                               rtol=1e-5)


def test_set_rank_keeps_the_strength(rng):
    layer = LowRankGatedDense(16, rank=4, target_density=0.2)
    layer.build((None, 10))
    penalty = layer.density_penalty
    penalty.assign(0.0123)
    layer.set_rank(2)
    assert layer.density_penalty is penalty and float(penalty.numpy()) == pytest.approx(0.0123)
    assert [w.name for w in layer.weights].count("density_penalty") == 1


def test_replicas_agree_on_the_strength_of_the_global_batch(rng, mirrored_strategy):
    """Under MirroredStrategy (two replicas of 16 rows, each sampled whole) the strength follows the
    density of the global batch, as one device training on the same 32-row batches does."""
    x, y = synthetic_task(rng, rows=256)
    strengths = {}
    for name, scope in (("one device", contextlib.nullcontext()), ("mirrored", mirrored_strategy.scope())):
        keras.utils.set_random_seed(0)
        with scope:
            model = classifier(DensityTarget(0.4, initial_strength=1e-3, rate=0.5))  # errors within the clip
        if name == "mirrored":
            model.set_weights(weights)
        weights = model.get_weights()
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        strengths[name] = model.layers[0].density_penalty
    replicas = mirrored_strategy.experimental_local_results(strengths["mirrored"].value)
    assert len(replicas) == 2 and float(replicas[0]) == float(replicas[1])
    np.testing.assert_allclose(float(replicas[0]), float(strengths["one device"].numpy()), rtol=1e-3)


def test_the_setting_round_trips_through_get_config():
    target = DensityTarget(0.05, initial_strength=3e-4, rate=0.01, gain=1.5)
    layer = LowRankGatedDense(8, rank=2, target_density=target)
    config = layer.get_config()
    assert config["target_density"]["config"] == {"target": 0.05, "initial_strength": 3e-4, "rate": 0.01, "gain": 1.5}
    clone = LowRankGatedDense.from_config(config)
    assert clone.target_density == target and clone.get_config() == config
    assert LowRankGatedDense(8, rank=2, target_density=0.25).target_density == DensityTarget(0.25)
    assert LowRankGatedDense.from_config(LowRankGatedDense(8, rank=2).get_config()).target_density is None


@pytest.mark.parametrize("target", [0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1"])
def test_a_bad_target_is_a_value_error_naming_it(target):
    message = f"target_density must be a number in \\(0, 1\\].*got target_density={target!r}"
    with pytest.raises(ValueError, match=message):
        LowRankGatedDense(8, rank=2, target_density=target)
    with pytest.raises(ValueError, match=message):
        DensityTarget(target)


@pytest.mark.parametrize("setting", ["initial_strength", "rate", "gain"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_bad_controller_settings_are_value_errors_naming_them(setting, value):
    with pytest.raises(ValueError, match=f"{setting} must be a positive finite number, got {setting}={value!r}"):
        DensityTarget(0.1, **{setting: value})
