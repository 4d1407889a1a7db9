import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import away_from_boundary, compiled_ops_that_ran, numpy_gated_dense

from lrc_keras import LowRankGatedDense, crossover, ops
from lrc_keras.gating import margin_for_density


@pytest.mark.parametrize("batch", [1, 3, 16, 40, 256, 1000])
def test_crossover_interpolates_in_log_batch(batch):
    crossovers = {1: 2.0, 16: 0.5, 256: 0.1}
    expected = np.interp(np.log2(batch), [0, 4, 8], [2.0, 0.5, 0.1])
    assert crossover.crossover_for_batch(crossovers, batch) == pytest.approx(expected)
    as_tensor = crossover.crossover_for_batch(crossovers, tf.constant(batch))
    assert float(as_tensor) == pytest.approx(expected, rel=1e-5)


def test_crossover_of_measured_curve():
    densities, times = (0.0, 0.1, 0.5, 1.0), (1.0, 2.0, 4.0, 5.0)
    assert crossover.crossover(densities, times, 3.0) == pytest.approx(0.3)
    assert crossover.crossover(densities, times, 0.5) == 0.0
    assert crossover.crossover(densities, times, 7.0) == pytest.approx(2.0)  # slope 2 past 1.0


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
def test_margin_for_density_selects_that_fraction(rng, density):
    z_hat = rng.standard_normal((10, 100))
    margin = margin_for_density(z_hat, density)
    assert np.mean(z_hat > -margin) == pytest.approx(density, abs=0.011)


def test_an_unmeasured_shape_uses_the_default_crossovers_and_times_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(crossover, "_measured", {})
    monkeypatch.setattr(crossover, "_measure", lambda *shape: pytest.fail(f"timed {shape} unasked"))
    assert crossover.crossover_densities(12, 10, 2) == {1: 1.0, 16: 0.5, 256: 0.2}
    assert list(tmp_path.iterdir()) == []


def test_measure_times_each_shape_once_and_saves_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(crossover, "_measured", {})
    model = keras.Sequential([keras.Input((12,)), LowRankGatedDense(10, rank=2, name="a"),
                              LowRankGatedDense(10, rank=2, name="b"), LowRankGatedDense(10, rank=3, name="c")])
    timed = []
    measure_one = crossover._measure
    monkeypatch.setattr(crossover, "_measure", lambda *shape: timed.append(shape) or measure_one(*shape))
    measured = crossover.measure(model)
    assert timed == [(12, 10, 2), (10, 10, 2), (10, 10, 3)]
    assert list(measured) == ["a", "b", "c"] and set(measured["a"]) == set(crossover.MEASURED_BATCHES)
    assert crossover.crossover_densities(12, 10, 2) == measured["a"]
    # A new process (an empty memory) reads the file back instead of measuring again.
    monkeypatch.setattr(crossover, "_measured", {})
    monkeypatch.setattr(crossover, "_measure", lambda *shape: pytest.fail(f"measured {shape} again"))
    assert crossover.crossover_densities(10, 10, 3) == measured["c"]
    assert crossover.measure(model) == measured
    cached = json.loads((tmp_path / "cost_model.json").read_text())
    assert {int(batch): value for batch, value in cached[crossover._key(12, 10, 2)].items()} == measured["a"]


@pytest.mark.skipif(not ops.is_compiled(), reason="the compiled paths need the compiled ops")
@pytest.mark.parametrize("path, ops_that_may_run", [
    ("auto", ({"LrcGatedLayer"}, {"LrcGatedLayer", "Einsum"})), ("gated", ({"LrcGatedLayer"},)),
    ("gemm", ({"LrcGatedLayer", "Einsum"},)),
])
def test_every_inference_path_gives_the_same_numbers(rng, tmp_path, path, ops_that_may_run):
    layer = LowRankGatedDense(40, rank=5)
    layer.build((None, 30))
    layer.inference_path = path
    x = rng.standard_normal((64, 30)).astype(np.float32)
    function = tf.function(lambda x: layer(x))  # unknown batch: the runtime choice
    function = function.get_concrete_function(tf.TensorSpec([None, 30], tf.float32))
    y = function(tf.constant(x)).numpy()
    # The numbers are the path's own, not the plain-TensorFlow reference's.
    assert compiled_ops_that_ran(function, tf.constant(x), tmp_path) in ops_that_may_run
    weights = (layer.kernel.numpy(), layer.bias.numpy(), layer.estimator_u.numpy(), layer.estimator_v.numpy())
    expected, mask, z_hat, _ = numpy_gated_dense(x, *weights, 0.0)
    keep = away_from_boundary(z_hat, 0.0)
    np.testing.assert_allclose(y[keep], expected[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path, observed_density, expected_ops", [
    ("gated", 0.9, {"LrcGatedLayer"}), ("gemm", 0.0, {"LrcGatedLayer", "Einsum"}),
    ("auto", 0.0, {"LrcGatedLayer"}), ("auto", 1.0, {"LrcGatedLayer", "Einsum"}),
])
def test_the_chosen_path_runs_its_op(rng, monkeypatch, tmp_path, path, observed_density, expected_ops):
    """Which ops run, read from the profiler's trace: LrcGatedLayer alone on the gated path, after
    TF's GEMM on the "gemm" path; "auto" runs the first below the crossover (monkeypatched to 0.5)
    and the second above it."""
    monkeypatch.setattr(crossover, "crossover_densities", lambda *shape: {1: 0.5, 16: 0.5, 256: 0.5})
    layer = LowRankGatedDense(40, rank=5, inference_path=path)
    layer.build((None, 30))
    function = tf.function(lambda x: layer(x)).get_concrete_function(tf.TensorSpec([None, 30], tf.float32))
    x = tf.constant(rng.standard_normal((8, 30)).astype(np.float32))
    function(x)  # the first call instantiates the function: keep it out of the trace
    layer.observed_density.assign(observed_density)
    assert compiled_ops_that_ran(function, x, tmp_path) == expected_ops


def test_bad_inference_path():
    layer = LowRankGatedDense(4, rank=2)
    with pytest.raises(ValueError, match="inference_path must be one of .*got 'sparse'"):
        layer.inference_path = "sparse"


def test_rank_3_inputs_in_a_graph_dispatch_on_the_kernel_shape(rng):
    layer = LowRankGatedDense(30, rank=4)
    layer.build((None, None, 20))
    function = tf.function(lambda x: layer(x)).get_concrete_function(tf.TensorSpec([None, None, 20], tf.float32))
    x = rng.standard_normal((2, 3, 20)).astype(np.float32)
    y = function(tf.constant(x)).numpy()
    assert y.shape == (2, 3, 30)
    weights = (layer.kernel.numpy(), layer.bias.numpy(), layer.estimator_u.numpy(), layer.estimator_v.numpy())
    expected, _, z_hat, _ = numpy_gated_dense(x.reshape(6, 20), *weights, 0.0)
    keep = away_from_boundary(z_hat, 0.0)
    np.testing.assert_allclose(y.reshape(6, 30)[keep], expected[keep], rtol=1e-5, atol=1e-5)
