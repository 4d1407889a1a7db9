import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import away_from_boundary, numpy_gated_dense
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrc_keras import LowRankGatedDense
from lrc_keras.callbacks import EstimatorRefit, GateSummaries
from lrc_keras.estimators import InputSVDEstimator

RATES = ("sign_accuracy", "recall", "precision", "false_negative_rate", "predicted_density", "true_density")
ALWAYS = ("cost_model_speedup", "energy_captured", "estimate_error", "kernel_singular_values")


def last_values(directory):
    accumulator = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {tag: tf.make_ndarray(accumulator.Tensors(tag)[-1].tensor_proto) for tag in accumulator.Tags()["tensors"]}


def numpy_rates(model, x):
    """Per gated layer, the GATE_RATES of its mask against z > 0 in float64, and how many of its
    (row, unit) pairs sit so near a threshold that float32 rounding may flip them."""
    rates, h = {}, np.asarray(x, np.float64)
    for layer in model.layers:
        if not isinstance(layer, LowRankGatedDense):
            continue
        weights = (w.numpy() for w in (layer.kernel, layer.bias, layer.estimator_u, layer.estimator_v))
        h, mask, z_hat, z = numpy_gated_dense(h, *weights, layer.margin)
        positive = z > 0
        tp, fp = (mask & positive).sum(), (mask & ~positive).sum()
        fn, tn = (~mask & positive).sum(), (~mask & ~positive).sum()
        rates[layer.name] = {
            "sign_accuracy": (tp + tn) / mask.size, "recall": tp / (tp + fn), "precision": tp / (tp + fp),
            "false_negative_rate": fn / (tp + fn), "predicted_density": mask.mean(), "true_density": positive.mean(),
            "borderline": (~away_from_boundary(z_hat, layer.margin, 1e-5) | (np.abs(z) < 1e-5)).sum(),
        }
    return rates


@pytest.mark.parametrize("rates", [True, False])
def test_gate_summaries_write_the_rates_unless_told_not_to(tmp_path, rates):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), LowRankGatedDense(10, rank=3, name="first"),
                              LowRankGatedDense(8, rank=2, name="second"), keras.layers.Dense(3)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[GateSummaries(str(tmp_path), x[:40], rates=rates)])
    written = last_values(tmp_path / "gates")
    expected_tags = [f"{layer}/{tag}" for layer in ("first", "second") for tag in ALWAYS + (RATES if rates else ())]
    assert sorted(written) == sorted(expected_tags)
    if rates:
        # The last summary is of the final weights, on the fixed batch (the first 40 rows).
        for layer, expected in numpy_rates(model, x[:40]).items():
            slack = expected["borderline"] / 40 + 1e-6  # each borderline pair moves a rate by at most 1/40 of a row
            for rate in RATES:
                assert float(written[f"{layer}/{rate}"]) == pytest.approx(expected[rate], abs=slack), (layer, rate)


def test_estimator_refit_refits_input_svd_layers_and_leaves_joint_ones_alone():
    rng = np.random.default_rng(5)
    model = keras.Sequential([keras.Input((12,)), LowRankGatedDense(10, rank=3, estimator="joint", name="joint"),
                              LowRankGatedDense(8, rank=2, estimator=InputSVDEstimator(refit_every=None), name="svd"),
                              keras.layers.Dense(3)])
    joint, svd = model.layers[:2]
    # Factors no refit would give: a refit of either layer would replace them.
    for layer, input_dim in ((joint, 12), (svd, 10)):
        layer.assign_estimator(rng.standard_normal((input_dim, layer.rank)).astype(np.float32),
                               rng.standard_normal((layer.rank, layer.units)).astype(np.float32))
    joint_factors = [f.numpy() for f in joint.current_factors()]
    refit = EstimatorRefit()
    refit.set_model(model)
    refit.on_epoch_end(0)
    # The joint layer's factors are trained by gradient: bit-identical.
    for before, after in zip(joint_factors, joint.current_factors()):
        np.testing.assert_array_equal(after.numpy(), before)
    # The input_svd layer, with no input rows buffered yet, refits to the kernel's best rank-2
    # approximation (U·V ≈ Wᵀ, W stored [units, input_dim]), from a float64 SVD.
    u, sigma, vt = np.linalg.svd(svd.kernel.numpy().T.astype(np.float64), full_matrices=False)
    best = (u[:, :2] * sigma[:2]) @ vt[:2]
    estimator_u, estimator_v = (f.numpy().astype(np.float64) for f in svd.current_factors())
    np.testing.assert_allclose(estimator_u @ estimator_v, best, rtol=1e-4, atol=1e-5)
