import os
import threading
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import away_from_boundary, numpy_gated_dense

from lrc_keras import LowRankGatedDense, measure_gates, set_audit
from lrc_keras.estimators import InputSVDEstimator, JointEstimator, SVDEstimator
from lrc_keras.callbacks import EstimatorRefit


def built_layer(rng, input_dim=24, units=32, rank=4, **kwargs):
    layer = LowRankGatedDense(units, rank=rank, **kwargs)
    layer.build((None, input_dim))
    layer.kernel.assign(rng.standard_normal((units, input_dim)).astype("float32") / np.sqrt(input_dim))
    if layer.bias is not None:
        layer.bias.assign(0.1 * rng.standard_normal(units).astype("float32"))
    layer.refit()
    return layer


def weights_of(layer):
    bias = layer.bias.numpy() if layer.bias is not None else np.zeros(layer.units, "float32")
    return layer.kernel.numpy(), bias, layer.estimator_u.numpy(), layer.estimator_v.numpy()


@pytest.mark.parametrize("rank", [3, 24])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_output_matches_numpy_mask_semantics(rng, rank, training, margin):
    layer = built_layer(rng, rank=rank, margin=margin)
    x = rng.standard_normal((40, 24)).astype("float32")
    expected, mask, z_hat, _ = numpy_gated_dense(x, *weights_of(layer), margin)
    y = layer(x, training=training).numpy()
    keep = away_from_boundary(z_hat, margin)
    np.testing.assert_allclose(y[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert np.all(y[keep & ~mask] == 0.0), "skipped units must output exactly 0"
    assert 0.05 < mask.mean() < 0.95, "the test needs both computed and skipped units"


def test_full_rank_is_exactly_dense(rng):
    dense = keras.layers.Dense(16, activation="relu")
    x = rng.standard_normal((64, 16)).astype("float32")
    expected = dense(x).numpy()
    gated = LowRankGatedDense.from_dense(dense, rank=16)
    _, _, z_hat, z = numpy_gated_dense(x, *weights_of(gated), 0.0)
    # At full rank ẑ = z up to rounding, so every positive unit is computed.
    assert np.all((z_hat > 0) == (z > 0)) or np.max(np.abs(z[(z_hat > 0) != (z > 0)])) < 1e-4
    np.testing.assert_allclose(gated(x).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["svd", "input_svd", "joint"])
def test_refit_before_any_input_is_the_exact_truncated_svd(rng, estimator):
    layer = built_layer(rng, input_dim=30, units=20, rank=5, estimator=estimator)
    w = layer.kernel.numpy().T.astype(np.float64)
    approximation = layer.estimator_u.numpy() @ layer.estimator_v.numpy()
    singular_values = np.linalg.svd(w, compute_uv=False)
    error = np.linalg.norm(w - approximation)
    np.testing.assert_allclose(error, np.sqrt(np.sum(singular_values[5:] ** 2)), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(w - approximation, 2), singular_values[5], rtol=1e-4)


@pytest.mark.parametrize("estimator", ["svd", "input_svd", "joint"])
def test_a_subclassed_model_builds_the_layer_once_with_the_truncated_svd(estimator):
    """Keras builds a subclassed model's layers symbolically first, initialising their variables
    after build returns: the layer gets one set of variables and its estimator starts from the
    truncated SVD of the kernel it ends up with."""

    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = LowRankGatedDense(20, rank=5, estimator=estimator)

        def call(self, x):
            return self.hidden(x)

    model = Model()
    model(np.ones((2, 30), "float32"))
    assert [v.path for v in model.trainable_variables].count(model.hidden.kernel.path) == 1
    assert len(model.variables) == len(model.hidden.variables) == len({id(v) for v in model.variables})
    w = model.hidden.kernel.numpy().T.astype(np.float64)
    singular_values = np.linalg.svd(w, compute_uv=False)
    error = np.linalg.norm(w - model.hidden.estimator_u.numpy() @ model.hidden.estimator_v.numpy())
    np.testing.assert_allclose(error, np.sqrt(np.sum(singular_values[5:] ** 2)), rtol=1e-4)


@pytest.mark.parametrize("training_path", ["dense", "gated"])
def test_gradients_flow_only_through_computed_units(rng, training_path):
    layer = built_layer(rng, rank=3, training_path=training_path)
    x = tf.constant(rng.standard_normal((10, 24)).astype("float32"))
    upstream = rng.standard_normal((10, 32)).astype("float32")
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * upstream)
    grad_kernel, grad_bias, grad_x = tape.gradient(loss, [layer.kernel, layer.bias, x])
    _, mask, _, z = numpy_gated_dense(x.numpy(), *weights_of(layer), 0.0)
    grad_z = np.where(mask & (z > 0), upstream, 0.0)
    np.testing.assert_allclose(grad_kernel.numpy(), grad_z.T @ x.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_bias.numpy(), grad_z.sum(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_x.numpy(), grad_z @ layer.kernel.numpy(), rtol=1e-4, atol=1e-5)
    assert np.any(mask == False) and np.any(~mask & (z > 0)), "need false negatives to test"  # noqa: E712


def test_svd_estimator_variables_are_not_trainable(rng):
    layer = built_layer(rng, estimator="svd")
    assert {v.name for v in layer.trainable_variables} == {"kernel", "bias"}
    joint = built_layer(rng, estimator="joint")
    assert {v.name for v in joint.trainable_variables} == {"kernel", "bias", "estimator_factors"}


def small_classifier(rng, estimator=None, refit_every=200, **kwargs):
    estimator = estimator or SVDEstimator(refit_every=refit_every)
    model = keras.Sequential(
        [
            keras.Input((20,)),
            LowRankGatedDense(48, rank=4, estimator=estimator, **kwargs),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.05),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = rng.standard_normal((96, 20)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
    return model, x, y


def with_decaying_spectrum(rng, layer):
    """A kernel whose singular values decay, as trained layers' do: the svd estimator's
    in-training refits (one subspace iteration from the last factors) then equal the exact SVD."""
    units, input_dim = layer.kernel.shape
    layer.kernel.assign((rng.standard_normal((units, input_dim)) * 0.7 ** np.arange(input_dim)).astype("float32"))
    layer.refit()


def test_refit_runs_every_n_steps_inside_fit(rng):
    model, x, y = small_classifier(rng, refit_every=3)
    layer = model.layers[0]
    with_decaying_spectrum(rng, layer)
    snapshots = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            snapshots.append((layer.estimator_u.numpy().copy(), layer.kernel.numpy().copy()))

    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Record()])
    assert len(snapshots) == 6 and int(layer.estimator_state.training_steps.numpy()) == 6
    changed = [not np.array_equal(a[0], b[0]) for a, b in zip(snapshots, snapshots[1:])]
    # Steps 3 and 6 refit: U changes between the snapshots after steps 2→3 and 5→6 only.
    assert changed == [False, True, False, False, True]
    # The refit at step 6 used the kernel as it was before step 6's update.
    kernel_before_step_6 = snapshots[4][1]
    expected_u = _svd_u(kernel_before_step_6, 4)
    np.testing.assert_allclose(
        np.abs(snapshots[5][0]), np.abs(expected_u), rtol=1e-3, atol=1e-4
    )


def _svd_u(kernel, rank):
    _, s, vt = np.linalg.svd(kernel.astype(np.float64), full_matrices=False)
    return vt[:rank].T * np.sqrt(s[:rank])


def test_refit_never_when_refit_every_is_none(rng):
    model, x, y = small_classifier(rng, refit_every=None)
    before = model.layers[0].estimator_u.numpy().copy()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    np.testing.assert_array_equal(model.layers[0].estimator_u.numpy(), before)


def refit_steps(model, callback, epochs=2):
    """The optimizer steps after which `callback` refitted the first layer (96 rows, batch 16)."""
    layer = model.layers[0]
    steps = []
    refit = layer.refit
    layer.refit = lambda *args: (steps.append(int(model.optimizer.iterations.numpy())), refit(*args))
    model.fit(*model.train_data, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=[callback])
    return steps


@pytest.mark.parametrize(
    "callback, expected",
    [
        (lambda: EstimatorRefit(every_n_steps=5, on_epoch_end=False), [5, 10]),
        (lambda: EstimatorRefit(every_n_steps=None, on_epoch_end=True), [6, 12]),
        (lambda: EstimatorRefit(every_n_steps=4, on_epoch_end=True), [4, 6, 8, 12, 12]),
    ],
)
def test_svd_refit_callback_triggers(rng, callback, expected):
    model, x, y = small_classifier(rng, refit_every=None)
    model.train_data = (x, y)
    assert refit_steps(model, callback()) == expected


def test_svd_refit_callback_fits_the_current_kernel(rng):
    model, x, y = small_classifier(rng, refit_every=None)
    layer = model.layers[0]
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[EstimatorRefit(every_n_steps=3, on_epoch_end=False)])
    np.testing.assert_allclose(
        np.abs(layer.estimator_u.numpy()), np.abs(_svd_u(layer.kernel.numpy(), 4)), rtol=1e-3, atol=1e-4
    )
    with pytest.raises(ValueError, match="every_n_steps"):
        EstimatorRefit(every_n_steps=0)


@pytest.mark.parametrize("training_path", ["dense", "gated"])
def test_training_metrics_match_numpy(rng, training_path):
    sample_rows = 32  # the documented sample: the first 32 rows of each batch
    model, x, y = small_classifier(rng, refit_every=None, training_path=training_path)
    layer = model.layers[0]
    # One full batch with SGD(0): the mask and z seen in training are those of the weights now.
    model.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _, mask, _, z = numpy_gated_dense(x, *weights_of(layer), 0.0)
    history = model.fit(x, y, batch_size=48, epochs=1, shuffle=False, verbose=0).history
    # Training counts the first sampled rows of each batch of 48 (rows 0-31 and 48-79 for 32).
    counted = np.r_[0:sample_rows, 48:48 + sample_rows]
    mask, positive = mask[counted], z[counted] > 0
    expected = {
        "sign_accuracy": np.mean(mask == positive),
        "recall": np.sum(mask & positive) / np.sum(positive),
        "precision": np.sum(mask & positive) / np.sum(mask),
        "false_negative_rate": np.sum(~mask & positive) / np.sum(positive),
        "predicted_density": np.mean(mask),
        "true_density": np.mean(positive),
    }
    for key, value in expected.items():
        np.testing.assert_allclose(history[f"{layer.name}_{key}"][0], value, rtol=1e-5, err_msg=key)
    assert expected["recall"] < 1.0 and expected["precision"] < 1.0


@pytest.mark.parametrize("mask, positive, expected", [
    # nothing active and nothing computed: nothing missed, nothing wasted
    ([[0, 0], [0, 0]], [[0, 0], [0, 0]], dict(sign_accuracy=1, recall=1, precision=1, false_negative_rate=0,
                                             predicted_density=0, true_density=0)),
    # everything active, half computed
    ([[1, 0], [1, 0]], [[1, 1], [1, 1]], dict(sign_accuracy=0.5, recall=0.5, precision=1, false_negative_rate=0.5,
                                             predicted_density=0.5, true_density=1)),
    # one of each: tp, fp, fn, tn
    ([[1, 1], [0, 0]], [[1, 0], [1, 0]], dict(sign_accuracy=0.5, recall=0.5, precision=0.5, false_negative_rate=0.5,
                                             predicted_density=0.5, true_density=0.5)),
])
def test_gate_rates_including_empty_denominators(mask, positive, expected):
    from lrc_keras.metrics import GATE_RATES, confusion_counts, rates_from_counts

    rates = rates_from_counts(confusion_counts(tf.constant(np.array(mask, bool)), tf.constant(np.array(positive, bool)))).numpy()
    assert dict(zip(GATE_RATES, rates.tolist())) == pytest.approx(expected)


def test_unmeasured_gate_metrics_are_nan(rng):
    model, x, y = small_classifier(rng)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)  # inference never sees z
    assert np.isnan(logs[f"{model.layers[0].name}_recall"])


def test_audit_measures_gate_in_evaluate(rng):
    model, x, y = small_classifier(rng)
    layer = model.layers[0]
    set_audit(model, True)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    _, mask, _, _ = numpy_gated_dense(x, *weights_of(layer), 0.0)
    np.testing.assert_allclose(logs[f"{layer.name}_predicted_density"], mask.mean(), rtol=1e-5)
    set_audit(model, False)
    assert layer.audit is False


def test_predict_leaves_every_variable_unchanged(rng):
    """Inference is pure: after training, predict and a direct call write no variable (the density
    "auto" compares is the one training recorded)."""
    model, x, y = small_classifier(rng, estimator=InputSVDEstimator(refit_every=2))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    before = [v.numpy().copy() for v in model.variables]
    assert float(model.layers[0].observed_density.numpy()) > 0
    model.predict(x[:33], verbose=0)
    model(x[:5])
    for variable, value in zip(model.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


def test_measure_gates_reports_the_gate_and_records_its_density(rng):
    model, x, _ = small_classifier(rng)
    layer = model.layers[0]
    layer.margin = 0.3
    (report,) = measure_gates(model, x)
    _, mask, _, z = numpy_gated_dense(x, *weights_of(layer), 0.3)
    assert 0.05 < mask.mean() < 0.95
    assert report["layer"] == layer.name
    np.testing.assert_allclose(report["predicted_density"], mask.mean(), atol=1e-6)
    np.testing.assert_allclose(report["true_density"], (z > 0).mean(), atol=1e-6)
    np.testing.assert_allclose(report["recall"], (mask & (z > 0)).sum() / (z > 0).sum(), atol=1e-6)
    np.testing.assert_allclose(float(layer.observed_density.numpy()), mask.mean(), atol=1e-6)


def test_joint_estimator_loss_improves_recall(rng):
    tf.random.set_seed(0)
    model, x, y = small_classifier(rng, estimator=JointEstimator(loss_weight=1.0))
    layer = model.layers[0]
    # Freeze the network so that only the estimator learns; start from a poor estimator.
    layer.kernel.trainable = False
    layer.bias.trainable = False
    model.layers[1].trainable = False
    layer.assign_estimator(0.1 * rng.standard_normal(layer.estimator_u.shape).astype("float32"), layer.estimator_v)
    model.compile(keras.optimizers.Adam(0.02), keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def recall():
        _, mask, _, z = numpy_gated_dense(x, *weights_of(layer), 0.0)
        return np.sum(mask & (z > 0)) / np.sum(z > 0)

    kernel_before, recall_before = layer.kernel.numpy().copy(), recall()
    model.fit(x, y, batch_size=32, epochs=15, verbose=0)
    assert recall() > recall_before + 0.1, (recall_before, recall())
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel_before)
    assert len(model.losses) == 1


@pytest.mark.parametrize("training_path", ["dense", "gated"])
def test_joint_loss_is_the_weighted_cross_entropy_of_the_sampled_rows(rng, training_path):
    sample_rows = 32  # the documented sample: the first 32 rows of each batch
    layer = built_layer(rng, estimator=JointEstimator(loss_weight=0.5, positive_weight=3.0), training_path=training_path)
    x = rng.standard_normal((40, 24)).astype("float32")
    layer(x, training=True)
    _, _, z_hat, z = numpy_gated_dense(x[:sample_rows], *weights_of(layer), 0.0)  # the first rows of 40
    labels = (z > 0).astype(np.float64)
    log_sigmoid = -np.logaddexp(0.0, -z_hat)
    log_one_minus = -np.logaddexp(0.0, z_hat)
    expected = 0.5 * np.mean(-(3.0 * labels * log_sigmoid + (1 - labels) * log_one_minus))
    np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-5)


def test_joint_loss_does_not_pull_kernel_or_bias(rng):
    layer = built_layer(rng, estimator=JointEstimator(loss_weight=1.0))
    x = tf.constant(rng.standard_normal((8, 24)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        layer(x, training=True)
        auxiliary = tf.add_n(layer.losses)
    grads = tape.gradient(auxiliary, [layer.kernel, layer.bias, x, layer.estimator_factors])
    assert grads[0] is None and grads[1] is None and grads[2] is None
    grad_u, grad_v = np.split(grads[3].numpy(), [24 * layer.rank])  # U (24, rank), then V
    assert np.abs(grad_u).sum() > 0 and np.abs(grad_v).sum() > 0


def test_from_dense_copies_weights_and_fits_svd(rng):
    dense = keras.layers.Dense(12, activation="relu", name="hidden")
    x = rng.standard_normal((5, 9)).astype("float32")
    dense(x)
    gated = LowRankGatedDense.from_dense(dense, rank=3, margin=0.1, estimator="svd")
    assert gated.name == "hidden" and gated.margin == 0.1
    np.testing.assert_array_equal(gated.kernel.numpy(), dense.kernel.numpy().T)
    np.testing.assert_array_equal(gated.bias.numpy(), dense.bias.numpy())
    np.testing.assert_allclose(np.abs(gated.estimator_u.numpy()), np.abs(_svd_u(gated.kernel.numpy(), 3)), rtol=1e-3, atol=1e-5)
    weights = gated.get_weights()
    # kernel, bias, margin, observed density, rank, then estimator_state's U then V and steps
    assert [w.shape for w in weights] == [(12, 9), (12,), (), (), (), (9 * 3 + 3 * 12,), ()]
    # The default estimator adds its buffer of 1024 input rows, the rows seen and since the last refit.
    default = LowRankGatedDense.from_dense(dense, rank=3)
    assert [w.shape for w in default.get_weights()] == [
        (12, 9), (12,), (), (), (), (9 * 3 + 3 * 12,), (), (1024, 9), (), ()]


def test_from_dense_rejects_what_it_cannot_copy():
    with pytest.raises(ValueError, match="ReLU activation.*'tanh_layer'.*tanh"):
        LowRankGatedDense.from_dense(keras.layers.Dense(4, activation="tanh", name="tanh_layer"), rank=2)
    with pytest.raises(ValueError, match="not built"):
        LowRankGatedDense.from_dense(keras.layers.Dense(4, activation="relu"), rank=2)
    with pytest.raises(ValueError, match="keras.layers.Dense"):
        LowRankGatedDense.from_dense(keras.layers.ReLU(), rank=2)


ESTIMATORS_TO_SAVE = [
    (JointEstimator(loss_weight=0.5), {}),
    (SVDEstimator(refit_every=2), {"target_density": 0.5}),  # with the density target's variable
    (InputSVDEstimator(refit_every=2, buffer_rows=64), {}),
]


@pytest.mark.parametrize("estimator, settings", ESTIMATORS_TO_SAVE)
def test_save_and_load_round_trip(rng, tmp_path, estimator, settings):
    model, x, y = small_classifier(rng, estimator=estimator, margin=0.2, **settings)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    layer = model.layers[0]
    layer.assign_estimator(layer.estimator_u, layer.estimator_v * 1.5)  # not a fit of anything any more
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    restored = loaded.layers[0]
    assert [v.name for v in restored.weights] == [v.name for v in layer.weights]
    for original, variable in zip(layer.weights, restored.weights):
        np.testing.assert_array_equal(original.numpy(), variable.numpy(), err_msg=variable.name)
    assert int(restored.estimator_state.training_steps.numpy()) == 6
    config = restored.get_config()
    assert (config["estimator"]["class_name"], config["margin"], config["rank"], config["units"]) == (
        type(estimator).__name__, 0.2, 4, 48)
    assert config == layer.get_config() and restored.estimator == estimator


@pytest.mark.parametrize("estimator, settings", ESTIMATORS_TO_SAVE)
def test_set_rank_then_fit_predict_save_and_load(rng, tmp_path, estimator, settings):
    """set_rank remakes the estimator's variables in its nested layer: the model then has them
    and no other (a joint estimator trains the new factors), the state keeps its values, and the
    model trains, predicts as the numpy reference and saves and loads at the new rank."""
    model, x, y = small_classifier(rng, estimator=estimator, **settings)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    layer = model.layers[0]
    state = {v.name: v.numpy() for v in layer.estimator_state.weights if v is not layer.estimator_factors}
    layer.set_rank(2)
    assert layer.estimator_factors.shape == (2 * (20 + 48),) and int(layer.estimator_rank.numpy()) == 2
    for variable in layer.estimator_state.weights[1:]:
        np.testing.assert_array_equal(variable.numpy(), state.pop(variable.name), err_msg=variable.name)
    assert not state, "every state variable is made again"
    fresh, _, _ = small_classifier(rng, estimator=estimator, **settings)
    assert [v.name for v in model.weights] == [v.name for v in fresh.weights]
    assert any(v is layer.estimator_factors for v in model.trainable_weights) == estimator.trainable
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    factors = layer.estimator_factors.numpy()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(layer.estimator_state.training_steps.numpy()) == 12
    assert not np.array_equal(layer.estimator_factors.numpy(), factors), "trained or refitted at rank 2"
    expected, _, z_hat, _ = numpy_gated_dense(x, *weights_of(layer), 0.0)
    keep = away_from_boundary(z_hat, 0.0)
    hidden = keras.Model(model.inputs, layer.output)
    np.testing.assert_allclose(hidden.predict(x, verbose=0)[keep], expected[keep], rtol=1e-5, atol=1e-5)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[0].rank == 2
    np.testing.assert_array_equal(loaded.layers[0].estimator_factors.numpy(), layer.estimator_factors.numpy())
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_the_package_uses_no_private_keras_tracking():
    """set_rank remakes variables through the nested layer's public behaviour, not Keras' tracker."""
    package = os.path.join(os.path.dirname(__file__), os.pardir, "lrc_keras")
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), encoding="utf-8") as source:
                text = source.read()
            assert "_untrack_variable" not in text and "_tracker" not in text, name


CONSTRUCTOR_ARGUMENTS = {
    "units": 7, "rank": 2, "estimator": JointEstimator(loss_weight=0.25, positive_weight=2.5), "margin": 0.5,
    "use_bias": False, "inference_path": "gemm", "regularize_skipped_units": False, "training_path": "gated",
}


def test_config_round_trip():
    """get_config() returns every constructor argument with the value given (none dropped)."""
    layer = LowRankGatedDense(
        **CONSTRUCTOR_ARGUMENTS,
        kernel_regularizer=keras.regularizers.L2(1e-3), activity_regularizer=keras.regularizers.L1(1e-4),
        kernel_constraint=keras.constraints.MaxNorm(0.5, axis=0), bias_constraint=keras.constraints.NonNeg(),
    )
    config = layer.get_config()
    for key, value in CONSTRUCTOR_ARGUMENTS.items():
        if key == "estimator":  # nested as Keras nests any serialisable object
            assert config[key]["class_name"] == "JointEstimator"
            assert config[key]["config"] == {"loss_weight": 0.25, "positive_weight": 2.5}
        else:
            assert config[key] == value, key
    assert config["kernel_regularizer"]["config"]["l2"] == pytest.approx(1e-3)
    assert config["activity_regularizer"]["config"]["l1"] == pytest.approx(1e-4)
    assert config["kernel_constraint"]["config"]["max_value"] == 0.5
    assert config["bias_constraint"]["class_name"] == "NonNeg"
    clone = LowRankGatedDense.from_config(config)
    for key, value in CONSTRUCTOR_ARGUMENTS.items():
        assert getattr(clone, key) == value, key
    assert clone.get_config() == config
    # Every parameter of the constructor is in the config.
    import inspect

    parameters = set(inspect.signature(LowRankGatedDense.__init__).parameters) - {"self", "kwargs"}
    assert parameters <= set(config), parameters - set(config)


@pytest.mark.parametrize("training_path", ["dense", "gated"])
def test_constraints_act_as_on_dense_after_each_step(rng, training_path):
    """MaxNorm(axis=0) caps each unit's weight vector, as on Dense's (input_dim, units) kernel."""
    model, x, y = small_classifier(rng, training_path=training_path, kernel_constraint=keras.constraints.MaxNorm(0.5, axis=0),
                                   bias_constraint=keras.constraints.NonNeg())
    layer = model.layers[0]
    layer.kernel.assign(rng.standard_normal((48, 20)).astype("float32"))  # every unit far above the cap
    layer.bias.assign(rng.standard_normal(48).astype("float32"))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    unit_norms = np.linalg.norm(layer.kernel.numpy().astype(np.float64), axis=1)
    # At the cap after the last step's projection, or just under it where that step shrank the unit.
    assert unit_norms.max() <= 0.5 * (1 + 1e-6) and np.median(unit_norms) > 0.49, unit_norms
    assert layer.bias.numpy().min() == 0.0
    dense = layer.to_dense()
    assert dense.kernel_constraint is layer.kernel_constraint and dense.bias_constraint is layer.bias_constraint
    assert LowRankGatedDense.from_dense(dense, rank=4).kernel_constraint is layer.kernel_constraint


@pytest.mark.parametrize("training_path", ["dense", "gated"])
@pytest.mark.parametrize("regularize_skipped_units", [True, False])
@pytest.mark.parametrize("shape", [(6, 24), (2, 3, 24)])
def test_activity_regularizer_charges_true_or_gated_activity(rng, regularize_skipped_units, shape, training_path):
    """L1 on relu(z) of every unit (default) or of computed units only, per example of the batch
    (a batch of at most 32 rows: the sample is the whole batch)."""
    layer = built_layer(rng, activity_regularizer=keras.regularizers.L1(0.01),
                        regularize_skipped_units=regularize_skipped_units, training_path=training_path)
    for _ in range(20):  # inputs whose gate decisions float32 rounding cannot flip
        x = rng.standard_normal(shape).astype("float32")
        _, mask, z_hat, z = numpy_gated_dense(x.reshape(-1, 24), *weights_of(layer), 0.0)
        if away_from_boundary(z_hat, 0.0).all():
            break
    assert away_from_boundary(z_hat, 0.0).all() and np.any(~mask & (z > 0)), "needs skipped active units"
    charged = (z > 0) if regularize_skipped_units else (z > 0) & mask
    with tf.GradientTape() as tape:
        layer(x, training=True)
        penalty = tf.add_n(layer.losses)
    batch = shape[0]  # Keras divides activity penalties by the leading dimension
    np.testing.assert_allclose(float(penalty), 0.01 * np.sum(np.where(charged, z, 0.0)) / batch, rtol=1e-4)
    # d penalty / d b_j = 0.01 · (number of charged entries of unit j) / batch
    np.testing.assert_allclose(tape.gradient(penalty, layer.bias).numpy(), 0.01 * charged.sum(axis=0) / batch,
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("training_path", ["dense", "gated"])
def test_the_sampled_skipped_unit_penalty_is_the_full_one_in_expectation(rng, training_path):
    """Past the sampled rows the skipped units are charged on the sample, scaled to the batch:
    over every part of a 64-row batch in turn, penalty and gradient average to the full ones."""
    sample_rows = 32  # the documented sample: the first 32 rows of each batch
    layer = built_layer(rng, activity_regularizer=keras.regularizers.L1(0.01), training_path=training_path)
    for _ in range(50):  # inputs whose gate decisions float32 rounding cannot flip
        x = rng.standard_normal((64, 24)).astype("float32")
        _, mask, z_hat, z = numpy_gated_dense(x, *weights_of(layer), 0.0)
        if away_from_boundary(z_hat, 0.0, tolerance=1e-4).all():
            break
    assert away_from_boundary(z_hat, 0.0, tolerance=1e-4).all() and np.any(~mask[:sample_rows] & (z[:sample_rows] > 0))
    skipped = np.where(~mask & (z > 0), z, 0.0)
    penalties, gradients = [], []
    for shift in range(0, 64, sample_rows):
        with tf.GradientTape() as tape:
            layer(np.roll(x, -shift, axis=0), training=True)
            skipped_penalty = layer.losses[0]  # Keras adds its own output penalty after call()
        penalties.append(float(skipped_penalty))
        gradients.append(tape.gradient(skipped_penalty, layer.bias).numpy())
    scale = 64 / sample_rows
    np.testing.assert_allclose(penalties[0], 0.01 * skipped[:sample_rows].sum() * scale / 64, rtol=1e-4)
    np.testing.assert_allclose(np.mean(penalties), 0.01 * skipped.sum() / 64, rtol=1e-4)
    np.testing.assert_allclose(np.mean(gradients, axis=0), 0.01 * (skipped > 0).sum(axis=0) / 64, rtol=1e-4, atol=1e-7)


def test_skipped_units_are_not_charged_in_inference(rng):
    """Audited inference computes z too, but charges only the output, as Keras does."""
    layer = built_layer(rng, activity_regularizer=keras.regularizers.L1(0.01))
    layer.audit = True
    x = rng.standard_normal((6, 24)).astype("float32")
    expected, mask, z_hat, z = numpy_gated_dense(x, *weights_of(layer), 0.0)
    assert away_from_boundary(z_hat, 0.0).all() and np.any(~mask & (z > 0)), "needs skipped active units"
    layer(x, training=False)
    np.testing.assert_allclose(float(tf.add_n(layer.losses)), 0.01 * expected.sum() / 6, rtol=1e-4)


def test_rank_3_inputs_act_on_last_axis(rng):
    layer = built_layer(rng)
    x = rng.standard_normal((3, 5, 24)).astype("float32")
    y = layer(x).numpy()
    assert y.shape == (3, 5, 32)
    expected, _, z_hat, _ = numpy_gated_dense(x.reshape(15, 24), *weights_of(layer), 0.0)
    keep = away_from_boundary(z_hat, 0.0)
    np.testing.assert_allclose(y.reshape(15, 32)[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_use_bias_false(rng):
    layer = built_layer(rng, use_bias=False)
    x = rng.standard_normal((20, 24)).astype("float32")
    expected, _, z_hat, _ = numpy_gated_dense(x, *weights_of(layer), 0.0)
    keep = away_from_boundary(z_hat, 0.0)
    np.testing.assert_allclose(layer(x).numpy()[keep], expected[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training_path", ["dense", "gated"])
def test_nan_inputs_give_nan_outputs(rng, training_path):
    layer = built_layer(rng, training_path=training_path)
    x = rng.standard_normal((2, 24)).astype("float32")
    x[1, 3] = np.nan
    for training in (False, True):
        y = layer(x, training=training).numpy()
        assert np.all(np.isnan(y[1])) and not np.any(np.isnan(y[0]))


def test_fit_under_mirrored_strategy(rng, mirrored_strategy):
    with mirrored_strategy.scope():
        model, x, y = small_classifier(rng, refit_every=2)
    layer = model.layers[0]
    with_decaying_spectrum(rng, layer)
    kernels = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            kernels.append(layer.kernel.numpy().copy())

    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[Record()])
    assert int(layer.estimator_state.training_steps.numpy()) == 6
    # The last refit happened at step 6, before its update: U is the SVD of the kernel after step 5.
    np.testing.assert_allclose(np.abs(layer.estimator_u.numpy()), np.abs(_svd_u(kernels[4], 4)), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"units": 0, "rank": 1}, "units must be a positive integer, got units=0"),
        ({"units": 4, "rank": 0}, "rank must be a positive integer, got rank=0"),
        ({"units": 4, "rank": 2.5}, "rank must be a positive integer, got rank=2.5"),
        ({"units": 4, "rank": 2, "estimator": "pca"}, "estimator must be one of .*'pca'"),
        ({"units": 4, "rank": 2, "refit_every": 5}, r"refit_every is a setting of the estimator now: pass "
                                                    r"estimator=InputSVDEstimator\(refit_every=...\)"),
        ({"units": 4, "rank": 2, "margin": float("nan")}, "margin must be a finite number"),
        ({"units": 4, "rank": 2, "margin": float("inf")}, "margin must be a finite number, got margin=inf"),
        ({"units": 4, "rank": 2, "estimator_loss_weight": -1}, "estimator_loss_weight is a setting of the estimator"),
        ({"units": 4, "rank": 2, "activation": "tanh"}, "ReLU layer.*activation='tanh'"),
        ({"units": 4, "rank": 2, "regularize_skipped_units": "yes"}, "regularize_skipped_units=.yes."),
        ({"units": 4, "rank": 2, "training_path": "sparse"}, r"training_path must be one of \('auto', 'dense', 'gated'\), got 'sparse'"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowRankGatedDense(**kwargs)


def test_bad_build_and_call_inputs():
    layer = LowRankGatedDense(8, rank=6)
    with pytest.raises(ValueError, match=r"rank=6 exceeds min\(input_dim, units\) = min\(5, 8\) = 5"):
        layer.build((None, 5))
    assert not layer.built and not layer.weights, "nothing may be half-built"
    with pytest.raises(ValueError, match="last dimension of the input must be known"):
        LowRankGatedDense(8, rank=2).build((None, None))
    with pytest.raises(TypeError, match="must be floating point, got dtype int32"):
        LowRankGatedDense(8, rank=2)(np.ones((2, 5), "int32"))


def test_numpy_scalars_are_numbers_and_bools_are_not():
    layer = LowRankGatedDense(
        np.int64(8), rank=np.int32(2), estimator=SVDEstimator(refit_every=np.int64(5)), margin=np.float32(0.25),
    )
    config = layer.get_config()
    refit_every = config["estimator"]["config"]["refit_every"]
    assert (config["units"], config["rank"], refit_every, config["margin"]) == (8, 2, 5, 0.25)
    assert all(type(value) in (int, float) for value in (config["units"], config["rank"], refit_every, config["margin"]))
    joint = JointEstimator(loss_weight=np.float64(0.5), positive_weight=np.float32(2.0)).get_config()
    assert joint == {"loss_weight": 0.5, "positive_weight": 2.0} and all(type(v) is float for v in joint.values())
    for kwargs, message in [
        ({"units": True}, "units must be a positive integer, got units=True"),
        ({"rank": np.bool_(True)}, "rank must be a positive integer"),
        ({"margin": True}, "margin must be a finite number, got margin=True"),
        ({"margin": "0.1"}, "margin must be a finite number, got margin='0.1'"),
    ]:
        with pytest.raises(ValueError, match=message):
            LowRankGatedDense(**{"units": 8, "rank": 2, **kwargs})
    with pytest.raises(ValueError, match="refit_every must be a positive integer or None, got refit_every=False"):
        SVDEstimator(refit_every=False)


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 0.05), ("float16", 5e-3), ("mixed_bfloat16", 0.05)])
def test_low_precision_layers_train_and_infer(rng, monkeypatch, dtype, tolerance):
    from lrc_keras import dispatch

    monkeypatch.setattr(dispatch, "_warned", set())
    model = keras.Sequential([keras.Input((12,)), LowRankGatedDense(16, rank=3, dtype=dtype), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    x = rng.standard_normal((32, 12)).astype("float32")
    model.fit(x, np.zeros(32), epochs=1, verbose=0)
    layer = model.layers[0]
    with pytest.warns(RuntimeWarning, match=f"float32 only and the inputs are {dtype.split('_')[-1]}") as record:
        y = layer(x)
        layer(x)
    assert len(record) == 1, "warned once"
    weights = [np.asarray(w, np.float64) for w in weights_of(layer)]
    expected, _, z_hat, _ = numpy_gated_dense(x, *weights, 0.0)
    keep = away_from_boundary(z_hat, 0.0, tolerance=0.1)
    np.testing.assert_allclose(np.asarray(y, np.float64)[keep], expected[keep], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("version", ["449377d", "43b1cca", "2ba6826"])
@pytest.mark.parametrize("estimator, expected", [
    ("input_svd", InputSVDEstimator(refit_every=3)), ("svd", SVDEstimator(refit_every=3)), ("joint", JointEstimator()),
])
def test_models_saved_by_earlier_versions_still_load(version, estimator, expected):
    """tests/data holds tiny models saved by lrc-keras 449377d (estimator settings on the layer,
    a d×d input moment), 43b1cca (U and V in two variables) and 2ba6826 (the estimator's variables
    on the layer itself; svd's with a density target), made by tests/data/save_fixtures.py: they
    load with their weights, settings, state and predictions."""
    data = os.path.join(os.path.dirname(__file__), "data", f"legacy_{version}_{estimator}")
    saved = dict(np.load(data + ".npz"))
    model = keras.models.load_model(data + ".keras")
    layer = model.layers[0]
    assert layer.estimator == expected and layer.margin == 0.25
    x, y_pred = saved.pop("x"), saved.pop("y_pred")
    if version in ("449377d", "43b1cca"):
        del saved["observed_density"]  # their npz was written after predict, which then wrote it
    variables = {v.name: v.numpy() for v in layer.weights}
    variables.update(estimator_u=layer.estimator_u.numpy(), estimator_v=layer.estimator_v.numpy())
    assert {"kernel", "bias", "estimator_u", "estimator_v", "training_steps"} <= set(saved)
    assert set(saved) - set(variables) <= {"input_moment", "input_count"}  # 449377d's moment has no place now
    for name, value in ((name, value) for name, value in saved.items() if name in variables):
        np.testing.assert_array_equal(variables[name], value, err_msg=name)
    np.testing.assert_allclose(model.predict(x, verbose=0), y_pred, rtol=1e-6, atol=1e-6)


def test_a_saved_layer_of_no_known_layout_is_refused_with_its_size():
    layer = LowRankGatedDense(4, rank=2, estimator="svd")
    layer.build((None, 3))
    store = {str(index): np.zeros(1, "float32") for index in range(2)}
    with pytest.raises(ValueError, match=r"the saved layer has 2 variables; this version expects 5 \(kernel, bias, "
                                         r"gate_margin, observed_density, estimator_rank\) and reads earlier versions' "
                                         r"7 \(estimator on the layer layout\) or 8 \(separate factors layout\) or 6 "
                                         r"\(layer settings layout\)\. Re-save"):
        layer.load_own_variables(store)


def test_a_margin_change_reaches_compiled_functions(rng):
    model = keras.Sequential([keras.Input((16,)), LowRankGatedDense(64, rank=8)])
    x = rng.standard_normal((100, 16)).astype("float32")
    model.predict(x, verbose=0)  # traces and caches the predict function
    layer = model.layers[0]
    layer.margin = -0.5
    expected, _, z_hat, _ = numpy_gated_dense(x, *weights_of(layer), -0.5)
    keep = away_from_boundary(z_hat, -0.5)
    np.testing.assert_allclose(model.predict(x, verbose=0)[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert model.get_config()["layers"][1]["config"]["margin"] == -0.5


@pytest.mark.parametrize("margin", [float("nan"), float("inf"), "0.1"])
def test_a_non_finite_margin_is_refused_when_assigned(rng, margin):
    layer = built_layer(rng, margin=0.2)
    with pytest.raises(ValueError, match=f"{layer.name}: margin must be a finite number, got margin="):
        layer.margin = margin
    assert layer.margin == 0.2 and float(layer.gate_margin.numpy()) == pytest.approx(0.2)


def test_the_margin_has_one_home_once_built(rng):
    """The gate_margin variable is the margin once built: assigned (or loaded) there, the layer and
    its config read it, as the decimal the user would have written."""
    layer = built_layer(rng, margin=0.2)
    layer.gate_margin.assign(0.7)
    assert layer.margin == 0.7 and layer.get_config()["margin"] == 0.7
    layer.margin = -0.1
    assert float(layer.gate_margin.numpy()) == np.float32(-0.1) and layer.get_config()["margin"] == -0.1


@pytest.mark.parametrize("call", ["predict", "evaluate", "fit"])
def test_functions_traced_before_set_rank_fail_with_a_message(rng, call):
    model, x, y = small_classifier(rng)
    getattr(model, call)(x, y, verbose=0) if call != "predict" else model.predict(x, verbose=0)
    model.layers[0].set_rank(1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="set_rank changed the rank of the estimator .* compile the model again"):
        getattr(model, call)(x, y, verbose=0) if call != "predict" else model.predict(x, verbose=0)
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    layer = model.layers[0]
    expected, _, z_hat, _ = numpy_gated_dense(x, *weights_of(layer), 0.0)
    keep = away_from_boundary(z_hat, 0.0)
    hidden = keras.Model(model.inputs, layer.output)
    np.testing.assert_allclose(hidden.predict(x, verbose=0)[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_a_huge_finite_input_row_cannot_switch_gating_off(rng):
    """A row of 1e20 once made the input statistics inf and every later factor NaN."""
    layer = built_layer(rng, input_dim=16, units=32, rank=4, estimator=InputSVDEstimator(refit_every=1))
    x = rng.standard_normal((64, 16)).astype("float32")
    huge = x.copy()
    huge[0] = 1e20
    layer.refit(huge)
    assert np.all(np.isfinite(layer.estimator_u.numpy())) and np.all(np.isfinite(layer.estimator_v.numpy()))
    layer(huge, training=True)  # buffered and refitted from in the train step
    for _ in range(40):  # clean steps push the huge row out of the 1024-row buffer
        layer(x, training=True)
    _, mask, _, _ = numpy_gated_dense(x, *weights_of(layer), 0.0)
    assert np.all(np.isfinite(layer.estimator_u.numpy())) and 0.2 < mask.mean() < 0.8


def test_a_refit_never_stores_non_finite_factors(rng):
    layer = built_layer(rng, estimator=InputSVDEstimator(refit_every=1))
    before = layer.estimator_u.numpy().copy(), layer.estimator_v.numpy().copy()
    layer.kernel.assign(np.full(layer.kernel.shape, np.nan, "float32"))
    with pytest.warns(RuntimeWarning, match=f"{layer.name}: the refit gave non-finite factors"):
        layer.refit()
    np.testing.assert_array_equal(layer.estimator_u.numpy(), before[0])
    layer(rng.standard_normal((4, 24)).astype("float32"), training=True)  # an in-graph refit keeps them too
    np.testing.assert_array_equal(layer.estimator_v.numpy(), before[1])


@pytest.mark.parametrize("sample, message", [
    ([[1.0, 2.0], [3.0]], "sample_inputs must be a 2-D array of numbers"),
    (np.where(np.eye(24)[:3] > 0, 1e39, 0.0), "sample_inputs row 0 holds 1e.39, beyond float32's range"),
])
def test_unclear_sample_inputs_get_a_clear_error(rng, sample, message):
    layer = built_layer(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the clear error alone, no numpy warning before it
        with pytest.raises(ValueError, match=message):
            layer.refit(sample)


def test_inference_during_refits_sees_one_estimator_or_the_other(rng):
    """Refits alternating between two sample sets while 4 threads infer: every output is the
    layer's output under the first fit or under the second, never under a mix of their factors."""
    layer = built_layer(rng, input_dim=16, units=64, rank=4, estimator="input_svd")
    x = rng.standard_normal((32, 16)).astype("float32")
    samples = [rng.standard_normal((64, 16)).astype("float32") * scale for scale in (np.ones(16), np.arange(16.0))]
    infer = tf.function(lambda x: layer(x))
    expected = []
    for sample in samples:
        layer.refit(sample)
        _, mask, _, _ = numpy_gated_dense(x, *weights_of(layer), 0.0)
        expected.append((infer(x).numpy(), mask))
    assert not np.array_equal(expected[0][1], expected[1][1]), "the two fits must gate differently"
    stop, mixed = threading.Event(), []

    def infer_until_stopped():
        while not stop.is_set():
            y = infer(x).numpy()
            if not any(np.allclose(y, fitted, rtol=1e-6, atol=1e-6) for fitted, _ in expected):
                mixed.append(y)

    threads = [threading.Thread(target=infer_until_stopped) for _ in range(4)]
    for thread in threads:
        thread.start()
    for refit in range(60):
        layer.refit(samples[refit % 2])
    stop.set()
    for thread in threads:
        thread.join()
    assert not mixed, f"{len(mixed)} of the outputs came from a mix of the two fits' factors"
