import json

import pytest

from lrc_keras import benchmark


def test_benchmark_table_rows(tmp_path, monkeypatch):
    # The table's structure and densities, not its timings (those belong to the script's run).
    monkeypatch.setattr(benchmark, "SHAPES", ((40, 30, 4),))
    monkeypatch.setattr(benchmark, "BATCHES", (1, 8))
    monkeypatch.setattr(benchmark, "DENSITIES", (0.1, 0.5))
    monkeypatch.chdir(tmp_path)  # no ../shared MNIST file here: no trained rows
    out = tmp_path / "table.json"
    benchmark.main(["--out", str(out), "--repeats", "1", "--calls", "2"])
    # Where a GPU is visible the same rows follow, labelled "GPU ...": check the CPU ones.
    rows = [r for r in json.loads(out.read_text())["rows"] if not r["layer"].startswith("GPU")]
    assert [(r["batch"], r["layer"]) for r in rows] == [(1, "40->30 r=4")] * 2 + [(8, "40->30 r=4")] * 2
    for row, density in zip(rows, [0.1, 0.5, 0.1, 0.5]):
        # Exact through the margin, up to one unit of the batch's estimates.
        assert row["density"] == pytest.approx(density, abs=1.0 / (row["batch"] * 30) + 1e-3)
        expected_limit = 40 * 30 / (4 * 70 + row["density"] * 40 * 30)
        assert row["cost_model_limit"] == pytest.approx(expected_limit, rel=1e-3)
        assert 0 < row["dense_us"] < 1e6 and 0 < row["gated_us"] < 1e6
