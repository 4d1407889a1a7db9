"""The estimate stage: the estimator rules against float64 numpy references."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from lrc_keras import LowRankGatedDense, estimators
from lrc_keras.estimators import InputSVDEstimator, JointEstimator, SVDEstimator, reduced_rank_factors


def reduced_rank_reference(kernel, rows, rank, ridge=1e-3):
    """float64 reduced-rank regression: the rank-r B minimising ‖X(W − B)‖² + λ‖W − B‖²,
    λ = ridge·‖X‖²_F/d, is W·P·Pᵀ with P the top right singular vectors of [X·W; √λ·W]."""
    w = kernel.T.astype(np.float64)
    x = np.asarray(rows, np.float64)
    ridge_term = ridge * np.sum(x**2) / w.shape[0] + 1e-30
    _, _, right_t = np.linalg.svd(np.vstack([x @ w, np.sqrt(ridge_term) * w]), full_matrices=False)
    return w @ right_t[:rank].T @ right_t[:rank]


def whitened_svd_reference(kernel, moment, rank, ridge=1e-3):
    """float64: U·V minimising ‖Lᵀ(W − U·V)‖ with L·Lᵀ = C + ridge·tr(C)/d·I, by Cholesky and a
    full SVD (the d×d formulation the estimator avoids; an independent check of the same optimum)."""
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


def decaying_kernel(rng, units, input_dim):
    """A kernel with a decaying spectrum, as trained layers have: the subspace iteration converges."""
    return (rng.standard_normal((units, input_dim)) * 0.7 ** np.arange(input_dim)).astype(np.float32)


def product(factors):
    u, v = factors
    return np.asarray(u, np.float64) @ np.asarray(v, np.float64)


@pytest.mark.parametrize("input_dim, units, rank", [(30, 40, 5), (50, 20, 8)])
def test_reduced_rank_factors_match_numpy(rng, input_dim, units, rank):
    x = correlated_inputs(rng, 400, input_dim)
    kernel = decaying_kernel(rng, units, input_dim)
    expected = reduced_rank_reference(kernel, x, rank)
    # The same optimum through the inputs' second moment, C = XᵀX (ridge relative to its trace).
    np.testing.assert_allclose(whitened_svd_reference(kernel, x.T @ x, rank), expected, atol=1e-9 * np.abs(expected).max())
    actual = product(reduced_rank_factors(kernel, x.astype(np.float32), rank, seed=[1, 2]))
    np.testing.assert_allclose(actual, expected, atol=2e-4 * np.abs(expected).max())
    # What it is for: x·U·V reproduces x·W better than the plain SVD does on these inputs.
    w = kernel.T.astype(np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    plain = u[:, :rank] * s[:rank] @ vt[:rank]
    assert np.linalg.norm(x @ (w - actual)) < 0.9 * np.linalg.norm(x @ (w - plain))


def test_svd_refits_in_training_track_the_exact_truncated_svd(rng):
    """One subspace iteration from the factors of a nearby kernel (the last refit's) gives the
    truncated SVD of the kernel now, as numpy's full SVD computes it."""
    kernel = decaying_kernel(rng, 40, 30)
    moved = kernel + 0.01 * rng.standard_normal(kernel.shape).astype(np.float32) * np.abs(kernel).max()
    _, _, previous_vt = np.linalg.svd(kernel.T.astype(np.float64), full_matrices=False)
    actual = product(estimators.subspace_svd_factors(moved, 5, seed=[3, 0], warm_start=previous_vt[:5].T))
    u, s, vt = np.linalg.svd(moved.T.astype(np.float64), full_matrices=False)
    expected = u[:, :5] * s[:5] @ vt[:5]
    np.testing.assert_allclose(actual, expected, atol=1e-4 * np.abs(expected).max())


def test_huge_finite_rows_cannot_overflow_the_fit(rng):
    """Rows of 1e30 would overflow any float32 moment; scaled first, the fit stays exact."""
    x = correlated_inputs(rng, 200, 12)
    kernel = decaying_kernel(rng, 10, 12)
    expected = reduced_rank_reference(kernel, x, 3)
    actual = product(reduced_rank_factors(kernel, (1e30 * x).astype(np.float32), 3, seed=[0, 0]))
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, atol=2e-4 * np.abs(expected).max())


def test_white_inputs_give_the_plain_truncated_svd(rng):
    kernel = (rng.standard_normal((40, 30)) * 0.8 ** np.arange(30)).astype(np.float32)
    u, s, vt = np.linalg.svd(kernel.T.astype(np.float64), full_matrices=False)
    expected = u[:, :6] * s[:6] @ vt[:6]
    actual = product(reduced_rank_factors(kernel, np.eye(30, dtype=np.float32), 6, seed=[0, 0]))
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
    expected = reduced_rank_reference(layer.kernel.numpy(), x, 3)
    np.testing.assert_allclose(factors[0] @ factors[1], expected, atol=1e-3 * max(np.abs(expected).max(), 1e-6))


def buffer_reference(batches, buffer_rows, rows_per_step=InputSVDEstimator().rows_per_step):
    """float64: the ring buffer after these batches (first rows of each; non-finite rows as zeros)."""
    buffer, seen = np.zeros((buffer_rows, batches[0].shape[1])), 0
    for batch in batches:
        for row in batch[:rows_per_step]:
            buffer[seen % buffer_rows] = row if np.all(np.isfinite(row)) else 0.0
            seen += 1
    return buffer, seen


def gathering_model(input_dim=6, buffer_rows=100, refit_every=None):
    estimator = InputSVDEstimator(refit_every=refit_every, buffer_rows=buffer_rows)
    model = keras.Sequential([keras.Input((input_dim,)), LowRankGatedDense(5, rank=2, estimator=estimator),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    return model


def test_input_rows_are_buffered_in_the_train_step(rng):
    x = rng.standard_normal((5 * 48, 6)).astype(np.float32)
    x[4 * 48 + 2, 2] = np.nan  # a non-finite row is stored as zeros, which add nothing to the fit
    model = gathering_model()
    layer = model.layers[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, np.zeros(len(x)), batch_size=48, epochs=1, shuffle=False, verbose=0)
    buffer, seen = buffer_reference(np.split(x, 5), 100)  # 160 rows seen: the ring wrapped
    assert int(layer.estimator_state.input_rows_seen.numpy()) == seen == 160
    np.testing.assert_array_equal(layer.estimator_state.input_rows.numpy(), buffer.astype(np.float32))


def test_input_rows_under_mirrored_strategy_are_gathered(rng, mirrored_strategy):
    x = rng.standard_normal((4 * 32, 6)).astype(np.float32)
    with mirrored_strategy.scope():
        model = gathering_model(buffer_rows=128)
    model.fit(x, np.zeros(len(x)), batch_size=32, epochs=1, shuffle=False, verbose=0)
    layer = model.layers[0]
    # Each replica takes its 16 rows of each global batch of 32: gathered, the whole batch.
    buffer, seen = buffer_reference(np.split(x, 4), 128)
    assert int(layer.estimator_state.input_rows_seen.numpy()) == seen == 128
    np.testing.assert_array_equal(layer.estimator_state.input_rows.numpy(), buffer.astype(np.float32))


def test_refit_in_training_fits_the_buffered_rows(rng):
    x = correlated_inputs(rng, 96, 8).astype(np.float32)
    model = gathering_model(input_dim=8, refit_every=3)
    layer = model.layers[0]
    layer.kernel.assign(decaying_kernel(rng, 5, 8))
    model.compile(keras.optimizers.SGD(0.0), "mse")  # weights fixed: the refit sees this kernel
    model.fit(x, np.zeros(96), batch_size=32, epochs=1, shuffle=False, verbose=0)
    expected = reduced_rank_reference(layer.kernel.numpy(), x, 2)
    actual = layer.estimator_u.numpy() @ layer.estimator_v.numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize("estimator, traced", [(InputSVDEstimator(refit_every=2), "_traced_buffered_factors"),
                                               (SVDEstimator(refit_every=2), "_traced_refit_factors")])
def test_the_refit_graph_is_traced_once_however_often_the_train_step_is(rng, estimator, traced):
    # Keras traces a train step twice (its first trace creates variables); building the refit's
    # graph in each was most of a gated layer's tracing.
    model = keras.Sequential([keras.Input((8,)), LowRankGatedDense(5, rank=2, estimator=estimator),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    refit = getattr(estimator, traced)
    model.fit(rng.standard_normal((64, 8)).astype(np.float32), np.zeros(64), batch_size=16, epochs=2, verbose=0)
    assert refit.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("estimator", [InputSVDEstimator(refit_every=2), SVDEstimator(refit_every=2)])
def test_the_train_step_calls_the_refit_without_inlining_it(rng, estimator):
    # TensorFlow inlines a called function into the graph it optimises before the first step: the
    # refit's nodes (QR factorisations, SVDs) doubled a gated network's graph, and that step's time.
    layer = LowRankGatedDense(5, rank=2, estimator=estimator)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    layer(x)
    graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(x).graph.as_graph_def()
    functions = {function.signature.name: function for function in graph.library.function}

    def called(function):  # the functions a function's calls and conds reach
        names = {attr.func.name for node in function.node_def for attr in node.attr.values() if attr.func.name}
        return names | {reached for name in names for reached in called(functions[name])}

    not_inlined = {node.attr["f"].func.name for function in functions.values() for node in function.node_def
                   if node.op.endswith("PartitionedCall") and functions[node.attr["f"].func.name].attr["_noinline"].b}
    refit_graph = not_inlined | {reached for name in not_inlined for reached in called(functions[name])}
    factorisations = {name for name, function in functions.items() for node in function.node_def if node.op == "Qr"}
    assert factorisations and factorisations <= refit_graph


@pytest.mark.parametrize("shape, rows", [((784, 1000, 20), 6840), ((3072, 4000, 50), 8337)])
def test_auto_refit_intervals_are_the_documented_ones(shape, rows):
    """The schedule InputSVDEstimator's docstring and BENCHMARKS.md state (54 and 66 steps of 128)."""
    input_dim, units, rank = shape
    layer = LowRankGatedDense(units, rank=rank)
    layer.build((None, input_dim))
    assert layer.estimator.rows_between_refits(layer) == rows


def test_auto_refits_happen_when_the_rows_add_up(rng):
    x = rng.standard_normal((10 * 16, 6)).astype(np.float32)
    model = gathering_model(refit_every="auto")
    layer = model.layers[0]
    estimator = layer.estimator
    estimator.refit_budget = estimator.rows_between_refits(layer) * estimator.refit_budget / 31.9
    interval = estimator.rows_between_refits(layer)
    assert interval == 32  # two steps of 16 rows: a refit at steps 2, 4, 6, ...
    snapshots = [layer.estimator_u.numpy().copy()]

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            snapshots.append(layer.estimator_u.numpy().copy())

    model.fit(x, np.zeros(len(x)), batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Record()])
    refit_steps = [step + 1 for step, (a, b) in enumerate(zip(snapshots, snapshots[1:])) if not np.array_equal(a, b)]
    expected, since = [], 0
    for step in range(1, 11):  # rows since the last refit reach the interval: refit, start again
        since += 16
        if since >= interval:
            expected.append(step)
            since = 0
    assert refit_steps == expected and len(expected) >= 3


def test_save_and_load_keep_the_input_rows(rng, tmp_path):
    x = rng.standard_normal((64, 6)).astype(np.float32)
    model = gathering_model()
    model.fit(x, np.zeros(64), batch_size=32, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path).layers[0]
    assert int(loaded.estimator_state.input_rows_seen.numpy()) == 64
    np.testing.assert_array_equal(loaded.estimator_state.input_rows.numpy(), model.layers[0].estimator_state.input_rows.numpy())
    assert loaded.estimator == model.layers[0].estimator


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


def test_a_new_estimator_with_a_setting_is_one_registered_class(rng, tmp_path):
    """One class with its own setting: the layer builds, fits, trains, saves and loads it."""

    @estimators.register
    class ScaledSVD(estimators.Estimator):
        name = "test_scaled_svd"

        def __init__(self, scale=2.0):
            self.scale = float(scale)

        def get_config(self):
            return {"scale": self.scale}

        def factors(self, layer, sample_inputs=None, rank=None):
            u, v = super().factors(layer, sample_inputs, rank)
            return self.scale * u, v

    try:
        # A seeded kernel: an unseeded one is new in each process, and in about 1 in 1000 (3 of 3000
        # tried) the 2nd and 3rd singular values come so close that float32's truncated SVD misses 1e-5.
        gated = LowRankGatedDense(6, rank=2, estimator=ScaledSVD(scale=3.0),
                                  kernel_initializer=keras.initializers.GlorotUniform(seed=1))
        model = keras.Sequential([keras.Input((5,)), gated])
        layer = model.layers[0]
        u, s, vt = np.linalg.svd(layer.kernel.numpy().T.astype(np.float64), full_matrices=False)
        np.testing.assert_allclose(
            layer.estimator_u.numpy() @ layer.estimator_v.numpy(), 3 * (u[:, :2] * s[:2] @ vt[:2]), atol=1e-5
        )
        layer(rng.standard_normal((3, 5)).astype(np.float32), training=True)
        assert LowRankGatedDense.from_config(layer.get_config()).estimator == ScaledSVD(scale=3.0)
        assert LowRankGatedDense(6, rank=2, estimator="test_scaled_svd").estimator == ScaledSVD(scale=2.0)
        model.save(tmp_path / "m.keras")
        assert keras.models.load_model(tmp_path / "m.keras").layers[0].estimator == ScaledSVD(scale=3.0)
    finally:
        del estimators.ESTIMATORS["test_scaled_svd"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: InputSVDEstimator(refit_every=0), 'refit_every must be a positive integer, "auto" or None'),
        (lambda: InputSVDEstimator(buffer_rows=0), "buffer_rows must be a positive integer, got buffer_rows=0"),
        (lambda: InputSVDEstimator(refit_budget=1.5), "refit_budget must be a number in .0, 1., got refit_budget=1.5"),
        (lambda: SVDEstimator(refit_every="auto"), "refit_every must be a positive integer or None, got refit_every='auto'"),
        (lambda: JointEstimator(loss_weight=-1), "loss_weight must be a finite number >= 0, got loss_weight=-1"),
        (lambda: JointEstimator(positive_weight=0.5), "positive_weight must be a finite number >= 1"),
    ],
)
def test_bad_estimator_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


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
    assert int(layer.estimator_state.training_steps.numpy()) == 6
    assert np.all(np.isfinite(layer.estimator_u.numpy())) and not np.allclose(layer.estimator_u.numpy(), start)
