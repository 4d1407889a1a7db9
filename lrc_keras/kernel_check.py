"""The self-check of the compiled CUDA kernels: before one serves a layer on a GPU for the first
time in a process, it runs there on a small random case of that layer's shape against the
TensorFlow reference; a kernel that fails is not used again in this process.

The CUDA kernels are tested on the CPU only, through a host shim (tests/cuda_shim); no GPU has
run them in this project's tests. A wrong launch, a race or an out-of-range read on a real GPU
would give wrong numbers silently, so `lrc_keras.dispatch` asks `kernels_pass` before it picks a
compiled path for ops that run on a GPU. Each (device, kernel) is checked once per process, in
milliseconds, on CHECK_ROWS rows of the layer's input_dim and units:
    LrcGatedDense      y and the active fraction against `lrc_keras.ops.reference_with_density`
                       in float64 on the same device
    LrcMaskedRelu      the same, given z = x·Wᵀ computed in float64 and rounded to float32 (TF's
                       own float32 GEMM may round through TF32 on a GPU)
    LrcGatedDenseGrad  dL/dx, dL/dW and dL/db against TensorFlow's autodiff of that reference
    LrcGatedLayer      y, the sampled rows' skipped units and gate counts, and the active
                       fraction against float64 numpy, its estimate from random factors of rank
                       CHECK_RANK, the first CHECK_DENSE_ROWS rows given z, the last row's input
                       NaN; pairs whose float64 estimate lies within BOUNDARY of the threshold
                       (which float32 may decide either way) are left out
For the other kernels the estimates keep at least 0.1 away from the gate's threshold (no decision
depends on rounding), and the last row's are NaN (which select every unit). A kernel fails on an output off
by more than TOLERANCE·(1 + |reference|), a NaN where the reference has none (or a number where
it has NaN), or an op error (a CUDA error); then one RuntimeWarning names it, the device, the
shape, the largest error and the command that reproduces it, and layers take the TensorFlow path
instead of it for the rest of the process.

The check runs in a thread of its own: eagerly, outside any graph being traced (it is asked at
trace time) and outside any gradient tape, which would record nothing under `tf.init_scope`.

`LRC_KERAS_GPU_SELF_CHECK=0` turns it off, for a GPU that `python3 tools/gpu_check/gpu_check.py`
has checked. On the CPU there is nothing to check: the CPU kernels are the ones the tests run.
"""

import os
import threading
import warnings

import numpy as np
import tensorflow as tf

from lrc_keras import ops

SETTING = "LRC_KERAS_GPU_SELF_CHECK"
REPRODUCE = "python3 tools/gpu_check/gpu_check.py"
CHECK_ROWS = 7
CHECK_MARGIN = 0.25
CHECK_RANK = 4  # at most input_dim
CHECK_DENSE_ROWS = 3
CHECK_SAMPLE_ROWS = 2
# LrcGatedLayer's own float32 estimate (rank CHECK_RANK, about unit variance) is within ~1e-6 of
# float64's; a wider window would leave out pairs enough to hide one miscounted.
BOUNDARY = 1e-4
# float32 sums of a few thousand N(0, 1)·N(0, 1/d) terms are within ~1e-6 of float64; one wrong
# or missing term is off by ~1e-2.
TOLERANCE = 1e-4
_SEED = 30
_results = {}  # (device, kernel): whether it passed
_lock = threading.Lock()


def enabled():
    """Whether the self-check runs: LRC_KERAS_GPU_SELF_CHECK unset or 1, not 0."""
    value = os.environ.get(SETTING, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{SETTING} must be 0 (self-check off) or 1 (on, the default), got {value!r}")
    return value == "1"


def op_device():
    """The device an op created here runs on, as "/GPU:1" or "/CPU:0".

    While a graph is traced, the device its device scope names (`with tf.device(...)`, a
    MirroredStrategy replica's), read from a probe op (unused, it costs nothing when the function
    runs). Where none is named (a graph traced without one, or eagerly): the CPU where TensorFlow
    sees no GPU, else where TensorFlow places an eager op now, the device of an enclosing
    `tf.device` scope or by default the first GPU, read from an eager probe op.
    """
    if not tf.executing_eagerly():
        named = tf.DeviceSpec.from_string(tf.zeros([]).device)
        if named.device_type is not None:
            return _spelled(named)
    if not tf.config.list_logical_devices("GPU"):
        return "/CPU:0"
    with tf.init_scope():
        return _spelled(tf.DeviceSpec.from_string(tf.zeros([]).device))


def _spelled(device_spec):
    return f"/{device_spec.device_type.upper()}:{device_spec.device_index or 0}"


def is_gpu(device):
    """Whether `device` (as `op_device` spells it) is a GPU."""
    return device.startswith("/GPU:")


def kernels_pass(kernels, device, input_dim, units):
    """Whether every kernel named in `kernels` ("LrcGatedDense", "LrcMaskedRelu",
    "LrcGatedDenseGrad", "LrcGatedLayer") may serve a layer of this shape on `device`: always on a CPU or with
    the check off; on a GPU, when its self-check passed (run at its first use in this process,
    on this layer's shape; a failure warns once)."""
    if not is_gpu(device) or not enabled():
        return True
    with _lock:
        return all(_passes(kernel, device, input_dim, units) for kernel in kernels)


def checked_kernels():
    """{(device, kernel): passed} for the kernels self-checked so far in this process."""
    return dict(_results)


def _passes(kernel, device, input_dim, units):
    key = (device, kernel)
    if key not in _results:
        problem = _in_own_thread(_problem, kernel, device, input_dim, units)
        _results[key] = problem is None
        if problem is not None:
            warnings.warn(
                f"lrc_keras: the CUDA kernel {kernel} failed its self-check on {device} ({CHECK_ROWS} rows of a "
                f"{input_dim}→{units} layer against the TensorFlow reference): {problem}. LowRankGatedDense layers "
                f"take the TensorFlow path instead of it for the rest of this process (the reference's numbers, "
                f"without its speed-up). To reproduce and report it, run `{REPRODUCE}` from the lrc-keras source "
                f"tree (tools/gpu_check/README.md says what to send back).",
                RuntimeWarning,
                stacklevel=5,
            )
    return _results[key]


def _in_own_thread(function, *args):
    """function(*args) in a new thread (eager, no tape, no graph); its exception is re-raised here."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="lrc_keras kernel self-check")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _problem(kernel, device, input_dim, units):
    """None if `kernel` matches the reference on `device`, else what is wrong, in words."""
    with tf.device(device):
        case = _random_case(input_dim, units)
        try:
            # .numpy() waits for the device: an asynchronous CUDA error surfaces here.
            outputs = [(name, np.asarray(got), np.asarray(expected), tolerance)
                       for name, got, expected, tolerance in _CHECKS[kernel](case)]
        except tf.errors.OpError as error:
            return f"it failed with {type(error).__name__}: {error.message.splitlines()[0]}"
    for output in outputs:
        problem = _mismatch(*output)
        if problem is not None:
            return problem
    return None


def _normal(shape, stream):
    return tf.random.stateless_normal(shape, seed=[_SEED, stream])


def _random_case(input_dim, units):
    """float32 inputs of the layer's ops (and their gradient's grad_y) on the current device."""
    normal = _normal
    rows = CHECK_ROWS
    bias = 0.1 * normal([units], 3)
    # ẑ + margin, at least 0.1 away from 0; the last row's estimates NaN.
    away = normal([rows - 1, units], 4)
    away = tf.where(away < 0, away - 0.1, away + 0.1)
    product = tf.concat([away - bias - CHECK_MARGIN, tf.fill([1, units], float("nan"))], axis=0)
    return {
        "x": normal([rows, input_dim], 1),
        "kernel": normal([units, input_dim], 2) / float(np.sqrt(input_dim)),
        "bias": bias,
        "product": product,
        "grad_y": normal([rows, units], 5),
    }


def _float64(case):
    return {name: tf.cast(value, tf.float64) for name, value in case.items()}


def _reference(case):
    """`(y, active_fraction)` of the reference in float64 on the float32 case's values."""
    exact = _float64(case)
    return ops.reference_with_density(exact["x"], exact["kernel"], exact["bias"], exact["product"], CHECK_MARGIN)


def _half_a_pair(case):
    """The active fraction's tolerance: half of one (row, unit) pair of the case."""
    return 0.5 / float(tf.size(case["product"]))


def _check_gated_dense(case):
    y, fraction = ops.gated_dense_with_density(case["x"], case["kernel"], case["bias"], case["product"], CHECK_MARGIN)
    expected_y, expected_fraction = _reference(case)
    return [("y", y, expected_y, TOLERANCE), ("active fraction", fraction, expected_fraction, _half_a_pair(case))]


def _check_masked_relu(case):
    exact = _float64(case)
    z = tf.cast(ops.kernel_product(exact["x"], exact["kernel"]), tf.float32)
    y, fraction = ops.compiled_library().lrc_masked_relu(z, case["bias"], case["product"], CHECK_MARGIN)
    expected_y, expected_fraction = _reference(case)
    return [("y", y, expected_y, TOLERANCE), ("active fraction", fraction, expected_fraction, _half_a_pair(case))]


def _check_gated_dense_grad(case):
    exact = _float64(case)
    watched = [exact["x"], exact["kernel"], exact["bias"]]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        y, _ = ops.reference_with_density(*watched, exact["product"], CHECK_MARGIN)
        loss = tf.reduce_sum(y * exact["grad_y"])
    expected = tape.gradient(loss, watched)
    got = ops.compiled_library().lrc_gated_dense_grad(
        case["grad_y"], tf.cast(y, tf.float32), *[tf.zeros([0, case["kernel"].shape[0]])] * 2, case["x"], case["kernel"])
    return [(name, g, e, TOLERANCE) for name, g, e in zip(("dL/dx", "dL/dW", "dL/db"), got, expected)]


def _check_gated_layer(case):
    input_dim, units = case["kernel"].shape[1], case["kernel"].shape[0]
    rank = min(CHECK_RANK, input_dim)
    x = tf.concat([case["x"][:-1], tf.fill([1, input_dim], float("nan"))], axis=0)
    estimator_u = _normal([input_dim, rank], 6) / float(np.sqrt(input_dim))
    estimator_v = _normal([rank, units], 7) / float(np.sqrt(rank))
    factors = tf.concat([tf.reshape(estimator_u, [-1]), tf.reshape(estimator_v, [-1])], axis=0)
    x64, kernel64 = tf.cast(x, tf.float64), tf.cast(case["kernel"], tf.float64)
    z = ops.kernel_product(x64, kernel64).numpy()
    z[:CHECK_DENSE_ROWS] = tf.cast(z[:CHECK_DENSE_ROWS], tf.float32).numpy()  # the float32 z the op is given
    y, skipped, counts, fraction = (np.asarray(output, np.float64) for output in ops.compiled_library().lrc_gated_layer(
        x, factors, case["kernel"], case["bias"], CHECK_MARGIN, tf.cast(z[:CHECK_DENSE_ROWS], tf.float32), rank,
        rank=rank, sample_rows=CHECK_SAMPLE_ROWS, layer="the self-check"))

    estimate = (x64 @ tf.cast(estimator_u, tf.float64) @ tf.cast(estimator_v, tf.float64)).numpy()
    estimate += case["bias"].numpy()
    pre_activation = z + case["bias"].numpy()
    computed = ~(estimate <= -CHECK_MARGIN)  # the NaN row's estimates compute every unit
    uncertain = np.abs(estimate + CHECK_MARGIN) <= BOUNDARY
    # np.maximum keeps NaN: the NaN row's computed outputs are NaN.
    expected_y = np.where(uncertain, y, np.where(computed, np.maximum(pre_activation, 0.0), 0.0))
    rows = CHECK_SAMPLE_ROWS
    expected_skipped = np.where(uncertain, np.nan, np.where(computed, 0.0, np.maximum(pre_activation, 0.0)))[:rows]
    expected_skipped = np.where(uncertain[:rows], skipped, expected_skipped)
    # Each gate count between its pairs sure of their category and those plus every uncertain one.
    undecided = (uncertain | (np.abs(pre_activation) <= 1e-6))[:rows]
    positive = pre_activation[:rows] > 0
    low = np.array([np.sum(pairs & ~undecided) for pairs in (computed[:rows] & positive, computed[:rows] & ~positive,
                                                             ~computed[:rows] & positive, ~computed[:rows] & ~positive)])
    pairs = computed.size
    expected_fraction = np.clip(fraction, (computed & ~uncertain).sum() / pairs, (computed | uncertain).sum() / pairs)
    return [("y", y, expected_y, TOLERANCE), ("skipped", skipped, expected_skipped, TOLERANCE),
            ("gate counts", counts, np.clip(counts, low, low + undecided.sum()), 0.0),
            ("gate counts' total", counts.sum(), rows * units, 0.0),
            ("active fraction", fraction, expected_fraction, _half_a_pair(case))]


_CHECKS = {
    "LrcGatedDense": _check_gated_dense,
    "LrcMaskedRelu": _check_masked_relu,
    "LrcGatedDenseGrad": _check_gated_dense_grad,
    "LrcGatedLayer": _check_gated_layer,
}


def _mismatch(name, got, expected, tolerance):
    """None if `got` is within tolerance·(1 + |expected|) of `expected` with NaN where it has NaN,
    else the first NaN that differs or the largest error, in words."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    nan_differs = np.isnan(got) != np.isnan(expected)
    if nan_differs.any():
        index = tuple(int(i) for i in np.argwhere(nan_differs)[0])
        what = ("NaN where the reference has none" if np.isnan(got[index])
                else f"{got[index]:.7g} where the reference has NaN")
        return f"{_at(name, index)} is {what}"
    error = np.where(np.isnan(expected), 0.0, np.abs(got - expected))
    if not np.any(error > tolerance * (1.0 + np.abs(expected))):
        return None
    index = tuple(int(i) for i in np.unravel_index(np.argmax(error), error.shape))
    return (f"largest error {error[index]:.3g} in {_at(name, index)} ({got[index]:.7g}, reference "
            f"{expected[index]:.7g}; tolerance {tolerance:.3g}·(1 + |reference|))")


def _at(name, index):
    return f"{name}{list(index)}" if index else name
