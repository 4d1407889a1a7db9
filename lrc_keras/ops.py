"""The gated-compute stage: the compiled ops, their gradients, and the pure-TF reference.

Each implementation takes exactly the registered LrcGatedDense's inputs, x [batch, d], the kernel
[units, d] (the layer's stored layout), the bias [units] (or None), the estimate's product
(x·U)·V [batch, units] without the bias (`lrc_keras.estimators.low_rank_product`: the estimate
is computed once, by its stage) and the margin, and returns `(y, active_fraction)`,
    y[i, j] = relu(x_i·W_j + b_j)  where `lrc_keras.gating.gate_mask(product + b, margin)` selects (i, j),
              else exactly 0,
the same numbers up to float rounding:
    gated_dense_with_density      the compiled LrcGatedDense: never computes a skipped unit
    gemm_then_mask_with_density   TF's dense GEMM, then the compiled LrcMaskedRelu in one pass
    reference_with_density        plain TensorFlow: z densely, then the mask (any float dtype)
The first two need the compiled library (custom_ops/, built by setup.py) and float32.

A layer runs `gated_layer`, the compiled LrcGatedLayer (`custom_ops/gated_layer.h`): the estimate
and the mask in the same call, the rows TF's GEMM computed (z, an input) masked as by
LrcMaskedRelu and the others computed as by LrcGatedDense, and for training the sampled rows'
skipped units and gate counts. Which path runs is decided in one place, `lrc_keras.dispatch`.
"""

import importlib.metadata
import json
import os
import sys
import urllib.parse
import urllib.request
import warnings

import tensorflow as tf

from lrc_keras.gating import gate_mask
from lrc_keras.gating import masked_relu

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
LIBRARY_FILE = os.path.join(PACKAGE_DIR, "_lrc_ops.so")
BUILD_INFO_FILE = os.path.join(PACKAGE_DIR, "_lrc_ops.json")
# A clone of the repository: the package beside setup.py, where `pip install -e` builds the op.
SOURCE_TREE = os.path.dirname(PACKAGE_DIR) if os.path.exists(
    os.path.join(os.path.dirname(PACKAGE_DIR), "setup.py")) else None
REBUILD_HINT = (
    f"build it into this source tree with `pip install -e {SOURCE_TREE}`" if SOURCE_TREE else
    'rebuild it against the running TensorFlow with `pip install --force-reinstall --no-deps '
    '--no-build-isolation .` from the lrc-keras source tree'
)


def _load_library():
    """The loaded op library, or None after one warning that says why (and how to rebuild)."""

    def unavailable(reason, fix=f" To fix, {REBUILD_HINT}."):
        warnings.warn(
            f"lrc_keras: compiled ops unavailable ({reason}); using the pure-TensorFlow path, "
            f"which gives the same numbers without the speed-up.{fix}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None

    try:
        with open(BUILD_INFO_FILE) as f:
            record = json.load(f)
    except (OSError, ValueError) as error:
        record = error
    # setup.py records a deliberate skip (LRC_BUILD_OPS=0): nothing to fix.
    if isinstance(record, dict) and record.get("skipped"):
        return unavailable(f"the build was skipped on request ({record['skipped']})", fix="")
    if not os.path.exists(LIBRARY_FILE):
        shadowed = _built_copies_elsewhere()
        if shadowed and SOURCE_TREE:
            return unavailable(
                f"Python imported lrc_keras from the source tree {SOURCE_TREE}, which has no {LIBRARY_FILE}, "
                f"not the built copy in {shadowed[0]}: the tree comes first on the import path (the current "
                "folder or PYTHONPATH)",
                fix=f" To fix, {REBUILD_HINT}, or run from another folder.",
            )
        return unavailable(f"{LIBRARY_FILE} was not built")
    built_for = record.get("tensorflow_version") if isinstance(record, dict) else None
    if built_for is None:
        problem = record if isinstance(record, Exception) else "no tensorflow_version in it"
        return unavailable(f"cannot read the build record {BUILD_INFO_FILE}: {problem}")
    if built_for != tf.__version__:
        return unavailable(
            f"built against TensorFlow {built_for}, but TensorFlow {tf.__version__} is running"
        )
    try:
        return tf.load_op_library(LIBRARY_FILE)
    except (tf.errors.OpError, OSError) as error:
        return unavailable(f"loading {LIBRARY_FILE} failed: {error}")


def _built_copies_elsewhere():
    """Other lrc_keras folders with a built library: the installed distribution's first (for an
    editable install, the source tree it points to), then any on the import path."""
    folders = []
    try:
        distribution = importlib.metadata.distribution("lrc-keras")
        folders.append(str(distribution.locate_file("lrc_keras")))
        origin = json.loads(distribution.read_text("direct_url.json") or "{}")
        if origin.get("dir_info", {}).get("editable") and origin["url"].startswith("file:"):
            tree = urllib.request.url2pathname(urllib.parse.urlparse(origin["url"]).path)
            folders.append(os.path.join(tree, "lrc_keras"))
    except (importlib.metadata.PackageNotFoundError, ValueError, KeyError):
        pass
    folders += [os.path.join(entry or os.getcwd(), "lrc_keras") for entry in sys.path if isinstance(entry, str)]
    here = os.path.realpath(PACKAGE_DIR)
    return [folder for folder in dict.fromkeys(os.path.realpath(folder) for folder in folders)
            if folder != here and os.path.exists(os.path.join(folder, "_lrc_ops.so"))]


_library = _load_library()


def is_compiled():
    """True when the compiled gated-dense op is loaded and used for float32 inference."""
    return _library is not None


def library_path():
    """Path of the loaded op library, or None when the pure-TF path is in use."""
    return LIBRARY_FILE if _library is not None else None


def kernel_product(x, kernel):
    """x·W with the kernel stored as (units, input_dim).

    An einsum: TF runs it faster for this layout than matmul(x, kernel, transpose_b=True),
    which was up to 6x slower than Dense's x·W at batch 16.
    """
    return tf.einsum("bd,nd->bn", x, kernel)


def dense_preactivation(x, kernel, bias):
    """z = x·W + b (training, audits and the reference)."""
    z = kernel_product(x, kernel)
    return z if bias is None else z + bias


def reference_with_density(x, kernel, bias, product, margin):
    """`(y, active_fraction)` in plain TensorFlow: z computed densely, then masked."""
    mask = gate_mask(product if bias is None else product + bias, margin)
    y = masked_relu(dense_preactivation(x, kernel, bias), mask)
    return y, tf.reduce_mean(tf.cast(mask, tf.float32))


def gated_dense(x, kernel, bias, product, margin):
    """y of the compiled LrcGatedDense (`gated_dense_with_density`)."""
    return gated_dense_with_density(x, kernel, bias, product, margin)[0]


def gated_dense_with_density(x, kernel, bias, product, margin):
    """`(y, active_fraction)` of the compiled LrcGatedDense: only the selected dot products."""
    y, active_fraction = compiled_library().lrc_gated_dense(
        x, kernel, bias_or_zeros(bias, kernel, x.dtype), product, _margin(margin, x.dtype)
    )
    return y, active_fraction


def gemm_then_mask_with_density(x, kernel, bias, product, margin):
    """`(y, active_fraction)` from TF's dense GEMM and one fused masking pass (LrcMaskedRelu)."""
    y, active_fraction = compiled_library().lrc_masked_relu(
        kernel_product(x, kernel), bias_or_zeros(bias, kernel, x.dtype), product, _margin(margin, x.dtype)
    )
    return y, active_fraction


def gated_layer(x, factors, kernel, bias, margin, z, rank_now, rank, sample_rows, layer_name):
    """`(y, skipped, gate_counts, active_fraction)` of the compiled LrcGatedLayer
    (`custom_ops/gated_layer.h`): a gated layer's estimate, mask, y and, for the first
    `sample_rows` rows of z, the skipped active units and the gate's counts (tp, fp, fn, tn), in
    one call. `factors` is the layer's packed `estimator_factors` for `rank`; `rank_now` its
    `estimator_rank`, which the op checks against `rank` (a function traced before a `set_rank`
    fails naming `layer_name`); z = x·Wᵀ for the rows TensorFlow's GEMM computed densely."""
    return compiled_library().lrc_gated_layer(
        x, factors, kernel, bias_or_zeros(bias, kernel, x.dtype), _margin(margin, x.dtype), z, rank_now,
        rank=rank, sample_rows=sample_rows, layer=layer_name,
    )


def compiled_library():
    if _library is None:
        raise RuntimeError(
            "lrc_keras: the compiled ops are not loaded (see the warning at import); "
            "lrc_keras.dispatch chooses reference_with_density instead"
        )
    return _library


def bias_or_zeros(bias, kernel, dtype):
    return tf.zeros([tf.shape(kernel)[0]], dtype) if bias is None else bias


def _margin(margin, dtype):
    return tf.convert_to_tensor(margin, dtype)


if _library is not None:

    def _through_computed_units(op, grad):
        """dL/dz: the gradient of the units that were computed and positive; the mask is a constant."""
        return tf.where(op.outputs[0] > 0, grad, tf.zeros_like(grad))

    @tf.RegisterGradient("LrcGatedDense")
    def _gated_dense_grad(op, grad, _):
        x, kernel = op.inputs[0], op.inputs[1]
        grad_z = _through_computed_units(op, grad)
        return (
            tf.matmul(grad_z, kernel),
            tf.matmul(grad_z, x, transpose_a=True),
            tf.reduce_sum(grad_z, axis=0),
            None,
            None,
        )

    @tf.RegisterGradient("LrcMaskedRelu")
    def _masked_relu_grad(op, grad, _):
        grad_z = _through_computed_units(op, grad)
        return grad_z, tf.reduce_sum(grad_z, axis=0), None, None

    @tf.RegisterGradient("LrcGatedLayer")
    def _gated_layer_grad(op, grad_y, grad_skipped, _, __):
        """Gradients through y's computed positive units and the sampled rows' skipped positive
        ones: to z for the rows it gave (TF's GEMM passes them on), to x and the kernel for the
        rows the op computed itself, to the bias for all; the estimate, mask and margin get none.
        By dense products: the training paths differentiate the op through their own custom
        gradient (`lrc_keras.gated_training`); this one serves gradients of inference calls."""
        x, kernel, z = op.inputs[0], op.inputs[2], op.inputs[5]
        y, skipped = op.outputs[0], op.outputs[1]
        grad_pre = _through_computed_units(op, grad_y)
        below = [[0, tf.shape(y)[0] - tf.shape(skipped)[0]], [0, 0]]
        grad_pre += tf.pad(tf.where(skipped > 0, grad_skipped, tf.zeros_like(grad_skipped)), below)
        dense_rows = tf.shape(z)[0]
        gated_rows = grad_pre[dense_rows:]
        grad_x = tf.concat([tf.zeros_like(x[:dense_rows]), tf.matmul(gated_rows, kernel)], axis=0)
        grad_kernel = tf.matmul(gated_rows, x[dense_rows:], transpose_a=True)
        return (grad_x, None, grad_kernel, tf.reduce_sum(grad_pre, axis=0), None, grad_pre[:dense_rows], None)

    @tf.RegisterGradient("LrcGatedDenseGrad")
    def _gated_dense_grad_grad(op, grad_grad_x, grad_grad_kernel, grad_grad_bias):
        """The gated backward's own gradient, for second-order gradients (gradient penalties,
        Hessian-vector products) through the gated training path.

        The backward is linear in its upstream gradients and bilinear in x and W over a fixed set
        of pairs P: y's positive entries, with grad_y, and in the first rows skipped's, with
        grad_skipped (they never overlap). With G those gradients on P and 0 elsewhere,
            grad_x = G·W,   grad_kernel = Gᵀ·x,   grad_bias = Σ_i G[i, :].
        For upstream gradients A (of grad_x), B (of grad_kernel) and c (of grad_bias):
            dL/dx_i  = Σ_{j: (i,j) ∈ P} G[i, j]·B_j   the op's grad_x with B in W's place
            dL/dW_j  = Σ_{i: (i,j) ∈ P} G[i, j]·A_i   the op's grad_kernel with A in x's place
        so one more call of the compiled op gives both, over the same pairs; and
            dL/dG[i, j] = A_i·W_j + x_i·B_j + c_j on P, 0 elsewhere,
        dense products masked to P, split between grad_y and grad_skipped as P is. y and skipped
        get none: P is piecewise constant in them, as relu's second derivative is 0.
        """
        grad_y, y, grad_skipped, skipped, x, kernel = op.inputs
        grad_x = grad_kernel = grad_grad_y = grad_grad_skipped = None
        if grad_grad_x is not None or grad_grad_kernel is not None:
            upstream_x = tf.zeros_like(x) if grad_grad_x is None else grad_grad_x
            upstream_kernel = tf.zeros_like(kernel) if grad_grad_kernel is None else grad_grad_kernel
            of_x, of_kernel, _ = _library.lrc_gated_dense_grad(grad_y, y, grad_skipped, skipped, upstream_x,
                                                               upstream_kernel)
            grad_x = None if grad_grad_kernel is None else of_x
            grad_kernel = None if grad_grad_x is None else of_kernel
        terms = [kernel_product(grad_grad_x, kernel) if grad_grad_x is not None else None,
                 kernel_product(x, grad_grad_kernel) if grad_grad_kernel is not None else None,
                 grad_grad_bias]
        terms = [term for term in terms if term is not None]
        if terms:
            through = tf.math.add_n([tf.broadcast_to(term, tf.shape(y)) for term in terms])
            grad_grad_y = tf.where(y > 0, through, tf.zeros_like(y))
            grad_grad_skipped = tf.where(skipped > 0, through[:tf.shape(skipped)[0]], tf.zeros_like(skipped))
        return grad_grad_y, None, grad_grad_skipped, None, grad_x, grad_kernel
