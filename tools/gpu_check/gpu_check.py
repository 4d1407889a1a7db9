"""Checks and times the CUDA kernels of custom_ops/ on a GPU, without TensorFlow.

    python3 tools/gpu_check/gpu_check.py          # a machine with a GPU, nvcc, numpy and PyTorch
    python3 tools/gpu_check/gpu_check.py --shim   # the same checks on the CPU (tests/cuda_shim)

It compiles the ops' own launches (custom_ops/gated_dense_gpu.cu.cc, gated_dense_grad_gpu.cu.cc
and gated_layer_gpu.cu.cc, which include the kernels of custom_ops/*_gpu_kernels.cu.h) and
launches.cc into one shared library with nvcc, for the architectures setup.py builds, loads it
with ctypes and hands it PyTorch's device pointers and stream. Then:
  1. correctness: the forward kernels (LrcGatedDense's, LrcMaskedRelu's) and the backward one
     (LrcGatedDenseGrad's) against float64 numpy, for every batch, input_dim, units and
     predicted density of the grids below, with NaN estimates and a NaN input; the forward's y
     in a buffer of its own and in each input buffer the op may hand over
     (gated_dense_kernels.cc); the backward's grad_y NaN on pairs it must not read. Then
     LrcGatedLayer's (the estimate's products, y, the sampled rows' skipped units and gate
     counts, the active fraction) over the same grid, at ranks 1, 8 and input_dim with no,
     half and all rows computed densely. Every mismatch is printed, and the exit status is 1
     if there was any.
  2. speed of inference: the gated layer (the estimate's two GEMMs in cuBLAS, then the gated
     kernel; and LrcGatedLayer, the whole layer in one op) against the dense layer (one cuBLAS
     GEMM with the bias, then relu), timed with CUDA events, printed as a markdown table.
  3. speed of a training step: the gated layer's forward and backward kernels (and the
     estimate's GEMMs) against the three cuBLAS GEMMs of a dense layer's step, likewise.
With --shim, the library is built with g++ on the CPU shim of the tests and the same code runs
on small grids: the pytest suite runs it so that this script keeps working without a GPU; its
timings mean nothing.
"""

import argparse
import ast
import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CUSTOM_OPS = os.path.join(ROOT, "custom_ops")
CUDA_SHIM = os.path.join(ROOT, "tests", "cuda_shim")

# The grids of the GPU run and of the shim (std::threads run every CUDA thread: keep it small).
# Batches end inside the kernel's row tiles (4 to 32 rows), units inside its blocks of 8.
GPU_CHECK_GRID = {"batches": (0, 1, 3, 33, 256), "input_dims": (1, 7, 784, 3072),
                  "units": (1, 257, 1000, 4000), "densities": (0.0, 0.05, 0.25, 1.0)}
SHIM_CHECK_GRID = {"batches": (0, 1, 3, 33), "input_dims": (7, 40),
                   "units": (1, 9), "densities": (0.0, 0.05, 0.25, 1.0)}
# (input_dim, units, rank) as in BENCHMARKS.md.
GPU_TIMING_GRID = {"layers": ((784, 1000, 20), (3072, 4000, 50)), "batches": (1, 16, 256),
                   "densities": (0.05, 0.1, 0.25), "calls": 50, "repeats": 7}
SHIM_TIMING_GRID = {"layers": ((40, 9, 3),), "batches": (1, 5), "densities": (0.25,),
                    "calls": 1, "repeats": 1}

# float32 dot products of length <= 3072 of N(0, 1) inputs and N(0, 1/d) weights are within
# ~1e-6 of float64; one wrong term is off by ~1e-2.
TOLERANCE = 1e-4
# Estimates this close to the threshold may fall either side of it in float32.
BOUNDARY = 1e-3
# z + b this close to 0 may have either sign in float32 (z given in float32, b added on the device).
SIGN_BOUNDARY = 1e-6


def log(message):
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# Building and loading the library.


def setup_nvcc_architectures():
    """NVCC_ARCHS of setup.py: the harness is compiled for what the op ships."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_ARCHS" for t in node.targets):
                return ast.literal_eval(node.value)
    raise RuntimeError("setup.py defines no NVCC_ARCHS")


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(cuda_home, "bin", "nvcc")
    nvcc = shutil.which("nvcc") or (candidate if os.path.exists(candidate) else None)
    if nvcc is None:
        raise SystemExit("gpu_check: nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    return nvcc


def build(shim, build_dir):
    """Compiles the library (nvcc, or g++ on the CPU shim) into build_dir; returns its path."""
    os.makedirs(build_dir, exist_ok=True)
    launches = os.path.join(HERE, "launches.cc")
    if shim:
        library = os.path.join(build_dir, "gpu_check_shim.so")
        command = [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                   f"-I{CUSTOM_OPS}", f"-I{CUDA_SHIM}", launches, "-o", library]
    else:
        library = os.path.join(build_dir, "gpu_check.so")
        command = [find_nvcc(), "-shared", "-x", "cu", "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
                   "-DGOOGLE_CUDA=1", *setup_nvcc_architectures(), f"-I{CUSTOM_OPS}",
                   os.path.join(CUSTOM_OPS, "gated_dense_gpu.cu.cc"),
                   os.path.join(CUSTOM_OPS, "gated_dense_grad_gpu.cu.cc"),
                   os.path.join(CUSTOM_OPS, "gated_layer_gpu.cu.cc"), launches, "-o", library]
    log("building: " + " ".join(command))
    started = time.perf_counter()
    subprocess.run(command, check=True)
    log(f"built {library} in {time.perf_counter() - started:.0f} s")
    return library


class Library:
    """The C API of launches.cc; each call raises on a launch error."""

    def __init__(self, path):
        self._library = ctypes.CDLL(path)
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        self._library.gated_dense.argtypes = [int64] * 3 + [pointer] * 4 + [ctypes.c_float] + [pointer] * 4
        self._library.masked_relu.argtypes = [int64] * 2 + [pointer] * 3 + [ctypes.c_float] + [pointer] * 4
        self._library.gated_dense_grad.argtypes = [int64] * 3 + [pointer] * 8
        self._library.gated_layer.argtypes = [int64] * 6 + [pointer] * 4 + [ctypes.c_float] + [pointer] * 9
        for function in ("gated_dense", "masked_relu", "gated_dense_grad", "gated_layer"):
            getattr(self._library, function).restype = ctypes.c_char_p
        self._library.gated_layer_partial_sums.argtypes = [int64] * 4
        self._library.gated_layer_partial_sums.restype = int64
        self.gated_layer_counters = self._library.gated_layer_counters()
        if hasattr(self._library, "spin"):
            self._library.spin.argtypes = [int64, pointer]
            self._library.spin.restype = ctypes.c_char_p

    def _call(self, function, *args):
        error = getattr(self._library, function)(*args)
        if error is not None:
            raise RuntimeError(f"{function}: {error.decode()}")

    def gated_dense(self, *args):
        self._call("gated_dense", *args)

    def masked_relu(self, *args):
        self._call("masked_relu", *args)

    def gated_dense_grad(self, *args):
        self._call("gated_dense_grad", *args)

    def gated_layer(self, *args):
        self._call("gated_layer", *args)

    def gated_layer_partial_sums(self, batch, input_dim, units, rank):
        return self._library.gated_layer_partial_sums(batch, input_dim, units, rank)

    def spin(self, nanoseconds, stream):
        self._call("spin", nanoseconds, stream)


# ----------------------------------------------------------------------------------------------
# Devices: where the arrays live and how a run is timed. Arrays are float32 unless said.


class ShimDevice:
    """numpy arrays; the shim library runs the kernels on the CPU within the call."""

    label = "CPU shim (tests/cuda_shim): kernel logic only, timings are not GPU figures"
    stream = None

    def upload(self, array):
        return np.array(array, copy=True, order="C")

    def empty(self, shape, dtype=np.float32):
        return np.empty(shape, dtype)

    def download(self, array):
        return np.array(array)

    def pointer(self, array):
        return array.ctypes.data

    def matmul(self, a, b, out):
        np.matmul(a, b, out=out)

    def dense_layer(self, x, kernel, bias, out, tf32):
        """relu(x·kernelᵀ + bias) into out; the shim has float32 only, so tf32 changes nothing."""
        np.matmul(x, kernel.T, out=out)
        out += bias
        np.maximum(out, 0.0, out=out)

    def dense_step(self, x, kernel, bias, grad_y, z, grad_x, grad_kernel, tf32):
        """The three GEMMs of a dense layer's training step (see TorchGpu.dense_step)."""
        self.dense_layer(x, kernel, bias, z, tf32)
        np.matmul(grad_y, kernel, out=grad_x)
        np.matmul(grad_y.T, x, out=grad_kernel)

    def seconds_per_call(self, function, calls, repeats):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(calls):
                function()
            times.append((time.perf_counter() - started) / calls)
        return float(np.median(times))


def import_torch():
    """PyTorch with a GPU, or exit with a one-line reason."""
    try:
        import torch
    except ImportError:
        raise SystemExit("gpu_check: PyTorch is not installed; without a GPU, run with --shim") from None
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: PyTorch sees no GPU (torch.cuda.is_available() is False); "
                         "without one, run with --shim")
    return torch


class TorchGpu:
    """PyTorch tensors on the first GPU, its current stream, CUDA events."""

    WARMUP_CALLS = 3

    def __init__(self, torch, library):
        self.torch = torch
        self.library = library
        self.spin_ns = 2_000_000  # doubled whenever the host falls behind (see seconds_per_call)
        properties = torch.cuda.get_device_properties(0)
        self.label = (f"{properties.name}, {properties.multi_processor_count} SMs, PyTorch {torch.__version__} "
                      f"(CUDA {torch.version.cuda})")

    @property
    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream

    def upload(self, array):
        return self.torch.from_numpy(np.array(array, copy=True, order="C")).cuda()

    def empty(self, shape, dtype=np.float32):
        # uint64 counters only need their 8 bytes: int64 holds them.
        torch_dtype = {np.float32: self.torch.float32, np.uint64: self.torch.int64}[dtype]
        return self.torch.empty(shape, dtype=torch_dtype, device="cuda")

    def download(self, tensor):
        return tensor.cpu().numpy()  # waits for the stream

    def pointer(self, tensor):
        return tensor.data_ptr()

    def matmul(self, a, b, out):
        self.torch.mm(a, b, out=out)

    @contextlib.contextmanager
    def matmul_precision(self, tf32):
        """cuBLAS in TF32 (as TensorFlow runs float32 GEMMs by default on Ampere and later) or FP32."""
        self.torch.set_float32_matmul_precision("high" if tf32 else "highest")
        try:
            yield
        finally:
            self.torch.set_float32_matmul_precision("highest")

    def dense_layer(self, x, kernel, bias, out, tf32):
        """relu(x·kernelᵀ + bias) into out: cuBLAS with the bias as C, then relu in place."""
        with self.matmul_precision(tf32):
            self.torch.addmm(bias, x, kernel.t(), out=out)
            out.relu_()

    def dense_step(self, x, kernel, bias, grad_y, z, grad_x, grad_kernel, tf32):
        """The three cuBLAS GEMMs of a dense layer's training step: z = relu(x·kernelᵀ + bias)
        (the bias as C, relu in place), dL/dx = grad_y·kernel, dL/dW = grad_yᵀ·x. Its relu
        gradient and bias sum are not counted, which favours Dense."""
        with self.matmul_precision(tf32):
            self.torch.addmm(bias, x, kernel.t(), out=z)
            z.relu_()
            self.torch.mm(grad_y, kernel, out=grad_x)
            self.torch.mm(grad_y.t(), x, out=grad_kernel)

    def seconds_per_call(self, function, calls, repeats):
        """Median over repeats of the GPU time between two events around `calls` calls.

        A spin kernel holds the stream while the host queues the calls, so the events time the
        GPU's work and not the host's launch latency; if the spin ended before the host had
        queued every call, the repeat is done again with a spin twice as long.
        """
        torch = self.torch
        for _ in range(self.WARMUP_CALLS):
            function()
        times = []
        while len(times) < repeats:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.library.spin(self.spin_ns, self.stream)
            start.record()
            for _ in range(calls):
                function()
            end.record()
            host_kept_ahead = not start.query()
            end.synchronize()
            if host_kept_ahead:
                times.append(start.elapsed_time(end) / 1e3 / calls)
            else:
                self.spin_ns *= 2
                log(f"  (the host fell behind the GPU: spinning {self.spin_ns / 1e6:.0f} ms before each repeat)")
        return float(np.median(times))


# ----------------------------------------------------------------------------------------------
# Correctness.


def margin_for_density(z_hat, density):
    """The margin at which a fraction `density` of the finite estimates select their unit
    (the rule of lrc_keras.gating, which imports TensorFlow)."""
    if density <= 0:
        return -float("inf")
    if density >= 1:
        return float("inf")
    return -float(np.nanquantile(z_hat, 1.0 - density))


def compare(name, y, z, bias, product, margin, fraction, selects=True):
    """Mismatches of one run against the contract of custom_ops/gated_dense.h, in float64.

    z: x·Wᵀ in float64 (NaN where x has a NaN). Estimates within BOUNDARY of the threshold may be
    decided either way, but y must then be 0 or the computed value, and the active fraction
    must lie between the counts of the two decisions. With selects=False, y holds the pairs the
    estimate does not select (LrcGatedLayer's skipped), and fraction is None.
    """
    z_hat = product.astype(np.float64) + bias
    selected = ~(z_hat <= -margin)  # NaN estimates select their unit
    undecided = np.abs(z_hat + margin) <= BOUNDARY
    relu = np.maximum(z + bias, 0.0)
    close = np.isclose(y, relu, rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True)
    kept = selected if selects else ~selected
    wrong = np.where(undecided, ~(close | (y == 0.0)), np.where(kept, ~close, y != 0.0))
    problems = []
    if wrong.any():
        i, j = np.argwhere(wrong)[0]
        expected = relu[i, j] if kept[i, j] else 0.0
        problems.append(f"{name}: {wrong.sum()} of {wrong.size} outputs wrong; first [{i}, {j}]: "
                        f"y={float(y[i, j]):.7g}, expected {expected:.7g} "
                        f"(estimate {z_hat[i, j]:.7g}, margin {margin:.7g})")
    if fraction is None:
        return problems
    if y.size:
        low, high = (selected & ~undecided).sum() / y.size, (selected | undecided).sum() / y.size
    else:
        low = high = 0.0
    if not low - 1e-6 <= fraction <= high + 1e-6:
        problems.append(f"{name}: active fraction {fraction:.7g}, expected {low:.7g}" +
                        (f" to {high:.7g}" if high != low else ""))
    return problems


def run_gated_dense(device, library, x, kernel, bias, product, margin, alias):
    """y and the active fraction of the gated kernel; y in product's buffer if alias."""
    batch, units = product.shape
    product_on_device = device.upload(product)
    y = product_on_device if alias else device.upload(np.full(product.shape, np.nan, np.float32))
    fraction, scratch = device.empty((1,)), device.empty((1,), np.uint64)
    library.gated_dense(batch, x.shape[1], units, device.pointer(x), device.pointer(kernel),
                        device.pointer(bias), device.pointer(product_on_device), margin, device.pointer(y),
                        device.pointer(fraction), device.pointer(scratch), device.stream)
    return device.download(y), float(device.download(fraction)[0])


def run_masked_relu(device, library, z, bias, product, margin, output):
    """y and the active fraction of the GEMM path's epilogue; output: "own", "z" or "product"."""
    batch, units = product.shape
    z_on_device, product_on_device = device.upload(z), device.upload(product)
    y = {"z": z_on_device, "product": product_on_device}.get(output)
    if y is None:
        y = device.upload(np.full(product.shape, np.nan, np.float32))
    fraction, scratch = device.empty((1,)), device.empty((1,), np.uint64)
    library.masked_relu(batch, units, device.pointer(z_on_device), device.pointer(bias),
                        device.pointer(product_on_device), margin, device.pointer(y),
                        device.pointer(fraction), device.pointer(scratch), device.stream)
    return device.download(y), float(device.download(fraction)[0])


def run_gated_dense_grad(device, library, grad_y, y, x, kernel):
    """dL/dx, dL/dW and dL/db of the backward kernel, each written into a buffer of NaN."""
    (batch, units), input_dim = y.shape, kernel.shape[1]
    grad_y_on_device, y_on_device = device.upload(grad_y), device.upload(y)  # alive until the kernel has run
    gradients = [device.upload(np.full(shape, np.nan, np.float32))
                 for shape in ((batch, input_dim), (units, input_dim), (units,))]
    library.gated_dense_grad(batch, input_dim, units, device.pointer(grad_y_on_device), device.pointer(y_on_device),
                             device.pointer(x), device.pointer(kernel), *map(device.pointer, gradients), device.stream)
    return [device.download(gradient) for gradient in gradients]


def backward_inputs(grad_y, z, bias, product, margin):
    """(grad_y, y) for the backward: y the forward's output (NaN where a NaN input was computed),
    and grad_y NaN on every other pair that does not pass (y ≤ 0 or NaN), which it must not read."""
    selected = ~(product.astype(np.float64) + bias <= -margin)
    y = np.where(selected, np.maximum(z + bias, 0.0), 0.0).astype(np.float32)
    unread = ~(y > 0) & (np.arange(y.shape[1]) % 2 == 0)
    return np.where(unread, np.float32(np.nan), grad_y), y


def compare_gradients(name, gradients, grad_y, y, x, kernel):
    """Mismatches of the backward's (dL/dx, dL/dW, dL/db) against the contract of
    custom_ops/gated_dense_grad.h in float64: sums over the pairs with y > 0 only."""
    passes = y > 0
    g = np.where(passes, grad_y.astype(np.float64), 0.0)
    # Rows without a passing pair add nothing, whatever their x (here, the row with a NaN).
    x = np.where(passes.any(axis=1)[:, None], x.astype(np.float64), 0.0)
    expected = (g @ kernel.astype(np.float64), g.T @ x, g.sum(axis=0))
    problems = []
    for output, got, want in zip(("grad_x", "grad_kernel", "grad_bias"), gradients, expected):
        wrong = ~np.isclose(got, want, rtol=TOLERANCE, atol=TOLERANCE)
        if wrong.any():
            index = tuple(int(i) for i in np.argwhere(wrong)[0])
            problems.append(f"{name}: {output}: {wrong.sum()} of {wrong.size} wrong; first {list(index)}: "
                            f"{float(got[index]):.7g}, expected {want[index]:.7g}")
    return problems


def random_layers(grid, rng):
    """(input_dim, units, x, kernel, bias) for each layer shape of the grid: max(batches) standard
    normal rows of x, row 2 with one NaN input (NaN wherever that row computes), Dense's scale of
    kernel and a small bias."""
    max_batch = max(grid["batches"])
    for input_dim in grid["input_dims"]:
        for units in grid["units"]:
            x = rng.standard_normal((max_batch, input_dim)).astype(np.float32)
            x[min(2, max_batch - 1), input_dim // 2] = np.nan
            kernel = (rng.standard_normal((units, input_dim)) / np.sqrt(input_dim)).astype(np.float32)
            bias = (0.1 * rng.standard_normal(units)).astype(np.float32)
            yield input_dim, units, x, kernel, bias


def check_kernels(device, library, grid, seed=0):
    """Runs the forward and backward kernels over the grid; returns the list of mismatches."""
    rng = np.random.default_rng(seed)
    max_batch = max(grid["batches"])
    problems = []
    for input_dim, units, x_all, kernel, bias in random_layers(grid, rng):
        started = time.perf_counter()
        product_all = rng.standard_normal((max_batch, units)).astype(np.float32)
        product_all[-1, 1::3] = np.nan  # NaN estimates select their unit
        grad_y_all = rng.standard_normal((max_batch, units)).astype(np.float32)
        z_all = x_all.astype(np.float64) @ kernel.T.astype(np.float64)
        kernel_on_device, bias_on_device = device.upload(kernel), device.upload(bias)
        runs = 0
        for batch in grid["batches"]:
            # The last row of each batch holds the NaN estimates, rows 0 and 1 stay finite.
            rows = np.r_[0:batch - 1, max_batch - 1] if batch else np.arange(0)
            x, product, z = x_all[rows], product_all[rows], z_all[rows]
            x_on_device = device.upload(x)
            for density in grid["densities"]:
                margin = margin_for_density(product.astype(np.float64) + bias, density) if batch else 0.0
                shape = f"batch={batch} input_dim={input_dim} units={units} density={density}"
                for alias in (False, True):
                    y, fraction = run_gated_dense(device, library, x_on_device, kernel_on_device,
                                                  bias_on_device, product, margin, alias)
                    name = f"gated_dense {shape}" + (" y=product" if alias else "")
                    problems += compare(name, y, z, bias, product, margin, fraction)
                z32 = z.astype(np.float32)
                for output in ("own", "z", "product"):
                    y, fraction = run_masked_relu(device, library, z32, bias_on_device, product, margin, output)
                    name = f"masked_relu {shape}" + ("" if output == "own" else f" y={output}")
                    problems += compare(name, y, z32.astype(np.float64), bias, product, margin, fraction)
                grad_y, y = backward_inputs(grad_y_all[rows], z, bias, product, margin)
                gradients = run_gated_dense_grad(device, library, grad_y, y, x_on_device, kernel_on_device)
                problems += compare_gradients(f"gated_dense_grad {shape}", gradients, grad_y, y, x, kernel)
                runs += 6
        log(f"checked input_dim={input_dim:5d} units={units:5d}: {runs} runs, "
            f"{len(problems)} mismatches so far ({time.perf_counter() - started:.1f} s)")
    return problems


def run_gated_layer(device, library, x, factors, kernel, bias, margin, z, rank, sample_rows):
    """LrcGatedLayer's y, skipped, gate counts and active fraction, each written into a buffer of
    NaN; x, factors, kernel and bias on the device, z on the host (the rows computed densely)."""
    (batch, input_dim), units = x.shape, kernel.shape[0]
    rows = min(sample_rows, z.shape[0])
    z_on_device = device.upload(z)
    outputs = [device.upload(np.full(shape, np.nan, np.float32)) for shape in ((batch, units), (rows, units), (4,), (1,))]
    projected = device.empty((batch, rank))
    counters = device.empty((library.gated_layer_counters,), np.uint64)
    partial_sums = device.empty((library.gated_layer_partial_sums(batch, input_dim, units, rank),))
    library.gated_layer(batch, input_dim, units, rank, z.shape[0], rows, *map(device.pointer, (x, factors, kernel, bias)),
                        margin, device.pointer(z_on_device), device.pointer(projected),
                        *map(device.pointer, outputs), device.pointer(counters), device.pointer(partial_sums),
                        device.stream)
    y, skipped, counts, fraction = (device.download(output) for output in outputs)
    return y, skipped, counts, float(fraction[0])


def compare_gated_layer(name, outputs, z, z32, bias, product, margin, rows):
    """Mismatches of LrcGatedLayer's outputs against the contract of custom_ops/gated_layer.h in
    float64: y (from z32, the float32 z given, in the dense rows), the sampled rows' skipped,
    and their gate counts, exact where no pair's decision or sign is within rounding of its
    threshold."""
    y, skipped, counts, fraction = outputs
    dense_rows = z32.shape[0]
    z_seen = np.concatenate([z32.astype(np.float64), z[dense_rows:]])
    problems = compare(name, y, z_seen, bias, product, margin, fraction)
    sampled = slice(0, rows)
    problems += compare(f"{name} skipped", skipped, z_seen[sampled], bias, product[sampled], margin, None, selects=False)
    z_hat = product[sampled].astype(np.float64) + bias
    pre_activation = z_seen[sampled] + bias  # the device adds the same float32 z: its sign flips only near 0
    computed, positive = ~(z_hat <= -margin), pre_activation > 0
    uncertain = (np.abs(z_hat + margin) <= BOUNDARY) | (np.abs(pre_activation) <= SIGN_BOUNDARY)
    low = [int(np.sum(pairs & ~uncertain)) for pairs in (computed & positive, computed & ~positive,
                                                        ~computed & positive, ~computed & ~positive)]
    high = [count + int(uncertain.sum()) for count in low]
    if counts.sum() != skipped.size or not all(lo <= c <= hi for lo, c, hi in zip(low, counts, high)):
        problems.append(f"{name}: gate counts {counts.tolist()}, expected {low}" +
                        (f" to {high}" if high != low else "") + f", {skipped.size} in all")
    return problems


def layer_configurations(batch, input_dim):
    """(rank, dense rows, sampled rows) of the LrcGatedLayer runs: inference (no dense rows), a
    training step's forward at full rank (half the rows dense, one sampled), and every row dense
    with more rows sampled than there are."""
    return ((1, 0, 0), (input_dim, batch // 2, 1), (min(8, input_dim), batch, batch + 1))


def check_gated_layer(device, library, grid, seed=0):
    """Runs LrcGatedLayer's kernels over the grid; returns the list of mismatches."""
    rng = np.random.default_rng(seed)
    max_batch = max(grid["batches"])
    problems = []
    for input_dim, units, x_all, kernel, bias in random_layers(grid, rng):
        started = time.perf_counter()
        z_all = x_all.astype(np.float64) @ kernel.T.astype(np.float64)
        kernel_on_device, bias_on_device = device.upload(kernel), device.upload(bias)
        runs = 0
        for rank in sorted({rank for rank, _, _ in layer_configurations(1, input_dim)}):
            # Estimates of about unit variance, whatever the rank: float32 rounding ~1e-6.
            estimator_u = (rng.standard_normal((input_dim, rank)) / np.sqrt(input_dim)).astype(np.float32)
            estimator_v = (rng.standard_normal((rank, units)) / np.sqrt(rank)).astype(np.float32)
            factors = device.upload(np.concatenate([estimator_u.ravel(), estimator_v.ravel()]))
            product_all = x_all.astype(np.float64) @ estimator_u.astype(np.float64) @ estimator_v.astype(np.float64)
            for batch in grid["batches"]:
                rows = np.r_[0:batch - 1, max_batch - 1] if batch else np.arange(0)
                x, product, z = x_all[rows], product_all[rows], z_all[rows]
                x_on_device = device.upload(x)
                for density in grid["densities"]:
                    margin = margin_for_density(product + bias, density) if batch else 0.0
                    for config_rank, dense_rows, sample_rows in layer_configurations(batch, input_dim):
                        if config_rank != rank:
                            continue
                        z32 = z[:dense_rows].astype(np.float32)
                        outputs = run_gated_layer(device, library, x_on_device, factors, kernel_on_device,
                                                  bias_on_device, margin, z32, rank, sample_rows)
                        name = (f"gated_layer batch={batch} input_dim={input_dim} units={units} rank={rank} "
                                f"dense_rows={dense_rows} sample_rows={sample_rows} density={density}")
                        problems += compare_gated_layer(name, outputs, z, z32, bias, product, margin,
                                                        min(sample_rows, dense_rows))
                        runs += 1
        log(f"checked gated_layer input_dim={input_dim:5d} units={units:5d}: {runs} runs, "
            f"{len(problems)} mismatches so far ({time.perf_counter() - started:.1f} s)")
    return problems


# ----------------------------------------------------------------------------------------------
# Speed.

# The columns of the two tables: inference (a call of the layer) and a training step.
# Inference has two more: LrcGatedLayer (the whole layer in one op) and its speedup vs TF32.
TABLE_HEADERS = {
    "inference": "| layer | batch | density | Dense µs | Dense TF32 µs | gated µs | gated kernel µs | speedup | speedup vs TF32 "
                 "| LrcGatedLayer µs | LrcGatedLayer vs TF32 |",
    "training": "| layer | batch | density | Dense step µs | Dense step TF32 µs | gated step µs | gated backward µs | speedup | speedup vs TF32 |",
}


def time_layers(device, library, grid, step, seed=0):
    """Times the gated and dense layers' `step` ("inference" or "training") over the grid,
    printing each table row as it is made."""
    rng = np.random.default_rng(seed)
    log(TABLE_HEADERS[step] + "\n" + "|---" * (TABLE_HEADERS[step].count("|") - 1) + "|")
    rows = []
    for input_dim, units, rank in grid["layers"]:
        kernel = device.upload((rng.standard_normal((units, input_dim)) / np.sqrt(input_dim)).astype(np.float32))
        bias_host = (0.1 * rng.standard_normal(units)).astype(np.float32)
        bias = device.upload(bias_host)
        estimator_u_host = rng.standard_normal((input_dim, rank)).astype(np.float32)
        estimator_v_host = (rng.standard_normal((rank, units)) / np.sqrt(input_dim)).astype(np.float32)
        estimator_u, estimator_v = device.upload(estimator_u_host), device.upload(estimator_v_host)
        factors = device.upload(np.concatenate([estimator_u_host.ravel(), estimator_v_host.ravel()]))
        for batch in grid["batches"]:
            x = device.upload(rng.standard_normal((batch, input_dim)).astype(np.float32))
            grad_y = device.upload(rng.standard_normal((batch, units)).astype(np.float32))
            hidden, product, y = device.empty((batch, rank)), device.empty((batch, units)), device.empty((batch, units))
            fraction, scratch = device.empty((1,)), device.empty((1,), np.uint64)
            gate_counts, counters = device.empty((4,)), device.empty((library.gated_layer_counters,), np.uint64)
            partial_sums = device.empty((library.gated_layer_partial_sums(batch, input_dim, units, rank),))
            z, grad_x = device.empty((batch, units)), device.empty((batch, input_dim))
            grad_kernel, grad_bias = device.empty((units, input_dim)), device.empty((units,))
            device.matmul(x, estimator_u, hidden)
            device.matmul(hidden, estimator_v, product)
            z_hat = device.download(product).astype(np.float64) + bias_host
            for density in grid["densities"]:
                margin = margin_for_density(z_hat, density)

                kernel_args = (batch, input_dim, units, device.pointer(x), device.pointer(kernel),
                               device.pointer(bias), device.pointer(product), margin, device.pointer(y),
                               device.pointer(fraction), device.pointer(scratch), device.stream)
                # Inference: no rows computed densely, none sampled (z and skipped: 0 rows).
                layer_op_args = (batch, input_dim, units, rank, 0, 0, device.pointer(x), device.pointer(factors),
                                 device.pointer(kernel), device.pointer(bias), margin, device.pointer(z),
                                 device.pointer(hidden), device.pointer(y), device.pointer(z), device.pointer(gate_counts),
                                 device.pointer(fraction), device.pointer(counters), device.pointer(partial_sums),
                                 device.stream)
                backward_args = (batch, input_dim, units, device.pointer(grad_y), device.pointer(y), device.pointer(x),
                                 device.pointer(kernel), device.pointer(grad_x), device.pointer(grad_kernel),
                                 device.pointer(grad_bias), device.stream)

                def gated_kernel():
                    library.gated_dense(*kernel_args)

                def gated_layer():
                    device.matmul(x, estimator_u, hidden)
                    device.matmul(hidden, estimator_v, product)
                    gated_kernel()

                def gated_layer_op():
                    library.gated_layer(*layer_op_args)

                def gated_backward():  # over the pairs of the y that gated_layer left
                    library.gated_dense_grad(*backward_args)

                def gated_step():
                    gated_layer()
                    gated_backward()

                gated_layer()
                if step == "inference":
                    functions = (("dense_us", lambda: device.dense_layer(x, kernel, bias, y, tf32=False)),
                                 ("dense_tf32_us", lambda: device.dense_layer(x, kernel, bias, y, tf32=True)),
                                 ("gated_us", gated_layer),
                                 ("gated_kernel_us", gated_kernel),
                                 ("layer_op_us", gated_layer_op))
                else:
                    dense_step_args = (x, kernel, bias, grad_y, z, grad_x, grad_kernel)
                    functions = (("dense_us", lambda: device.dense_step(*dense_step_args, tf32=False)),
                                 ("dense_tf32_us", lambda: device.dense_step(*dense_step_args, tf32=True)),
                                 ("gated_us", gated_step),
                                 ("gated_kernel_us", gated_backward))
                timings = {name: device.seconds_per_call(function, grid["calls"], grid["repeats"]) * 1e6
                           for name, function in functions}
                row = {"step": step, "layer": f"{input_dim}->{units} r={rank}", "batch": batch,
                       "density": float(device.download(fraction)[0]), **timings}
                rows.append(row)
                line = (f"| {row['layer']} | {batch} | {row['density']:.3f} | {row['dense_us']:.1f} | "
                        f"{row['dense_tf32_us']:.1f} | {row['gated_us']:.1f} | {row['gated_kernel_us']:.1f} | "
                        f"{row['dense_us'] / row['gated_us']:.2f}x | {row['dense_tf32_us'] / row['gated_us']:.2f}x |")
                if step == "inference":
                    line += f" {row['layer_op_us']:.1f} | {row['dense_tf32_us'] / row['layer_op_us']:.2f}x |"
                log(line)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shim", action="store_true",
                        help="build with g++ on the CPU shim of the tests and run small grids (no GPU)")
    parser.add_argument("--build-only", action="store_true", help="compile the library and stop")
    parser.add_argument("--build-dir", help="where the library goes (default: a temporary directory)")
    parser.add_argument("--json", help="also write the mismatches and the timings to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch = None if args.shim or args.build_only else import_torch()  # before the build: fail fast
    build_dir = args.build_dir or tempfile.mkdtemp(prefix="lrc_gpu_check_")
    library = Library(build(args.shim, build_dir))
    if args.build_only:
        return 0
    device = ShimDevice() if args.shim else TorchGpu(torch, library)
    log(f"device: {device.label}")
    log("1. correctness against float64 numpy: the forward kernels, then the backward, then LrcGatedLayer")
    check_grid = SHIM_CHECK_GRID if args.shim else GPU_CHECK_GRID
    problems = check_kernels(device, library, check_grid)
    problems += check_gated_layer(device, library, check_grid)
    for problem in problems:
        log("MISMATCH " + problem)
    log(f"{len(problems)} mismatches")
    timing_grid = SHIM_TIMING_GRID if args.shim else GPU_TIMING_GRID
    log("2. speed of inference: µs per call, median of repeats; Dense = cuBLAS GEMM with bias + relu (FP32, or "
        "TF32 as TensorFlow uses by default on this GPU); gated = the estimate's two FP32 GEMMs + the gated kernel; "
        "LrcGatedLayer = the same layer in one op, its estimate by its own kernels")
    rows = time_layers(device, library, timing_grid, "inference")
    log("3. speed of a training step: µs per step, median of repeats; Dense step = the three cuBLAS GEMMs "
        "(forward with bias + relu, dL/dx, dL/dW; FP32, or TF32); gated step = the estimate's two FP32 GEMMs + "
        "the gated forward kernel + the gated backward kernel")
    rows += time_layers(device, library, timing_grid, "training")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.label, "mismatches": problems, "timings": rows}, f, indent=1)
    log(f"done in {time.perf_counter() - started:.0f} s: {len(problems)} mismatches")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
