"""Dispatch: the one place that decides how a gated layer's inference and training run, and says
why: `infer` and `train` run a layer's call by the path `choose_path` and `choose_training_path`
pick.

`choose_path` picks one of the implementations of `lrc_keras.ops` (`infer` runs it for a layer):
    "reference"  plain TensorFlow, when the compiled ops are not loaded or the dtype is not
                 float32 (warned once per reason, naming the faster choice)
    "gated"      the compiled LrcGatedLayer: estimate, mask and only the selected dot products
    "gemm"       TF's dense GEMM, then the compiled LrcGatedLayer (estimate and mask) on its z
    "auto"       gated or gemm inside the graph, by the density the layer last recorded against the
                 crossover density measured for this shape and batch (below)

The crossover density comes from the measured timing model, `lrc_keras.crossover` (not to be
confused with `lrc_keras.cost`, the multiply-add count of the paper's cost model).

On a GPU, a compiled path is chosen only when the CUDA kernels it runs passed their self-check
there (`lrc_keras.kernel_check`); otherwise inference takes "reference" and training "dense".
"""

import warnings

import tensorflow as tf

from lrc_keras import crossover
from lrc_keras import gated_training
from lrc_keras import kernel_check
from lrc_keras import ops
from lrc_keras.estimators import low_rank_product

INFERENCE_PATHS = ("auto", "gated", "gemm")
TRAINING_PATHS = ("auto", "dense", "gated")
# The CUDA kernels the compiled paths run: every path the layer's op, the gated training path
# also the gated backward.
LAYER_KERNELS = ("LrcGatedLayer",)
GATED_TRAINING_KERNELS = ("LrcGatedLayer", "LrcGatedDenseGrad")
_warned = set()


def checked_path(setting, path, owner=None):
    """`path` if it is one of the choices of `setting` ("inference_path" or "training_path"),
    else a ValueError naming the setting, the value and, where given, the layer `owner`."""
    choices = {"inference_path": INFERENCE_PATHS, "training_path": TRAINING_PATHS}[setting]
    if path not in choices:
        raise ValueError(f"{owner + ': ' if owner else ''}{setting} must be one of {choices}, got {path!r}")
    return path


def choose_path(requested, dtype, input_dim, units, rank, batch, device=None):
    """`(path, crossover, reason)` for inference of a layer (see the module docstring).

    `requested` is the layer's `inference_path`; `batch` an int or a scalar tensor; `device`
    where the ops run ("/GPU:0", "/CPU:0"; by default `kernel_check.op_device()`, where an op
    created here runs). `crossover` is the density below which "auto" runs the gated op (None
    for the other paths).
    """
    checked_path("inference_path", requested)
    if not ops.is_compiled():
        return "reference", None, "the compiled ops are not loaded"
    if dtype != tf.float32:
        reason = f"the compiled ops are float32 only and the inputs are {dtype.name}"
        _warn_once(
            ("dtype", dtype.name),
            f"lrc_keras: {reason}, so LowRankGatedDense computes every unit in plain TensorFlow "
            f"(no speed-up). Run inference in float32 (inputs and dtype policy) for the compiled ops.",
        )
        return "reference", None, reason
    device = device or kernel_check.op_device()
    if not kernel_check.kernels_pass(LAYER_KERNELS, device, input_dim, units):
        return "reference", None, f"a CUDA kernel of inference_path={requested!r} failed its self-check on {device}"
    if requested != "auto":
        return requested, None, f"inference_path={requested!r}"
    density = crossover.crossover_for_batch(crossover.crossover_densities(input_dim, units, rank), batch)
    if isinstance(density, float) and not 0.0 < density < 1.0:
        path = "gated" if density >= 1.0 else "gemm"
        return path, None, f"the timing model measured {path} faster at every density for batch {batch}"
    return "auto", density, "the timing model's crossover density against the density the layer last recorded"


# Predicted density above which a layer's training step on the compiled gated kernels costs
# about as much as on the GEMMs: where the two broke even for a 784-1000-1000-10 network's step
# (BENCHMARKS.md: both hidden layers set to ρ .2, .3 and .5 by their margins, random inputs;
# .5 was the limit before, when the gated step there cost 1.64x Dense's against the dense path's 1.23x).
GATED_TRAINING_MAX_DENSITY = 0.3


def choose_training_path(requested, dtype, input_dim, units, device=None):
    """"dense", "gated" or "auto" (gated while the layer's last observed density is at most
    GATED_TRAINING_MAX_DENSITY, decided in the graph at every step) for a training call of a
    layer of this shape, whose ops run on `device` (as in `choose_path`).

    The gated kernels need the compiled library and float32; otherwise "dense", warned once. On
    a GPU, "auto" is "dense": GATED_TRAINING_MAX_DENSITY was measured on CPU cores, and no
    measurement of the gated training step on a GPU exists yet; "gated" is "dense" there when
    a kernel it runs failed its self-check (`lrc_keras.kernel_check`, which warns).
    """
    checked_path("training_path", requested)
    if requested == "dense" or not ops.is_compiled():  # without the library, the import warned
        return "dense"
    if dtype != tf.float32:
        _warn_once(
            ("training dtype", dtype.name),
            f"lrc_keras: the compiled gated training kernels are float32 only and the inputs are "
            f"{dtype.name}, so LowRankGatedDense trains by training_path=\"dense\" (a GEMM, then the mask).",
        )
        return "dense"
    device = device or kernel_check.op_device()
    if requested == "auto" and kernel_check.is_gpu(device):
        return "dense"
    if not kernel_check.kernels_pass(GATED_TRAINING_KERNELS, device, input_dim, units):
        return "dense"
    return requested


def infer(layer, x):
    """`(y, active_fraction)` of a built LowRankGatedDense's inference on 2-D x, by the
    implementation `choose_path` picks for it: the compiled LrcGatedLayer (which checks the
    traced rank itself) given no dense rows ("gated") or TF's GEMM of every row ("gemm"), or
    plain TensorFlow ("reference")."""
    batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
    path, crossover_density, _ = choose_path(layer.inference_path, x.dtype, layer.kernel.shape[1], layer.units,
                                             layer.rank, batch)
    if path == "reference":
        layer.check_traced_rank()
        product = low_rank_product(x, *layer.current_factors())
        return ops.reference_with_density(x, layer.kernel, layer.bias, product, tf.cast(layer.gate_margin, x.dtype))

    run_layer_op = _layer_op_of(layer, sample_rows=0)

    def layer_op(z):
        y, _, _, active_fraction = run_layer_op(x, layer.kernel, layer.bias, z)
        return y, active_fraction

    def gated():
        return layer_op(tf.zeros([0, layer.units], x.dtype))

    def gemm():
        return layer_op(ops.kernel_product(x, layer.kernel))

    if path == "gated":
        return gated()
    if path == "gemm":
        return gemm()
    return tf.cond(layer.observed_density <= crossover_density, gated, gemm)


def train(layer, x, sample_rows):
    """`(y, skipped, gate_counts, active_fraction)` of a built LowRankGatedDense's training call
    on 2-D x, by the path `choose_training_path` picks ("auto": gated while the density the layer
    last recorded is at most GATED_TRAINING_MAX_DENSITY, decided in the graph at every step,
    inside the training function's custom gradient: `lrc_keras.gated_training.train_layer`, which
    also says what `skipped` is), or in plain TensorFlow where the compiled op cannot run (the
    dtype, the library, a GPU kernel's self-check). gate_counts (tp, fp, fn, tn, float64) are
    over the first `sample_rows` rows."""
    path = choose_training_path(layer.training_path, x.dtype, layer.kernel.shape[1], layer.units)
    bias = ops.bias_or_zeros(layer.bias, layer.kernel, x.dtype)
    if not _layer_op_runs(x.dtype, layer.kernel.shape[1], layer.units):
        layer.check_traced_rank()
        product = low_rank_product(tf.stop_gradient(x), *layer.current_factors())
        return gated_training.train_reference(x, layer.kernel, bias, tf.stop_gradient(product),
                                              tf.cast(layer.gate_margin, x.dtype), sample_rows)
    gated = path == "gated" if path != "auto" else layer.observed_density <= GATED_TRAINING_MAX_DENSITY
    y, skipped, counts, active_fraction = gated_training.train_layer(
        x, layer.kernel, bias, _layer_op_of(layer, sample_rows), sample_rows, gated)
    return y, skipped, tf.cast(counts, tf.float64), active_fraction


def _layer_op_runs(dtype, input_dim, units, device=None):
    """Whether the compiled LrcGatedLayer can run a layer's call: the library loaded, float32, and
    on a GPU a passed self-check."""
    return (ops.is_compiled() and dtype == tf.float32
            and kernel_check.kernels_pass(LAYER_KERNELS, device or kernel_check.op_device(), input_dim, units))


def _layer_op_of(layer, sample_rows):
    """`run(x, kernel, bias, z)`: LrcGatedLayer with the layer's estimator, margin and rank, read
    here, outside the training path's custom gradient (which takes no variables)."""
    factors = tf.convert_to_tensor(layer.estimator_factors)
    margin = tf.convert_to_tensor(layer.gate_margin)
    rank_now = tf.convert_to_tensor(layer.estimator_rank)

    def run(x, kernel, bias, z):
        return ops.gated_layer(x, factors, kernel, bias, margin, z, rank_now, layer.rank, sample_rows, layer.name)

    return run


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
