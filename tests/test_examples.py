import csv
import functools
import inspect
import os
import re
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import away_from_boundary, numpy_gated_dense
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrc_keras import LowRankGatedDense
from lrc_keras.audit import gated_layers
from lrc_keras import estimators
from lrc_keras.estimators import ESTIMATORS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import cli  # noqa: E402
import data  # noqa: E402
import experiment  # noqa: E402
import mnist  # noqa: E402
import models  # noqa: E402
import svhn  # noqa: E402

TINY = ["--hidden", "24,16", "--ranks", "4", "--epochs", "1", "--batch-size", "32"]
RATES = ("sign_accuracy", "recall", "precision", "false_negative_rate", "predicted_density", "true_density", "energy_captured")


def scalars(directory):
    """{tag: [values]} of the summaries in one TensorBoard event directory."""
    accumulator = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {tag: [tf.make_ndarray(event.tensor_proto) for event in accumulator.Tensors(tag)]
            for tag in accumulator.Tags()["tensors"]}


def numpy_forward(model, x):
    """A float64 numpy pass of one of the examples' networks: (logits, gates, uncertain_rows).

    `gates`: per gated layer, the rates of its mask against z > 0 and "tolerance", how far
    float32 rounding (~1e-7 here) may move them: every unit of a row with an estimate or a z
    within 1e-5 of its threshold, in this layer or upstream, may flip. `uncertain_rows`: those rows.
    """
    gates, h, uncertain_rows = {}, np.asarray(x, np.float64), np.zeros(len(x), bool)
    for layer in model.layers:
        if isinstance(layer, LowRankGatedDense):
            weights = (layer.kernel, layer.bias, layer.estimator_u, layer.estimator_v)
            h, mask, z_hat, z = numpy_gated_dense(h, *(w.numpy() for w in weights), layer.margin)
            uncertain_rows |= (~away_from_boundary(z_hat, layer.margin, tolerance=1e-5) | (np.abs(z) < 1e-5)).any(1)
            positive, uncertain = z > 0, uncertain_rows.sum() * layer.units
            gates[layer.name] = {
                "recall": (mask & positive).sum() / positive.sum(),
                "predicted_density": mask.mean(),
                "true_density": positive.mean(),
                "tolerance": {"recall": uncertain / positive.sum(), "density": uncertain / mask.size},
            }
        else:
            assert isinstance(layer, keras.layers.Dense), layer
            z = h @ layer.kernel.numpy().astype(np.float64) + layer.bias.numpy()
            if layer.name == "logits":
                return z, gates, uncertain_rows
            uncertain_rows |= (np.abs(z) < 1e-5).any(axis=1)
            h = np.maximum(z, 0.0)
    raise AssertionError("the network has no logits layer")


def assert_rates_match(measured, recount, keys=("recall", "predicted_density", "true_density")):
    """`measured(layer, key)` equals the numpy recount of every key, up to float32 rounding."""
    for layer, expected in recount.items():
        for key in keys:
            tolerance = expected["tolerance"]["recall" if key == "recall" else "density"] + 1e-6
            assert float(measured(layer, key)) == pytest.approx(expected[key], abs=tolerance), (layer, key)


# What GateSummaries writes beside fit's own metrics in the examples: the gate rates are not among them.
GATE_SUMMARY_TAGS = ("cost_model_speedup", "energy_captured", "estimate_error", "kernel_singular_values")


def check_tensorboard(logdir, run, x_test, layers):
    """Each quantity once: fit's metrics as `epoch_<metric>` (train/, validation/), GateSummaries' as
    `<layer>/<quantity>` (gates/), and the last values those of the final weights (runs of one epoch).

    layers: {name: (input_dim, units, rank)} of the gated layers.
    """
    directory = os.path.join(logdir, run["run"])
    validation = scalars(os.path.join(directory, "validation"))
    gates = scalars(os.path.join(directory, "gates"))
    assert sorted(gates) == sorted(f"{layer}/{tag}" for layer in layers for tag in GATE_SUMMARY_TAGS)
    assert all(tag.startswith("epoch_") for tag in validation), sorted(validation)  # no evaluation_*_vs_iterations
    assert "epoch_hidden_0_recall" in scalars(os.path.join(directory, "train"))
    recount = numpy_forward(run["model"], x_test)[1]
    # fit's validation measured the gates (audited) on the test set.
    gate_tags = [tag for tag in validation if re.fullmatch(r"epoch_hidden_\d_\w+", tag)]
    assert len(gate_tags) == len(layers) * 6 and not any(np.isnan(validation[tag]).any() for tag in gate_tags)
    assert_rates_match(lambda layer, key: validation[f"epoch_{layer}_{key}"][-1], recount)
    for layer, (input_dim, units, rank) in layers.items():
        # Cost model at the recounted density, within what float32 rounding may move the density.
        density, slack = recount[layer]["predicted_density"], recount[layer]["tolerance"]["density"] + 1e-6
        limits = [input_dim * units / (rank * (input_dim + units) + d * input_dim * units)
                  for d in (density + slack, density - slack)]
        assert limits[0] - 1e-6 <= float(gates[f"{layer}/cost_model_speedup"][-1]) <= limits[1] + 1e-6
        # energy_captured: the share of ‖W‖² that the best rank-r factorisation keeps, Σ of W·Wᵀ's r largest eigenvalues.
        kernel = run["model"].get_layer(layer).kernel.numpy().astype(np.float64)
        eigenvalues = np.sort(np.linalg.eigvalsh(kernel @ kernel.T))[::-1]
        assert float(gates[f"{layer}/energy_captured"][-1]) == pytest.approx(
            eigenvalues[:rank].sum() / np.trace(kernel @ kernel.T), rel=1e-6)
        errors = gates[f"{layer}/estimate_error"][-1]  # buckets (left, right, count)
        assert errors.shape[1] == 3 and errors[:, 2].sum() == pytest.approx(len(x_test) * units)
        singular = gates[f"{layer}/kernel_singular_values"][-1]
        assert singular[:, 2].sum() == pytest.approx(min(input_dim, units))


def check_pictures(logdir, panels):
    """The two PNGs of an experiment, one panel per speed batch and per gated network (figure widths)."""
    import matplotlib.image

    for name, width in (("error_vs_speedup.png", 4.2 * panels["batches"]), ("gates_over_epochs.png",
                                                                             max(7, 5 * panels["networks"]))):
        image = matplotlib.image.imread(os.path.join(logdir, name))
        assert image.shape[1] == pytest.approx(width * 110, abs=2), name
        assert image[..., :3].std() > 0.05, name  # not a blank canvas


def check_progress_lines(output, runs, x_test):
    """At most 200 characters a line; each run named before it trains; the gated run's last epoch line shows the
    whole network's density and recall on the test set, as a numpy recount gives them."""
    lines = output.splitlines()
    assert max(map(len, lines)) <= 200
    for run in runs:
        assert any(line.startswith(f"{run['run']}: training the ") for line in lines), run["run"]
    gated = runs[-1]
    recount = numpy_forward(gated["model"], x_test)[1]
    units = {layer.name: layer.units for layer in gated_layers(gated["model"])}
    positives = sum(units[layer] * recount[layer]["true_density"] for layer in units)
    density = sum(units[layer] * recount[layer]["predicted_density"] for layer in units) / sum(units.values())
    recall = sum(units[layer] * recount[layer]["true_density"] * recount[layer]["recall"] for layer in units) / positives
    start = lines.index(next(line for line in lines if line.startswith(f"{gated['run']}: training the ")))
    last_epoch = next(line for line in lines[start:] if line.startswith("epoch ")).split("validation:")[1]
    shown = dict(re.findall(r"(density|recall) ([0-9.]+)", last_epoch))
    slack = max(recount[layer]["tolerance"]["recall"] for layer in units) + 5e-4
    assert float(shown["density"]) == pytest.approx(density, abs=slack)
    assert float(shown["recall"]) == pytest.approx(recall, abs=slack)


def assert_run_matches_numpy(run, x_test, y_test):
    """The run's test error and gate rates equal a float64 numpy recount from its final weights."""
    logits, gates, uncertain_rows = numpy_forward(run["model"], x_test)
    error = np.mean(np.argmax(logits, axis=1) != y_test)
    assert run["test_error"] == pytest.approx(error, abs=uncertain_rows.mean() + 1e-6), run["run"]
    reports = {report["layer"]: report for report in run["layers"]}
    assert list(reports) == list(gates)
    assert_rates_match(lambda layer, key: reports[layer][key], gates)
    return error


def test_mnist_on_mock_tfds(tmp_path, capsys):
    with tfds.testing.mock_data(num_examples=64):
        rows = mnist.main(TINY + ["--baseline", "--logdir", str(tmp_path), "--speed-batches", "1,4"])
        _, (x_test, y_test) = data.load(data.MNIST, None, None, 0)  # mock data is the same at every load
    check_progress_lines(capsys.readouterr().out, rows, x_test)
    assert [row["network"] for row in rows] == ["mnist_dense", "mnist_gated"]
    # No --estimator, --refit-every, --margin or --training-path: the layer's own defaults, whatever they are.
    defaults = inspect.signature(LowRankGatedDense).parameters
    for layer in gated_layers(rows[-1]["model"]):
        assert (layer.estimator, layer.margin, layer.training_path) == (
            estimators.get(defaults["estimator"].default), defaults["margin"].default, defaults["training_path"].default)
    assert [row["run"] for row in rows] == ["mnist_dense_seed0", f"mnist_gated_{layer.estimator.name}_seed0"]
    for run in rows:
        assert_run_matches_numpy(run, x_test, y_test)
    check_tensorboard(str(tmp_path), rows[-1], x_test, {"hidden_0": (784, 24, 4), "hidden_1": (24, 16, 4)})
    check_pictures(str(tmp_path), {"batches": 2, "networks": 1})


def test_svhn_on_mock_tfds(tmp_path, capsys):
    # No --ranks: the defaults of SVHN's network (50,40,30) fitted to this one.
    with tfds.testing.mock_data(num_examples=48):
        rows = svhn.main([flag for flag in TINY if flag not in ("--ranks", "4")] + ["--hidden", "64,32,24",
                                                                                    "--logdir", str(tmp_path)])
        _, (x_test, y_test) = data.load(data.SVHN, None, None, 0)
    check_progress_lines(capsys.readouterr().out, rows, x_test)
    assert [layer.rank for layer in gated_layers(rows[-1]["model"])] == [16, 8, 6]  # a quarter of 64, 32, 24
    assert_run_matches_numpy(rows[-1], x_test, y_test)
    check_tensorboard(str(tmp_path), rows[-1], x_test,
                      {"hidden_0": (3072, 64, 16), "hidden_1": (64, 32, 8), "hidden_2": (32, 24, 6)})
    check_pictures(str(tmp_path), {"batches": 3, "networks": 1})


def patch_images(path, image_shape, count=240, mislabelled=0.0, seed=0):
    """A learnable .npz: class k is a bright 4x4 patch at the k-th of 10 places on a dim noisy background.

    A share `mislabelled` of the labels is redrawn at random, so that accuracy stays below 1.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, count)
    x = rng.integers(0, 60, (count,) + image_shape).astype(np.uint8)
    for image, label in zip(x, y):
        row, column = 4 + 12 * (label // 5), 2 + 5 * (label % 5)
        image[row : row + 4, column : column + 4] = 255
    redrawn = rng.random(count) < mislabelled
    y[redrawn] = rng.integers(0, 10, redrawn.sum())
    np.savez(path, x=x, y=y)
    return str(path)


LEARN = ["--hidden", "32,16", "--ranks", "4", "--epochs", "5", "--batch-size", "16", "--learning-rate", "1e-2",
         "--speed-batches", "1", "--seed", "1"]


@pytest.mark.parametrize("script, dataset", [(mnist, data.MNIST), (svhn, data.SVHN)], ids=["mnist", "svhn"])
def test_gated_network_learns_and_its_report_matches_numpy(tmp_path, script, dataset):
    npz = patch_images(tmp_path / "patches.npz", dataset.image_shape)
    runs = script.main(LEARN + ["--npz", npz, "--logdir", str(tmp_path)])
    (_, _), (x_test, y_test) = data.load(dataset, npz, None, 0)
    error = assert_run_matches_numpy(runs[-1], x_test, y_test)
    assert error < 0.1, error  # chance is 0.9


def test_svhn_normalises_per_channel():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 32, 32, 3)).astype(np.uint8)
    train, test = data.standardise_per_channel(x, x[:5])
    channels = train.reshape(20, 32, 32, 3)
    np.testing.assert_allclose(channels.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(channels.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    np.testing.assert_array_equal(test, train[:5])


def tiny_npz(path, count=80):
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (count, 28, 28)).astype(np.uint8), y=rng.integers(0, 10, count))
    return str(path)


def test_epoch_lines_give_wall_time_with_slow_summaries(tmp_path, capsys, monkeypatch):
    # GateSummaries, which runs at each epoch's end, made slow: the epoch lines must count it.
    slow = 1.0
    write = experiment.GateSummaries.write
    monkeypatch.setattr(experiment.GateSummaries, "write", lambda self: (time.sleep(slow), write(self)))
    npz = tiny_npz(tmp_path / "digits.npz")
    started = time.perf_counter()
    mnist.main(TINY + ["--npz", npz, "--epochs", "3", "--logdir", str(tmp_path), "--speed-batches", "1"])
    wall = time.perf_counter() - started
    lines = capsys.readouterr().out.splitlines()
    seconds = [float(re.match(r"epoch \d/3 +([0-9.]+) s ", line).group(1)) for line in lines if line.startswith("epoch ")]
    assert len(seconds) == 3 and min(seconds) >= slow and sum(seconds) < wall, lines
    # Each phase that may take a while announces itself, and says how long it took.
    for phase in ("building the gated network ...", "tracing the training step", "evaluating it on the 20 test rows",
                  "measuring its gates on the test set ..."):
        assert any(line.startswith(phase) and re.search(r"\.\.\. [0-9.]+ s$", line) for line in lines), phase
    timing = next(index for index, line in enumerate(lines) if line.startswith("timing it against"))
    assert re.fullmatch(r"  batch 1: [0-9.]+x, [0-9.]+x, [0-9.]+x", lines[timing + 1])


def test_training_seconds_leave_out_the_wait_before_an_epochs_first_step():
    """A pause between an epoch's start and its first step (fit making the epoch's iterator, which
    here waited seconds) stays in the epoch line's wall time and out of the training time."""
    pause = 0.5

    class Pause(keras.callbacks.Callback):  # after EpochLine: its clock has started
        def on_epoch_begin(self, epoch, logs=None):
            time.sleep(pause)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    line = experiment.progress.EpochLine(2)
    started = time.perf_counter()
    model.fit(np.ones((8, 3), np.float32), np.ones((8, 2), np.float32), epochs=2, batch_size=4, verbose=0,
              callbacks=[line, Pause()])
    wall = time.perf_counter() - started
    assert len(line.training_seconds) == 2
    assert sum(line.training_seconds) < wall - 2 * pause, (line.training_seconds, wall)
    assert line.training_seconds[1] < pause  # the second epoch: two SGD steps of a 3x2 layer


def test_the_examples_network_traces_its_first_train_step_once(monkeypatch):
    """Keras creates an unbuilt optimizer's variables, and those of a metric given by name, while
    tracing the first train step, and TensorFlow traces a function that creates variables twice:
    each trace runs the layers' call, which for a gated layer is most of the first step."""
    traces = []
    call = LowRankGatedDense.call

    @functools.wraps(call)
    def counted_call(self, *args, **kwargs):
        traces.append(kwargs.get("training"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(LowRankGatedDense, "call", counted_call)
    model = models.build_network(6, 3, (5,), ranks=(2,))
    model.train_on_batch(np.ones((4, 6), np.float32), np.zeros(4, np.int64))
    assert traces == [True]


def test_mnist_on_npz_with_rank_sweep(tmp_path):
    npz = tiny_npz(tmp_path / "digits.npz")
    rows = mnist.main(TINY + ["--npz", npz, "--baseline", "--sweep-ranks", "2,4", "--logdir", str(tmp_path),
                              "--speed-batches", "1,256"])
    assert [row["run"] for row in rows] == ["mnist_dense", "mnist_rank2", "mnist_rank4"]
    _, (x_test, y_test) = data.load(data.MNIST, npz, None, 0)
    for row in rows:
        assert_run_matches_numpy(row, x_test, y_test)
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["rank"] for row in table] == ["", "2,2", "4,4"]
    for row, result in zip(table, rows):
        assert float(row["test_error"]) == pytest.approx(result["test_error"], rel=5e-6)  # 6 significant digits
        for report in result["layers"]:
            assert float(row[f"{report['layer']}_recall"]) == pytest.approx(report["recall"], rel=5e-6)
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "| mnist_rank4 |" in (tmp_path / "sweep.md").read_text()


def test_seeds_report_mean_and_std_of_the_per_seed_runs(tmp_path):
    npz = tiny_npz(tmp_path / "digits.npz")
    estimators = list(ESTIMATORS)[:2]
    runs = mnist.main(TINY + ["--npz", npz, "--baseline", "--seeds", "3,4", "--estimator", ",".join(estimators),
                              "--training-path", "dense", "--speed-batches", "1", "--logdir", str(tmp_path)])
    assert {layer.training_path for run in runs[1:3] for layer in gated_layers(run["model"])} == {"dense"}
    groups = [("mnist_dense", "")] + [("mnist_gated", estimator) for estimator in estimators]
    assert [(run["network"], run["estimator"] or "", run["seed"]) for run in runs] == [
        group + (seed,) for seed in (3, 4) for group in groups]
    # Seeds vary the initialisation: the two Dense baselines start (and end) apart.
    assert not np.allclose(runs[0]["model"].get_layer("hidden_0").kernel, runs[3]["model"].get_layer("hidden_0").kernel)
    with open(tmp_path / "runs.csv") as f:
        per_run = list(csv.DictReader(f))
    assert [float(row["test_error"]) for row in per_run] == pytest.approx([run["test_error"] for run in runs], rel=5e-6)
    assert all(len(row["test_error"].lstrip("0.")) <= 6 for row in per_run)  # rounded, not float32's 17 digits
    with open(tmp_path / "summary.csv") as f:
        summary = {(row["network"], row["estimator"]): row for row in csv.DictReader(f)}
    assert list(summary) == groups
    table = {tuple(line.split(" | ")[:2]): line.split(" | ") for line in (tmp_path / "summary.md").read_text().splitlines()}
    for group, row in summary.items():
        members = [line for line in per_run if (line["network"], line["estimator"]) == group]
        assert row["seeds"] == "2" and len(members) == 2
        columns = [column for column in per_run[0] if column not in ("run", "network", "estimator", "seed", "rank")
                   and members[0][column]]
        assert ("cost_model_speedup" in columns) == (group[0] == "mnist_gated") and "test_error" in columns
        for column in columns:
            values = np.array([float(line[column]) for line in members])
            # Both files hold 6 significant digits: the recomputed deviation moves by the values' rounding.
            rounding = 1e-5 * np.max(np.abs(values))
            assert float(row[f"{column}_mean"]) == pytest.approx(np.mean(values), rel=1e-5, abs=rounding), column
            assert float(row[f"{column}_std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-5, abs=rounding), column

        def shown(column, scale=1.0, digits=3):
            values = scale * np.array([float(line[column]) for line in members])
            return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"

        cells = table[("| " + group[0], group[1] or "-")]
        assert cells[3] == shown("test_error", 100, 2)
        if group[0] == "mnist_gated":
            assert cells[4] == ", ".join(shown(f"hidden_{i}_recall") for i in range(2))
            assert cells[6] == ", ".join(shown(f"hidden_{i}_true_density") for i in range(2))


def test_target_density_trains_each_layer_to_its_target_and_reports_times(tmp_path, capsys):
    npz = tiny_npz(tmp_path / "digits.npz")
    runs = mnist.main(TINY + ["--npz", npz, "--baseline", "--seeds", "0,1", "--epochs", "2", "--target-density",
                              "0.3,0.2", "--speed-batches", "1", "--logdir", str(tmp_path)])
    gated = [run for run in runs if run["layers"]]
    assert [layer.target_density.target for layer in gated_layers(gated[0]["model"])] == [0.3, 0.2]
    assert all(layer.target_density is None for layer in gated_layers(runs[0]["model"]))  # Dense has none
    for run in runs:
        assert len(run["epoch_seconds"]) == 2 and all(seconds > 0 for seconds in run["epoch_seconds"])
    strengths = gated[0]["history"]["hidden_1_density_penalty"]
    assert len(strengths) == 2 and all(np.isfinite(strengths))
    with open(tmp_path / "runs.csv") as f:
        per_run = list(csv.DictReader(f))
    for row, run in zip(per_run, runs):  # the CSV keeps 6 significant digits
        assert float(row["training_seconds"]) == pytest.approx(sum(run["epoch_seconds"]), rel=1e-5)
    assert float(per_run[1]["hidden_1_density_penalty"]) == pytest.approx(strengths[-1], rel=1e-5)
    out = capsys.readouterr().out
    (dense_first, dense_second), (gated_first, gated_second) = (
        np.mean([run["epoch_seconds"] for run in runs if bool(run["layers"]) == gated_run], axis=0)
        for gated_run in (False, True))
    dense_seconds, gated_seconds = dense_first + dense_second, gated_first + gated_second
    assert (f"mnist_dense: training {dense_seconds / 2:.2f} s/epoch; epoch 1 (tracing included) {dense_first:.2f} s, "
            f"later {dense_second:.2f} s/epoch\n") in out
    differences = [g["test_error"] - d["test_error"] for d, g in zip(runs[::2], runs[1::2])]
    assert (f"training {gated_seconds / 2:.2f} s/epoch ({gated_seconds / dense_seconds:.2f}x Dense's); epoch 1 "
            f"(tracing included) {gated_first:.2f} s ({gated_first / dense_first:.2f}x), later {gated_second:.2f} "
            f"s/epoch ({gated_second / dense_second:.2f}x); test error minus Dense's, paired over 2 seeds: "
            f"{100 * np.mean(differences):+.2f} ± {100 * np.std(differences, ddof=1) / np.sqrt(2):.2f} pt") in out
    assert (tmp_path / "density_targets.png").stat().st_size > 1000


def test_npz_split_holds_out_a_seeded_quarter(tmp_path):
    x = np.arange(40, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)  # image i is all i
    np.savez(tmp_path / "digits.npz", x=x, y=np.arange(40) % 10)
    (x_train, y_train), (x_test, y_test) = data.load_npz(str(tmp_path / "digits.npz"), data.MNIST, split_seed=3)
    train, test = x_train[:, 0, 0], x_test[:, 0, 0]
    assert len(test) == 10 and sorted(np.concatenate([train, test])) == list(range(40))
    np.testing.assert_array_equal(y_test, test % 10)
    again = data.load_npz(str(tmp_path / "digits.npz"), data.MNIST, split_seed=3)[1][0][:, 0, 0]
    other = data.load_npz(str(tmp_path / "digits.npz"), data.MNIST, split_seed=4)[1][0][:, 0, 0]
    np.testing.assert_array_equal(again, test)
    assert set(other) != set(test)


SHAPES = {"mnist": (28, 28), "svhn": (32, 32, 3)}


@pytest.mark.parametrize("script", [mnist, svhn], ids=["mnist", "svhn"])
@pytest.mark.parametrize(
    "content, message",
    [
        (None, "is not an .npz with arrays x and y"),
        ("x only", "is not an .npz with arrays x and y"),
        ("one pixel short", r"expected x \[N, {shape}\] and y \[N\] with N >= 4, got x \(10, {short}\)"),
        ("float pixels", "expected x of dtype uint8 \\(pixel values 0-255\\), got float32"),
        ("label 10", "expected labels y in 0-9, got 10$"),
    ],
)
def test_bad_npz_is_one_line(tmp_path, capsys, script, content, message):
    shape = SHAPES[script.__name__]
    arrays = {"x": np.zeros((10,) + shape, np.uint8), "y": np.zeros(10, np.int64)}
    if content == "x only":
        del arrays["y"]
    elif content == "one pixel short":
        arrays["x"] = np.zeros((10,) + shape[:-1] + (shape[-1] - 1,), np.uint8)
    elif content == "float pixels":
        arrays["x"] = arrays["x"].astype(np.float32)
    elif content == "label 10":
        arrays["y"][3] = 10
    path = tmp_path / "bad.npz"
    if content is not None:
        np.savez(path, **arrays)
    with pytest.raises(SystemExit) as exit_info:
        cli.main_guard(script.main, ["--npz", str(path)] + TINY)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith(f"error: --npz {str(path)!r}")
    short = ", ".join(map(str, shape[:-1] + (shape[-1] - 1,)))
    assert re.search(message.format(shape=", ".join(map(str, shape)), short=short), error), error


@pytest.mark.parametrize("message, cause", [
    ("Failed to resolve host (simulated offline machine)\nsecond line", "Failed to resolve host (simulated offline "
     "machine)"),
    # What requests raises for SVHN offline: the cause is inside nested quotes.
    ("HTTPConnectionPool(host='ufldl.stanford.edu', port=80): Max retries exceeded with url: /housenumbers/"
     "extra_32x32.mat (Caused by NameResolutionError(\"HTTPConnection(host='ufldl.stanford.edu', port=80): Failed to "
     "resolve 'ufldl.stanford.edu' ([Errno -3] Temporary failure in name resolution)\"))",
     "cannot reach ufldl.stanford.edu; is this machine offline?"),
], ids=["plain", "requests"])
def test_unreachable_tfds_is_one_line_naming_the_flags(monkeypatch, capsys, message, cause):
    def offline(*args, **kwargs):
        raise ConnectionError(message)

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(SystemExit):
        cli.main_guard(mnist.main, TINY)
    error = capsys.readouterr().err.strip()
    assert error == (f"error: could not load 'mnist' with tensorflow-datasets (ConnectionError: {cause}); "
                     "pass --data-dir with a prepared copy or --npz with arrays")
    from tensorflow_datasets.core.download import downloader

    assert downloader.MAX_RETRIES == 0  # no minutes of retries on an offline machine


def test_bad_flags_are_rejected(capsys):
    with pytest.raises(SystemExit):
        mnist.main(["--hidden", "10,0"])
    assert "positive integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mnist.main(["--npz", "x.npz", "--hidden", "10,10,10", "--ranks", "2,3"])
    assert "--ranks needs 1 or 3 values (one per hidden layer), got 2,3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--estimator", "svd,nope"], "--estimator: expected estimators from {names}, got 'nope'"),
        (["--seeds", "0,-1"], "--seeds: expected distinct non-negative integers, got '0,-1'"),
        (["--seeds", "1,1"], "--seeds: expected distinct non-negative integers, got '1,1'"),
        (["--refit-every", "0"], "--refit-every: expected a positive integer, got '0'"),
        (["--target-density", "0.1,1.5"], "--target-density: expected comma-separated numbers in (0, 1], got '0.1,1.5'"),
        (["--target-density", "0.1,0.2,0.3"], "--target-density needs 1 or 2 values (one per hidden layer), got 0.1,0.2,0.3"),
        (["--sweep-ranks", "2,4", "--seeds", "0,1"],
         "--sweep-ranks trains one network per rank for one seed and one estimator, got --seeds 0,1"),
    ],
)
def test_bad_experiment_flags_name_the_value(capsys, flags, message):
    with pytest.raises(SystemExit):
        mnist.main(["--npz", "x.npz"] + flags)
    assert message.format(names=", ".join(ESTIMATORS)) in capsys.readouterr().err


@pytest.mark.parametrize("script", ["mnist", "svhn", "convert_mnist"])
def test_help_names_only_its_own_flags_each_with_help(capsys, script):
    module = __import__(script)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    defined = set(re.findall(r"^  (--[a-z][a-z-]*)", options, re.MULTILINE))
    assert set(re.findall(r"--[a-z][a-z-]*", text)) <= defined | {"--help"}
    # Every flag is followed by its help: on its own line, or beside it.
    for entry in re.split(r"\n(?=  -)", options)[1:]:
        assert len(entry.split()) > 2, entry


@pytest.mark.parametrize("script", ["mnist", "svhn"])
def test_help_names_the_layer_defaults(capsys, script):
    with pytest.raises(SystemExit):
        __import__(script).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the layer's default" not in text and "SVD refits" not in text
    defaults = inspect.signature(LowRankGatedDense).parameters
    for flag, name in (("--estimator NAMES", "estimator"), ("--margin MARGIN", "margin"),
                       ("--training-path {auto,dense,gated}", "training_path")):
        assert re.search(f"{re.escape(flag)} [^(]*\\(default: {defaults[name].default}\\)", text), flag
    refits = ", ".join(f"{name} {estimators.get(name).refit_every}" for name in ESTIMATORS
                       if getattr(estimators.get(name), "refit_every", None) is not None)
    assert f"(default: each estimator's own: {refits})" in text


def test_each_run_writes_to_a_folder_of_its_own(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    npz = tiny_npz(tmp_path / "digits.npz")
    for _ in range(2):
        mnist.main(TINY + ["--npz", npz, "--speed-batches", "1"])
        time.sleep(1.0)  # the folders are named to the second
    folders = sorted((tmp_path / "runs").iterdir())
    assert [re.fullmatch(r"mnist-\d{8}-\d{6}", folder.name) is not None for folder in folders] == [True, True]
    printed = re.findall(r"^this run writes to (.+)/$", capsys.readouterr().out, re.MULTILINE)
    assert [os.path.join(tmp_path, path) for path in printed] == [str(folder) for folder in folders]
    assert all((folder / "summary.csv").exists() for folder in folders)


def test_flags_left_out_take_the_layer_defaults():
    parser = cli.ExampleParser("", data.MNIST, hidden=[8], epochs=1, l1=0.0, ranks=[2])
    args = parser.parse_args(["--seed", "5"])
    assert args.estimators == [None] and args.refit_every is None and args.margin is None and args.seeds == [5]
    every = ",".join(ESTIMATORS)  # whatever the library offers today, in its order
    args = parser.parse_args(["--estimator", every, "--seeds", "0,2,1", "--refit-every", "7"])
    assert args.estimators == list(ESTIMATORS) and args.seeds == [0, 2, 1] and args.refit_every == 7


def test_convert_mnist_end_to_end(tmp_path):
    import convert_mnist

    npz = patch_images(tmp_path / "patches.npz", data.MNIST.image_shape, mislabelled=0.3)
    result = convert_mnist.main(["--npz", npz, "--hidden", "40,30", "--epochs", "5", "--learning-rate", "1e-2",
                                 "--batch-size", "16", "--rank", "4", "--ranks", "2,4,8", "--logdir", str(tmp_path)])
    import matplotlib.image

    picture = matplotlib.image.imread(tmp_path / "convert_mnist.png")
    assert picture.shape[1] == 10 * 110 and picture[..., :3].std() > 0.05
    _, (x_test, y_test) = data.load(data.MNIST, npz, None, 0)
    assert [row["layer"] for row in result["report"].rows] == ["hidden_0", "hidden_1"]
    for stage, model in result["models"].items():
        logits, gates, uncertain_rows = numpy_forward(model, x_test)
        accuracy = np.mean(np.argmax(logits, axis=1) == y_test)
        assert result["accuracy"][stage] == pytest.approx(accuracy, abs=uncertain_rows.mean() + 1e-9), stage
        assert accuracy > 0.6, (stage, accuracy)  # chance is 0.1, the best ~0.73 (30% labels redrawn)
    densities = [gates[layer]["predicted_density"] for layer in ("hidden_0", "hidden_1")]
    np.testing.assert_allclose(result["densities"], densities, atol=gates["hidden_0"]["tolerance"]["density"] + 1e-6)
    assert sorted(result["speedup_fine_tuned"]) == [1, 256]
