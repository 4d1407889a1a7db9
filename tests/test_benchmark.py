import itertools
import json
import os
import re
import sys

import pytest

# The benchmarks are commands in the repository's benchmarks/ folder, not modules of the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import benchmark  # noqa: E402
import gated_layer_step  # noqa: E402


def test_benchmark_table_rows(tmp_path, monkeypatch):
    # The table's structure, densities, and what it makes of the timings: those come from a
    # timer the test controls (the real ones belong to the script's run), a different pair
    # (dense, gated) of seconds a call for each row.
    timings = itertools.cycle([(300e-6, 100e-6), (500e-6, 400e-6), (90e-6, 120e-6), (800e-6, 200e-6)])

    def fake_median_times(functions, x, repeats, calls):
        assert sorted(functions) == ["dense", "gated"] and (repeats, calls) == (1, 2)
        return dict(zip(("dense", "gated"), next(timings)))

    monkeypatch.setattr(benchmark, "median_times", fake_median_times)
    monkeypatch.setattr(benchmark, "SHAPES", ((40, 30, 4),))
    monkeypatch.setattr(benchmark, "BATCHES", (1, 8))
    monkeypatch.setattr(benchmark, "DENSITIES", (0.1, 0.5))
    monkeypatch.chdir(tmp_path)  # no ../shared MNIST file here: no trained rows
    out = tmp_path / "table.json"
    benchmark.main(["--out", str(out), "--repeats", "1", "--calls", "2"])
    # Where a GPU is visible the same rows follow, labelled "GPU ...": check the CPU ones.
    rows = [r for r in json.loads(out.read_text())["rows"] if not r["layer"].startswith("GPU")]
    assert [(r["batch"], r["layer"]) for r in rows] == [(1, "40->30 r=4")] * 2 + [(8, "40->30 r=4")] * 2
    # The limit d·n / (r·(d + n) + ρ·d·n) at the requested densities, for d=40, n=30, r=4:
    # 1200 / (280 + 120) = 3.0 at ρ = 0.1 and 1200 / (280 + 600) = 1.364 at ρ = 0.5.
    # The injected timings in µs, and the speed-ups they make: 300/100, 500/400, 90/120, 800/200.
    timed = [(300, 100, 3.0), (500, 400, 1.25), (90, 120, 0.75), (800, 200, 4.0)]
    for row, density, limit, (dense_us, gated_us, speedup) in zip(rows, [0.1, 0.5, 0.1, 0.5],
                                                                  [3.0, 1.364, 3.0, 1.364], timed):
        # Exact through the margin: a quantile between two distinct estimates (batch x 30 of them).
        assert row["density"] == pytest.approx(density, abs=1e-6)
        assert row["cost_model_limit"] == pytest.approx(limit, rel=1e-3)
        assert (row["dense_us"], row["gated_us"], row["speedup"]) == pytest.approx((dense_us, gated_us, speedup))


@pytest.mark.parametrize("flags, message", [
    (["--training", "--repeats", "3"], "--repeats belongs to the inference mode, not to --training"),
    (["--calls", "3", "--training"], "--calls belongs to the inference mode, not to --training"),
    (["--rounds", "2"], "--rounds belongs to the training mode; add --training"),
])
def test_benchmark_modes_refuse_each_others_options(capsys, flags, message):
    with pytest.raises(SystemExit):
        benchmark.main(flags)
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_benchmark_help_names_every_default(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [*benchmark.MODE_OPTIONS["inference"].items(), *benchmark.MODE_OPTIONS["training"].items()]:
        assert re.search(f"--{option.replace('_', '-')} [A-Z_]+ [^(]*\\(default: {default}\\)", text), option
    assert "benchmark_inference.json" in text and "benchmark_training.json" in text and "(default: None)" not in text


def test_gated_layer_step_help_documents_every_option(capsys):

    with pytest.raises(SystemExit):
        gated_layer_step.main(["--help"])
    options = capsys.readouterr().out.split("options:")[1]
    entries = [" ".join(entry.split()) for entry in re.split(r"\n(?=  --)", options)[1:]]
    assert [entry.split()[0] for entry in entries] == ["--batch", "--repeats", "--calls", "--out"]
    for entry in entries:  # the option, its metavar, words of help, and its default
        assert re.fullmatch(r"--[a-z]+ [A-Z]+ \w.* \(default: \S+\)", entry), entry
