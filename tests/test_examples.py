import csv
import glob
import os
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import common  # noqa: E402
import mnist  # noqa: E402
import svhn  # noqa: E402

TINY = ["--hidden", "24,16", "--ranks", "4", "--epochs", "1", "--batch-size", "32"]
RATES = ("sign_accuracy", "recall", "precision", "false_negative_rate", "predicted_density", "true_density", "energy_captured")


def gate_scalars(logdir):
    """{tag: [values]} of the GateSummaries event files under logdir."""
    values = {}
    for directory in glob.glob(os.path.join(logdir, "*", "gates")):
        accumulator = EventAccumulator(directory, size_guidance={"tensors": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["tensors"]:
            values[tag] = [tf.make_ndarray(event.tensor_proto) for event in accumulator.Tensors(tag)]
    return values


def check_gate_summaries(logdir, layers, validation_rows):
    """layers: {name: (input_dim, units, rank)} of the gated layers that were logged."""
    values = gate_scalars(logdir)
    for layer, (input_dim, units, rank) in layers.items():
        for rate in RATES:
            series = values[f"{layer}/{rate}"]
            assert series and all(0.0 <= float(v) <= 1.0 for v in series), (layer, rate, series)
        for value, density in zip(values[f"{layer}/cost_model_speedup"], values[f"{layer}/predicted_density"]):
            expected = input_dim * units / (rank * (input_dim + units) + float(density) * input_dim * units)
            assert float(value) == pytest.approx(expected, rel=1e-5)
        errors = values[f"{layer}/estimate_error"][0]  # buckets (left, right, count)
        assert errors.shape[1] == 3 and errors[:, 2].sum() == pytest.approx(validation_rows * units)
        singular = values[f"{layer}/kernel_singular_values"][0]
        assert singular[:, 2].sum() == pytest.approx(min(input_dim, units))


def assert_report(rows, layers=("hidden_0", "hidden_1")):
    gated = [row for row in rows if row["layers"]]
    assert gated, "a gated run must be reported"
    for row in rows:
        assert 0.0 <= row["test_error"] <= 1.0
    for row in gated:
        assert [report["layer"] for report in row["layers"]] == list(layers)
        assert row["measured_speedup"][1] > 0 and row["measured_speedup"][256] > 0


def test_mnist_on_mock_tfds(tmp_path):
    with tfds.testing.mock_data(num_examples=64):
        rows = mnist.main(TINY + ["--baseline", "--logdir", str(tmp_path)])
    assert [row["run"] for row in rows] == ["mnist_dense", "mnist_gated"]
    assert_report(rows)
    check_gate_summaries(str(tmp_path), {"hidden_0": (784, 24, 4), "hidden_1": (24, 16, 4)}, 64)
    # keras.callbacks.TensorBoard logged the layer metrics that fit reports.
    accumulator = EventAccumulator(os.path.join(tmp_path, "mnist_gated", "train"), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert "epoch_hidden_0_recall" in accumulator.Tags()["tensors"]


def test_svhn_on_mock_tfds(tmp_path):
    with tfds.testing.mock_data(num_examples=48):
        rows = svhn.main(TINY + ["--logdir", str(tmp_path)])
    assert_report(rows)
    check_gate_summaries(str(tmp_path), {"hidden_0": (3072, 24, 4), "hidden_1": (24, 16, 4)}, 48)


def test_svhn_normalises_per_channel():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 32, 32, 3)).astype(np.uint8)
    (train, _), (test, _) = svhn.normalise((x, np.zeros(20)), (x[:5], np.zeros(5)))
    channels = train.reshape(20, 32, 32, 3)
    np.testing.assert_allclose(channels.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(channels.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    np.testing.assert_array_equal(test, train[:5])


def tiny_npz(path, count=80):
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (count, 28, 28)).astype(np.uint8), y=rng.integers(0, 10, count))
    return str(path)


def test_mnist_on_npz_with_rank_sweep(tmp_path):
    npz = tiny_npz(tmp_path / "digits.npz")
    rows = mnist.main(TINY + ["--npz", npz, "--baseline", "--sweep-ranks", "2,4", "--logdir", str(tmp_path)])
    assert [row["run"] for row in rows] == ["mnist_dense", "mnist_rank2", "mnist_rank4"]
    assert_report(rows)
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["rank"] for row in table] == ["", "2,2", "4,4"]
    for row, result in zip(table[1:], rows[1:]):
        assert float(row["test_error"]) == pytest.approx(result["test_error"], abs=1e-4)
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "| mnist_rank4 |" in (tmp_path / "sweep.md").read_text()


def test_npz_split_holds_out_a_quarter(tmp_path):
    npz = tiny_npz(tmp_path / "digits.npz", count=40)
    (x_train, y_train), (x_test, y_test) = mnist.load_npz(npz, seed=3)
    assert len(x_train) == 30 and len(x_test) == 10 and len(y_train) == 30 and len(y_test) == 10


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "is not an .npz with arrays x and y"),
        ({"x": np.zeros((10, 28, 27), np.uint8), "y": np.zeros(10)}, r"expected x \[N, 28, 28\]"),
        ({"x": np.zeros((10, 28, 28), np.uint8)}, "is not an .npz with arrays x and y"),
    ],
)
def test_bad_npz_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.npz"
    if content is not None:
        np.savez(path, **content)
    with pytest.raises(SystemExit) as exit_info:
        common.main_guard(mnist.main, ["--npz", str(path)] + TINY)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: --npz") and message.split(" ")[0] in error
    assert __import__("re").search(message, error)


def test_unreachable_tfds_is_one_line_naming_the_flags(monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve host (simulated offline machine)")

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(SystemExit):
        common.main_guard(mnist.main, TINY)
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "--data-dir" in error and "--npz" in error and "ConnectionError" in error
    from tensorflow_datasets.core.download import downloader

    assert downloader.MAX_RETRIES == 0  # no minutes of retries on an offline machine


def test_bad_flags_are_rejected(capsys):
    with pytest.raises(SystemExit):
        mnist.main(["--hidden", "10,0"])
    assert "positive integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mnist.main(["--npz", "x.npz", "--hidden", "10,10,10", "--ranks", "2,3"])
    assert "--ranks needs 1 or 3 values (one per hidden layer), got 2,3" in capsys.readouterr().err


def test_convert_mnist_end_to_end(tmp_path):
    import convert_mnist

    npz = tiny_npz(tmp_path / "digits.npz", count=120)
    result = convert_mnist.main(
        ["--npz", npz, "--hidden", "40,30", "--epochs", "1", "--rank", "4", "--ranks", "2,4,8"]
    )
    for stage in ("dense", "converted", "calibrated", "fine-tuned"):
        assert 0.0 <= result["accuracy"][stage] <= 1.0
    assert [row["layer"] for row in result["report"].rows] == ["hidden_0", "hidden_1"]
    assert all(0.0 <= d <= 1.0 for d in result["densities"]) and len(result["densities"]) == 2
    assert result["speedup_fine_tuned"][1] > 0
