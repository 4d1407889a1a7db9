"""tools/gpu_check: the GPU harness keeps working without a GPU (on the CPU shim), catches wrong
kernels, and compiles with nvcc where nvcc exists. Select with `pytest -k "cuda or gpu"`."""

import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "tools", "gpu_check", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shim_library(gpu_check, tmp_path_factory):
    return gpu_check.Library(gpu_check.build(True, str(tmp_path_factory.mktemp("gpu_check_shim"))))


def test_gpu_check_runs_on_the_cpu_shim(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, SCRIPT, "--shim", "--build-dir", str(tmp_path), "--json", str(report)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 mismatches" in result.stdout and "| 40->9 r=3 | 5 |" in result.stdout
    assert "3. speed of a training step" in result.stdout
    saved = json.loads(report.read_text())
    assert saved["mismatches"] == []
    # Every row ran the forward kernel: the measured density of 9 units × 1 or 5 rows near the 0.25 asked.
    assert [(row["step"], row["batch"]) for row in saved["timings"]] == [
        ("inference", 1), ("inference", 5), ("training", 1), ("training", 5)]
    assert all(0.1 < row["density"] < 0.45 for row in saved["timings"])


class FaultyOutput:
    """The shim library, but for batches of `batch` rows the gated kernel's y[row, unit] comes out
    `error` off, or its active fraction `fraction_error` off, or the backward's `gradient`
    ("grad_x", "grad_kernel" or "grad_bias") `gradient_error` off at its flat `element`, or
    LrcGatedLayer's `layer_output` ("y", "skipped", "gate_counts" or "active_fraction")
    `layer_error` off at its flat `element`."""

    def __init__(self, library, batch, row=0, unit=0, error=0.0, fraction_error=0.0, gradient=None, element=0,
                 gradient_error=0.0, layer_output=None, layer_error=0.0):
        self.library, self.batch, self.row, self.unit = library, batch, row, unit
        self.error, self.fraction_error = error, fraction_error
        self.gradient, self.element, self.gradient_error = gradient, element, gradient_error
        self.layer_output, self.layer_error = layer_output, layer_error
        self.gated_layer_counters = library.gated_layer_counters
        self.gated_layer_partial_sums = library.gated_layer_partial_sums

    def gated_dense(self, *args):
        self.library.gated_dense(*args)
        batch, units, y, fraction = args[0], args[2], args[8], args[9]
        if batch == self.batch:
            ctypes.cast(y, ctypes.POINTER(ctypes.c_float))[self.row * units + self.unit] += self.error
            ctypes.cast(fraction, ctypes.POINTER(ctypes.c_float))[0] += self.fraction_error

    def masked_relu(self, *args):
        self.library.masked_relu(*args)

    def gated_dense_grad(self, *args):
        self.library.gated_dense_grad(*args)
        outputs = dict(zip(("grad_x", "grad_kernel", "grad_bias"), args[7:10]))
        if args[0] == self.batch and self.gradient is not None:
            ctypes.cast(outputs[self.gradient], ctypes.POINTER(ctypes.c_float))[self.element] += self.gradient_error

    def gated_layer(self, *args):
        self.library.gated_layer(*args)
        batch, units, skipped_rows = args[0], args[2], args[5]
        outputs = dict(zip(("y", "skipped", "gate_counts", "active_fraction"), args[13:17]))
        sizes = {"y": batch * units, "skipped": skipped_rows * units, "gate_counts": 4, "active_fraction": 1}
        # Only within the output: a write past a smaller one's end (fewer sampled rows) would
        # corrupt the heap of this process.
        if batch == self.batch and self.layer_output is not None and self.element < sizes[self.layer_output]:
            ctypes.cast(outputs[self.layer_output], ctypes.POINTER(ctypes.c_float))[self.element] += self.layer_error


TINY_GRID = {"batches": (0, 3), "input_dims": (40,), "units": (9,), "densities": (0.25, 1.0)}


@pytest.mark.parametrize(
    "fault, message",
    [
        # 1e-3 on an output of size ~1: ten times the tolerance. Density 1 computes every unit.
        (dict(unit=4, error=1e-3), "gated_dense batch=3 input_dim=40 units=9 density=1.0: 1 of 27 outputs wrong; first [0, 4]"),
        (dict(row=1, unit=8, error=np.nan), "density=1.0: 1 of 27 outputs wrong; first [1, 8]"),
        (dict(fraction_error=1 / 27), "density=1.0: active fraction 1.037037, expected 1"),
    ],
)
def test_gpu_check_reports_a_wrong_kernel(gpu_check, shim_library, fault, message):
    problems = gpu_check.check_kernels(gpu_check.ShimDevice(), FaultyOutput(shim_library, 3, **fault), TINY_GRID)
    assert any(message in problem for problem in problems), problems
    assert not any("masked_relu" in problem for problem in problems)


@pytest.mark.parametrize(
    "gradient, element, error, message",
    [
        # 1e-3 on outputs of size up to ~3: more than twice the tolerance 1e-4·(1 + |expected|).
        ("grad_x", 2 * 40 + 39, 1e-3, "grad_x: 1 of 120 wrong; first [2, 39]"),
        ("grad_kernel", 4 * 40 + 3, -1e-3, "grad_kernel: 1 of 360 wrong; first [4, 3]"),
        ("grad_bias", 8, np.nan, "grad_bias: 1 of 9 wrong; first [8]: nan"),
    ],
)
def test_gpu_check_reports_a_wrong_backward(gpu_check, shim_library, gradient, element, error, message):
    faulty = FaultyOutput(shim_library, 3, gradient=gradient, element=element, gradient_error=error)
    problems = gpu_check.check_kernels(gpu_check.ShimDevice(), faulty, TINY_GRID)
    assert [problem.split(":")[0] for problem in problems] == [
        f"gated_dense_grad batch=3 input_dim=40 units=9 density={density}" for density in TINY_GRID["densities"]]
    assert all(message in problem for problem in problems), problems


# Batch 3, input_dim 40, units 9: rank 1 with no dense rows, rank 40 with one dense row and one
# sampled, rank 8 with three dense rows and three sampled (layer_configurations).
@pytest.mark.parametrize(
    "output, element, error, message",
    [
        ("y", 1 * 9 + 4, 1e-3, "rank=1 dense_rows=0 sample_rows=0 density=1.0: 1 of 27 outputs wrong; first [1, 4]"),
        ("skipped", 2 * 9 + 8, 0.5, "rank=8 dense_rows=3 sample_rows=4 density=0.25 skipped: 1 of 27 outputs wrong; first [2, 8]"),
        ("gate_counts", 1, 1.0, "rank=40 dense_rows=1 sample_rows=1 density=0.25: gate counts"),
        ("active_fraction", 0, 1 / 27, "rank=1 dense_rows=0 sample_rows=0 density=1.0: active fraction 1.037037, expected 1"),
    ],
)
def test_gpu_check_reports_a_wrong_gated_layer(gpu_check, shim_library, output, element, error, message):
    faulty = FaultyOutput(shim_library, 3, element=element, layer_output=output, layer_error=error)
    problems = gpu_check.check_gated_layer(gpu_check.ShimDevice(), faulty, TINY_GRID)
    assert problems and all(problem.startswith("gated_layer batch=3 input_dim=40 units=9") for problem in problems)
    assert any(message in problem for problem in problems), problems


@pytest.mark.parametrize("fault, message", [
    (dict(error=1.0), "MISMATCH gated_dense batch=3"),
    (dict(layer_output="y", layer_error=1.0), "MISMATCH gated_layer batch=3"),
    (dict(gradient="grad_x", gradient_error=1.0), "MISMATCH gated_dense_grad batch=3"),
])
def test_gpu_check_exits_1_on_a_mismatch(gpu_check, shim_library, monkeypatch, capsys, tmp_path, fault, message):
    monkeypatch.setattr(gpu_check, "SHIM_CHECK_GRID", TINY_GRID)
    monkeypatch.setattr(gpu_check, "Library", lambda path: FaultyOutput(shim_library, 3, **fault))
    assert gpu_check.main(["--shim", "--build-dir", str(tmp_path)]) == 1
    assert message in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_gpu_check_compiles_with_nvcc(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--build-only", "--build-dir", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "gpu_check.so").stat().st_size > 0
