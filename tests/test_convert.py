import keras
import numpy as np
import pytest
from conftest import numpy_gated_dense

from lrc_keras import LowRankGatedDense, calibrate, convert, to_dense
from lrc_keras.audit import gated_layers
from lrc_keras.gating import margin_for_recall


def dense_model(rng, input_dim=20, hidden=(32, 24)):
    layers = [keras.Input((input_dim,))]
    layers += [keras.layers.Dense(units, activation="relu", name=f"relu_{i}") for i, units in enumerate(hidden)]
    layers += [keras.layers.Dense(8, activation="tanh", name="tanh"), keras.layers.Dense(3, name="logits")]
    model = keras.Sequential(layers)
    for layer in model.layers:
        layer.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.3 for w in layer.get_weights()])
    return model


def functional_model(rng):
    inputs = keras.Input((16,))
    inner = keras.Sequential([keras.Input((16,)), keras.layers.Dense(20, activation="relu", name="inner_relu")],
                             name="inner")
    branch = keras.layers.Dense(12, activation="relu", name="branch")(inputs)
    merged = keras.layers.Concatenate()([inner(inputs), branch])
    outputs = keras.layers.Dense(4, name="head")(merged)
    model = keras.Model(inputs, outputs)
    for layer in model._flatten_layers(include_self=False):
        if layer.get_weights():
            layer.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.3 for w in layer.get_weights()])
    return model


def test_sequential_full_rank_equals_original(rng):
    model = dense_model(rng)
    converted = convert(model, rank=1.0)
    assert [type(l).__name__ for l in converted.layers] == ["LowRankGatedDense", "LowRankGatedDense", "Dense", "Dense"]
    x = rng.standard_normal((64, 20)).astype("float32")
    np.testing.assert_allclose(converted.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)


def test_weights_preserved_and_not_shared(rng):
    model = dense_model(rng)
    converted = convert(model, rank=4)
    for original, new in zip(model.layers, converted.layers):
        assert original is not new
        if isinstance(new, LowRankGatedDense):
            np.testing.assert_array_equal(new.kernel.numpy(), original.kernel.numpy().T)
            np.testing.assert_array_equal(new.bias.numpy(), original.bias.numpy())
            assert new.rank == 4
        else:
            for a, b in zip(original.get_weights(), new.get_weights()):
                np.testing.assert_array_equal(a, b)
    assert converted.get_layer("tanh").activation is keras.activations.tanh  # non-ReLU left alone


def test_functional_and_nested_models(rng):
    model = functional_model(rng)
    converted = convert(model, rank={"inner_relu": 1.0, "branch": 12})
    assert {layer.name for layer in gated_layers(converted)} == {"inner_relu", "branch"}
    x = rng.standard_normal((10, 16)).astype("float32")
    np.testing.assert_allclose(converted(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_rank_forms(rng):
    model = dense_model(rng, hidden=(32, 24))
    assert [l.rank for l in gated_layers(convert(model, rank=0.25))] == [5, 6]  # ceil(0.25 * min(d, n))
    assert [l.rank for l in gated_layers(convert(model, rank=100))] == [20, 24]  # capped at full rank
    only_first = convert(model, rank=3, layers=["relu_0"])
    assert [l.name for l in gated_layers(only_first)] == ["relu_0"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be a positive int"),
        ({"rank": 1.5}, r"rank as a fraction must be in \(0, 1\], got 1.5"),
        ({"rank": True}, "rank must be an int or a fraction"),
        ({"rank": {"relu_0": -2}}, r"rank\['relu_0'\] must be a positive int"),
        ({"rank": 3, "layers": ["tanh"]}, "'tanh' is not a Dense layer with ReLU activation"),
    ],
)
def test_bad_convert_arguments(rng, kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert(dense_model(rng), **kwargs)


def test_subclassed_model_is_rejected():
    class Custom(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(4, activation="relu")

        def call(self, x):
            return self.hidden(x)

    model = Custom()
    model(np.ones((1, 3), "float32"))
    with pytest.raises(ValueError, match="subclassed Custom"):
        convert(model, rank=2)


def synthetic_task(rng, count=600, input_dim=64, units=256):
    """A wide ReLU layer whose kernel is nearly rank 6: a rank-8 estimator is almost exact."""
    x = rng.standard_normal((count, input_dim)).astype("float32")
    kernel = rng.standard_normal((input_dim, 6)) @ rng.standard_normal((6, units)) / 8
    kernel += 0.01 * rng.standard_normal((input_dim, units))
    dense = keras.layers.Dense(units, activation="relu", name="wide")
    model = keras.Sequential([keras.Input((input_dim,)), dense, keras.layers.Dense(2)])
    dense.set_weights([kernel.astype("float32"), -0.5 * np.ones(units, "float32")])
    return model, x


@pytest.mark.parametrize("target", [0.9, 0.99])
def test_calibration_reaches_target_and_report_matches_numpy(rng, target):
    model, x = synthetic_task(rng)
    converted = convert(model, rank=2)
    report = calibrate(converted, x, target_recall=target, ranks=[2, 4, 8, 16])
    (row,) = report.rows
    layer = converted.get_layer("wide")
    assert row["target_reached"] and layer.rank == row["rank"] and layer.margin == row["margin"]
    weights = (layer.kernel.numpy(), layer.bias.numpy(), layer.estimator_u.numpy(), layer.estimator_v.numpy())
    _, mask, _, z = numpy_gated_dense(x, *weights, layer.margin)
    positive = z > 0
    recall = np.sum(mask & positive) / positive.sum()
    assert recall >= target - 1e-3
    np.testing.assert_allclose(row["recall"], recall, atol=2e-3)
    np.testing.assert_allclose(row["predicted_density"], mask.mean(), atol=2e-3)
    d, n, r = 64, 256, row["rank"]
    np.testing.assert_allclose(row["cost_model_speedup"], d * n / (r * (d + n) + mask.mean() * d * n), rtol=1e-2)
    assert "reached" in str(report) and f"| wide | {r} |" in str(report)
    # The layer really computes with the chosen rank and margin.
    y = converted.layers[0](x).numpy()
    assert np.mean(y > 0) <= row["predicted_density"] + 1e-6


def test_unreachable_target_is_reported_plainly(rng):
    model = dense_model(rng, hidden=(32,))
    converted = convert(model, rank=2)
    x = rng.standard_normal((100, 20)).astype("float32")
    report = calibrate(converted, x, target_recall=1.0, ranks=[2])
    (row,) = report.rows
    assert not row["target_reached"]
    assert "NOT reached" in str(report)
    assert row["cost_model_speedup"] == pytest.approx(1.0, abs=0.05)  # the closest at dense cost


def test_margin_for_recall_is_the_tightest():
    estimates = np.array([-3.0, -1.0, 0.5, 2.0], np.float32)
    margin = margin_for_recall(estimates, 0.75, estimates)
    assert np.mean(estimates > -margin) == 0.75
    # Any higher threshold (smaller margin) drops the second-lowest positive: no slack is left.
    assert np.mean(estimates > -margin + 1e-3) == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_recall": 0.0}, r"target_recall must be in \(0, 1\], got target_recall=0.0"),
        ({"target_recall": 1.2}, r"target_recall must be in \(0, 1\], got target_recall=1.2"),
        ({"target_recall": True}, r"target_recall must be in \(0, 1\], got target_recall=True"),
        ({"target_density": 0.0}, r"target_density must be in \(0, 1\], got target_density=0.0"),
        ({"target_density": 1.5}, r"target_density must be in \(0, 1\], got target_density=1.5"),
        ({"target_density": 0.2, "target_recall": 0.9}, "target_recall or target_density, not both"),
        ({"x": np.zeros((0, 20), "float32")}, r"x must be a non-empty batch of model inputs; got shape \(0, 20\)"),
        ({"x": np.full((4, 20), np.nan, "float32")}, "x must be finite; it has 80 NaN or inf values"),
        ({"ranks": [0, 2]}, r"ranks must be a non-empty list of positive ints, got \[0, 2\]"),
    ],
)
def test_bad_calibrate_arguments(rng, kwargs, message):
    converted = convert(dense_model(rng), rank=2)
    before = [w.copy() for w in converted.get_weights()]
    margins = [layer.margin for layer in gated_layers(converted)]
    arguments = {"x": rng.standard_normal((10, 20)).astype("float32"), **kwargs}
    with pytest.raises(ValueError, match=message):
        calibrate(converted, **arguments)
    for old, new in zip(before, converted.get_weights()):  # refused before any weight changed
        np.testing.assert_array_equal(old, new)
    assert [layer.margin for layer in gated_layers(converted)] == margins


def test_set_rank_keeps_save_and_load_working(rng, tmp_path):
    model, x = synthetic_task(rng)
    converted = convert(model, rank=2)
    calibrate(converted, x, ranks=[8])
    path = str(tmp_path / "calibrated.keras")
    converted.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("wide").rank == 8
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), converted.predict(x, verbose=0))


def test_to_dense_computes_every_unit(rng):
    """The twin of a gated model is the full dense network: relu(x·W + b) per layer, in numpy."""
    gated = convert(dense_model(rng), rank=2)  # rank 2: the gated model skips active units
    twin = to_dense(gated)
    assert [type(l).__name__ for l in twin.layers] == ["Dense", "Dense", "Dense", "Dense"]
    assert all(not isinstance(l, LowRankGatedDense) for l in twin.layers)
    x = rng.standard_normal((32, 20))
    h = x
    for layer in gated.layers[:2]:
        h = np.maximum(h @ layer.kernel.numpy().T.astype(np.float64) + layer.bias.numpy(), 0.0)
    tanh, logits = gated.layers[2], gated.layers[3]
    h = np.tanh(h @ tanh.kernel.numpy() + tanh.bias.numpy())
    expected = h @ logits.kernel.numpy() + logits.bias.numpy()
    np.testing.assert_allclose(twin.predict(x.astype("float32"), verbose=0), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(gated.predict(x.astype("float32"), verbose=0), expected, atol=1e-3)
    # Not shared: changing the twin leaves the gated model alone.
    twin.layers[0].kernel.assign(np.zeros(twin.layers[0].kernel.shape, "float32"))
    assert np.any(gated.layers[0].kernel.numpy() != 0)


def test_to_dense_of_nested_models_and_of_layers_without_bias(rng):
    model = functional_model(rng)
    gated = convert(model, rank=1.0)
    twin = to_dense(gated)
    assert not any(isinstance(l, LowRankGatedDense) for l in twin._flatten_layers(include_self=False))
    x = rng.standard_normal((16, 16)).astype("float32")
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    layer = LowRankGatedDense(6, rank=2, use_bias=False)
    layer.build((None, 5))
    dense = layer.to_dense()
    assert dense.bias is None and dense.name == layer.name
    np.testing.assert_array_equal(dense.kernel.numpy(), layer.kernel.numpy().T)


@pytest.mark.parametrize("estimator", ["input_svd", "svd", "joint"])
def test_calibration_uses_the_layers_own_estimator(rng, estimator):
    """ranks=None: U, V stay as they are and the margin is fitted to them (not to a fresh SVD)."""
    model, x = synthetic_task(rng)
    converted = convert(model, rank=3, estimator=estimator)
    layer = converted.get_layer("wide")
    own_u = 0.5 * rng.standard_normal(layer.estimator_u.shape).astype("float32")  # no SVD of anything
    layer.assign_estimator(own_u, layer.estimator_v)
    report = calibrate(converted, x, target_recall=0.9)
    np.testing.assert_array_equal(layer.estimator_u.numpy(), own_u)
    weights = (layer.kernel.numpy(), layer.bias.numpy(), own_u, layer.estimator_v.numpy())
    _, mask, z_hat, z = numpy_gated_dense(x, *weights, layer.margin)
    positive = z > 0
    recall = np.sum(mask & positive) / positive.sum()
    # Reached, and tight within one active unit: the next larger threshold would miss the target.
    assert recall >= 0.9 and recall - 1 / positive.sum() < 0.9 + 1e-9
    assert report.rows[0]["recall"] == pytest.approx(recall, abs=1e-6)


def test_calibration_to_a_target_density(rng):
    model, x = synthetic_task(rng)
    converted = convert(model, rank=4)
    report = calibrate(converted, x, target_density=0.2)
    layer = converted.get_layer("wide")
    _, mask, _, _ = numpy_gated_dense(x, *(w.numpy() for w in (layer.kernel, layer.bias, layer.estimator_u, layer.estimator_v)), layer.margin)
    assert abs(mask.mean() - 0.2) <= 1 / mask.size + 1e-9
    assert report.rows[0]["predicted_density"] == pytest.approx(mask.mean(), abs=1e-6)
    assert "predicted density 0.2" in str(report)


@pytest.mark.parametrize("density", [1.0, 1e-9])
def test_calibration_to_every_unit_or_none_keeps_a_finite_margin_and_loads(rng, tmp_path, density):
    """A margin of ±inf once made the calibrated model unloadable."""
    model, x = synthetic_task(rng)
    converted = convert(model, rank=4)
    calibrate(converted, x, target_density=density)
    layer = converted.get_layer("wide")
    assert np.isfinite(layer.margin)
    _, mask, _, _ = numpy_gated_dense(x, *(w.numpy() for w in (layer.kernel, layer.bias, layer.estimator_u, layer.estimator_v)), layer.margin)
    assert mask.mean() == (1.0 if density == 1.0 else 1 / mask.size)
    converted.save(tmp_path / "calibrated.keras")
    loaded = keras.models.load_model(tmp_path / "calibrated.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), converted.predict(x, verbose=0), rtol=1e-6, atol=1e-6)


def test_convert_fits_the_input_aware_estimator_to_sample_inputs(rng):
    """With sample inputs, each layer's U·V is the whitened SVD for the inputs that layer sees."""
    from test_estimators import whitened_svd_reference

    model = dense_model(rng)
    x = (rng.standard_normal((200, 20)) * np.linspace(3, 0.1, 20)).astype("float32")
    converted = convert(model, rank=3, sample_inputs=x)
    first, second = gated_layers(converted)
    expected = whitened_svd_reference(first.kernel.numpy(), x.T.astype(np.float64) @ x / len(x), 3)
    actual = first.estimator_u.numpy() @ first.estimator_v.numpy()
    np.testing.assert_allclose(actual, expected, atol=2e-3 * np.abs(expected).max())
    h = first(x).numpy()  # the second layer's inputs come through the gated first layer
    expected = whitened_svd_reference(second.kernel.numpy(), h.T.astype(np.float64) @ h / len(h), 3)
    np.testing.assert_allclose(second.estimator_u.numpy() @ second.estimator_v.numpy(), expected, atol=2e-3 * np.abs(expected).max())
    with pytest.raises(ValueError, match="sample_inputs must be finite; it has 1 NaN"):
        x[0, 0] = np.nan
        convert(model, rank=3, sample_inputs=x)
