"""lrc_keras.kernel_check: the CUDA kernels' self-check at first use on a GPU, and the dispatch's
choices on a GPU, on the CPU.

A GPU is simulated by tracing the layer under `tf.device("/GPU:0")`: the dispatch sees the GPU
the scope names at trace time, and TensorFlow's soft placement runs the ops on the CPU. A wrong
kernel is injected by replacing one op of the compiled library (`ops._library`, which the layer's
paths and the self-check both call) with one whose output is off: the production code runs
unchanged around it.
"""

import warnings

import numpy as np
import pytest
import tensorflow as tf
from conftest import away_from_boundary, compiled_ops_that_ran, numpy_gated_dense, random_weights

from lrc_keras import LowRankGatedDense, kernel_check, ops

pytestmark = pytest.mark.skipif(not ops.is_compiled(), reason="the self-check guards the compiled ops")

REPRODUCE = "python3 tools/gpu_check/gpu_check.py"
EVERY_KERNEL = ("LrcGatedDense", "LrcMaskedRelu", "LrcGatedDenseGrad", "LrcGatedLayer")


class LibraryWithWrongOp:
    """The compiled library, but the op `op_name` returns `corrupt(*its outputs)`."""

    def __init__(self, library, op_name, corrupt):
        self._library = library
        op = getattr(library, op_name)
        setattr(self, op_name, lambda *args, **kwargs: corrupt(*op(*args, **kwargs)))

    def __getattr__(self, name):
        return getattr(self._library, name)


def too_large(first, *rest):
    """The first output (y, or dL/dx) 1.5 times too large: wrong wherever it is not 0."""
    return (first * 1.5, *rest)


@pytest.fixture(autouse=True)
def new_process(monkeypatch):
    """Each test starts as a new process would: no kernel checked yet, the check on."""
    monkeypatch.setattr(kernel_check, "_results", {})
    monkeypatch.delenv(kernel_check.SETTING, raising=False)


def inject(monkeypatch, op_name, corrupt=too_large):
    monkeypatch.setattr(ops, "_library", LibraryWithWrongOp(ops.compiled_library(), op_name, corrupt))


def traced_on(device, function):
    """`function` as a tf.function whose ops are placed on `device` (None: TF's default)."""

    @tf.function
    def traced(*args):
        if device is None:
            return function(*args)
        with tf.device(device):
            return function(*args)

    return traced


def new_layer(rng, input_dim=24, units=32, rank=4, **settings):
    layer = LowRankGatedDense(units, rank=rank, **settings)
    layer.build((None, input_dim))
    kernel, bias, estimator_u, estimator_v = random_weights(rng, input_dim, units, rank)
    layer.kernel.assign(kernel)
    layer.bias.assign(bias)
    layer.assign_estimator(estimator_u, estimator_v)
    return layer


def reference(layer, x):
    """(y, mask, z) of the layer in float64 numpy, after checking that float32 rounding can flip
    neither a gate decision nor the sign of a z (so that y and its gradients are exact)."""
    y, mask, z_hat, z = numpy_gated_dense(x, *(v.numpy() for v in (layer.kernel, layer.bias, layer.estimator_u,
                                                                   layer.estimator_v)), 0.0)
    assert away_from_boundary(z_hat, 0.0).all() and (np.abs(z) > 1e-3).all()
    assert mask.any() and (~mask).any() and (y > 0).any()
    return y, mask, z


def self_check_warnings(caught):
    return [str(w.message) for w in caught if "self-check" in str(w.message)]


@pytest.mark.parametrize("op_name, kernel, inference_path", [
    ("lrc_gated_layer", "LrcGatedLayer", "gated"),
    ("lrc_gated_layer", "LrcGatedLayer", "gemm"),
    ("lrc_gated_layer", "LrcGatedLayer", "auto"),
])
def test_a_wrong_kernel_falls_back_to_the_reference_with_one_warning(rng, monkeypatch, op_name, kernel, inference_path):
    """The first trace on the GPU checks the kernel, finds it wrong, warns once and takes the
    TensorFlow path; a second call and a second layer keep to it without a new warning."""
    inject(monkeypatch, op_name)
    x = rng.standard_normal((6, 24)).astype("float32")
    first, second = new_layer(rng, inference_path=inference_path), new_layer(rng, inference_path=inference_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infer_first = traced_on("/GPU:0", lambda x: first(x, training=False))
        outputs = [infer_first(x), infer_first(x), traced_on("/GPU:0", lambda x: second(x, training=False))(x)]
    (message,) = self_check_warnings(caught)
    for words in (f"CUDA kernel {kernel} failed its self-check on /GPU:0", "7 rows of a 24→32 layer",
                  "largest error", "TensorFlow path", REPRODUCE):
        assert words in message, message
    assert kernel_check.checked_kernels()[("/GPU:0", kernel)] is False
    for y, layer in zip(outputs, (first, first, second)):
        np.testing.assert_allclose(y.numpy(), reference(layer, x)[0], rtol=1e-5, atol=1e-5)


def test_a_wrong_backward_kernel_falls_back_to_the_dense_path_with_one_warning(rng, monkeypatch):
    """training_path="gated" on the GPU: the forward kernel passes, the backward's dL/dx is wrong,
    so the layer trains by the dense path: its gradients, one warning, and so at the next step."""
    inject(monkeypatch, "lrc_gated_dense_grad")
    layer = new_layer(rng, training_path="gated")
    x = tf.constant(rng.standard_normal((6, 24)).astype("float32"))
    cotangent = rng.standard_normal((6, 32)).astype("float32")

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * cotangent)
        return tape.gradient(loss, [x, layer.kernel])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = traced_on("/GPU:0", step)
        gradients = [train(x), train(x)]
    (message,) = self_check_warnings(caught)
    assert "CUDA kernel LrcGatedDenseGrad failed" in message and "largest error" in message and "dL/dx" in message
    assert kernel_check.checked_kernels() == {("/GPU:0", "LrcGatedLayer"): True, ("/GPU:0", "LrcGatedDenseGrad"): False}
    _, mask, z = reference(layer, x.numpy())
    g = np.where(mask & (z > 0), cotangent, 0.0)
    for grad_x, grad_kernel in gradients:
        np.testing.assert_allclose(grad_x.numpy(), g @ layer.kernel.numpy().astype(np.float64), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(grad_kernel.numpy(), g.T @ x.numpy().astype(np.float64), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("settings, training, checked, ran", [
    (dict(inference_path="gated"), False, {"LrcGatedLayer"}, {"LrcGatedLayer"}),
    (dict(inference_path="gemm"), False, {"LrcGatedLayer"}, {"LrcGatedLayer", "Einsum"}),
    (dict(training_path="gated"), True, {"LrcGatedLayer", "LrcGatedDenseGrad"}, {"LrcGatedLayer", "Einsum"}),
])
def test_kernels_that_pass_serve_the_layer(rng, tmp_path, settings, training, checked, ran):
    """Correct kernels pass their check on the GPU without a warning, and then run."""
    layer = new_layer(rng, **settings)
    x = rng.standard_normal((6, 24)).astype("float32")
    call = traced_on("/GPU:0", lambda x: layer(x, training=training))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = call(x)
    assert self_check_warnings(caught) == []
    assert kernel_check.checked_kernels() == {("/GPU:0", kernel): True for kernel in checked}
    np.testing.assert_allclose(y.numpy(), reference(layer, x)[0], rtol=1e-5, atol=1e-5)
    assert compiled_ops_that_ran(call, x, tmp_path) == ran


def test_every_kernel_passes_at_an_odd_shape():
    assert kernel_check.kernels_pass(EVERY_KERNEL, "/GPU:0", 37, 131)
    assert set(kernel_check.checked_kernels().values()) == {True}


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="no GPU visible to TensorFlow")
def test_every_kernel_passes_on_a_real_gpu():
    """Where TensorFlow sees a GPU, eager ops go to the first one, and the CUDA kernels pass there."""
    assert kernel_check.op_device() == "/GPU:0"
    for input_dim, units in ((37, 131), (784, 1000)):
        kernel_check._results.clear()
        assert kernel_check.kernels_pass(EVERY_KERNEL, "/GPU:0", input_dim, units), kernel_check.checked_kernels()


def cuda_error():
    raise tf.errors.InternalError(None, None, "LrcGatedDenseGrad: CUDA kernel launch failed: an illegal memory access")


@pytest.mark.parametrize("op_name, corrupt, words", [
    ("lrc_gated_dense", lambda y, fraction: (tf.tensor_scatter_nd_update(y, [[0, 0]], [np.nan]), fraction),
     "y[0, 0] is NaN where the reference has none"),
    ("lrc_gated_dense", lambda y, fraction: (y, fraction + 1 / (7 * 131)), "in active fraction"),
    ("lrc_masked_relu", lambda y, fraction: (tf.tensor_scatter_nd_add(y, [[3, 5]], [1e-3]), fraction),
     "largest error 0.001 in y[3, 5]"),
    ("lrc_gated_dense_grad", lambda grad_x, grad_kernel, grad_bias: (grad_x, grad_kernel, grad_bias * 1.001),
     "in dL/db"),
    ("lrc_gated_dense_grad", lambda *gradients: cuda_error(), "it failed with InternalError: LrcGatedDenseGrad: CUDA"),
    ("lrc_gated_layer", lambda y, skipped, counts, fraction: (tf.tensor_scatter_nd_update(y, [[0, 0]], [np.nan]),
                                                              skipped, counts, fraction),
     "y[0, 0] is NaN where the reference has none"),
    ("lrc_gated_layer", lambda y, skipped, counts, fraction: (y, tf.tensor_scatter_nd_add(skipped, [[1, 5]], [1e-3]),
                                                              counts, fraction),
     "in skipped[1, 5]"),
    ("lrc_gated_layer", lambda y, skipped, counts, fraction: (y, skipped, counts + [1.0, -1.0, 0.0, 0.0], fraction),
     "in gate counts["),
    ("lrc_gated_layer", lambda y, skipped, counts, fraction: (y, skipped, counts, fraction + 1 / (7 * 131)),
     "in active fraction"),
])
def test_the_check_reports_what_is_wrong(monkeypatch, op_name, corrupt, words):
    """A NaN, one miscounted pair, one output 1e-3 off, a 0.1% error, a CUDA error, one gate count
    moved to another, each fail."""
    inject(monkeypatch, op_name, corrupt)
    with pytest.warns(RuntimeWarning, match="self-check") as caught:
        assert not kernel_check.kernels_pass(EVERY_KERNEL, "/GPU:1", 37, 131)
    (message,) = self_check_warnings(caught)
    assert words in message and "on /GPU:1 (7 rows of a 37→131 layer" in message, message
    assert list(kernel_check.checked_kernels().values())[-1] is False


@pytest.mark.parametrize("setting, device", [("0", "/GPU:0"), (None, None)])
def test_no_check_with_the_setting_off_or_on_the_cpu(rng, monkeypatch, setting, device):
    """LRC_KERAS_GPU_SELF_CHECK=0 on a GPU, or the CPU: nothing is checked, the kernel serves (here,
    the wrong one: its numbers come out)."""
    if setting is not None:
        monkeypatch.setenv(kernel_check.SETTING, setting)
    inject(monkeypatch, "lrc_gated_layer")
    layer = new_layer(rng, inference_path="gated")
    x = rng.standard_normal((6, 24)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = traced_on(device, lambda x: layer(x, training=False))(x)
    assert self_check_warnings(caught) == [] and kernel_check.checked_kernels() == {}
    np.testing.assert_allclose(y.numpy(), 1.5 * reference(layer, x)[0], rtol=1e-5, atol=1e-5)


def test_a_bad_setting_is_refused(rng, monkeypatch):
    monkeypatch.setenv(kernel_check.SETTING, "off")
    layer = new_layer(rng, inference_path="gated")
    with pytest.raises(ValueError, match="LRC_KERAS_GPU_SELF_CHECK must be 0 .* got 'off'"):
        traced_on("/GPU:0", lambda x: layer(x, training=False))(np.ones((2, 24), "float32"))


@pytest.mark.parametrize("device, backward, checked", [
    (None, {"LrcGatedDenseGrad"}, {}), ("/GPU:0", set(), {("/GPU:0", "LrcGatedLayer"): True}),
])
def test_auto_training_on_a_gpu_takes_the_dense_path(rng, tmp_path, device, backward, checked):
    """At an observed density of 0, "auto" trains by the gated kernels on the CPU, and on a GPU,
    where the gated step has not been measured, by the dense path: the layer's op (self-checked
    there), then GEMMs backward."""
    layer = new_layer(rng, training_path="auto")
    x = rng.standard_normal((6, 24)).astype("float32")

    def call_and_gradient(x):
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(y)
        return y, tape.gradient(loss, layer.kernel)

    step = traced_on(device, call_and_gradient)
    step(x)  # the first call traces: keep it out of the profile
    layer.observed_density.assign(0.0)
    assert compiled_ops_that_ran(step, x, tmp_path) == {"LrcGatedLayer", "Einsum"} | backward
    assert kernel_check.checked_kernels() == checked
    np.testing.assert_allclose(step(x)[0].numpy(), reference(layer, x)[0], rtol=1e-5, atol=1e-5)


def test_op_device_is_where_the_ops_run():
    def at_trace_under(device):
        seen = []
        traced_on(device, lambda: seen.append(kernel_check.op_device())).get_concrete_function()
        return seen[0]

    assert kernel_check.op_device() == "/CPU:0"  # eagerly, on this machine without a GPU
    assert at_trace_under(None) == "/CPU:0"  # traced without a device scope: where TF places ops by default
    assert at_trace_under("/GPU:1") == "/GPU:1"
    assert at_trace_under("/job:localhost/replica:0/task:0/device:GPU:2") == "/GPU:2"
    assert at_trace_under("/device:cpu:1") == "/CPU:1"
