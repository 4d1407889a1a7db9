import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import away_from_boundary, numpy_gated_dense
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrc_keras import LowRankGatedDense
from lrc_keras.callbacks import GateSummaries

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
