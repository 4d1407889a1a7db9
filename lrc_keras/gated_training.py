"""The training paths' forward and backward: gated (both skip the units the estimate skips) or
dense (a GEMM, then the mask), chosen per call by `train_layer` (the compiled LrcGatedLayer
forward); `train_reference` is the same in plain TensorFlow, for any dtype.

`gated_dense_train(x, kernel, bias, product, margin)` takes exactly the inputs of the compiled
LrcGatedDense (x [batch, d], kernel [n, d], bias [n], product = (x·U)·V [batch, n] without the
bias, a scalar margin) and returns its y,

    y[i, j] = relu(x_i·W_j + b_j)  where ẑ[i, j] = product[i, j] + b_j > -margin (or NaN),  else 0,

with a gradient that, unlike the op's registered one (three dense GEMMs), runs only over the
pairs (i, j) that were computed and came out positive, y[i, j] > 0 (the compiled
LrcGatedDenseGrad, `custom_ops/gated_dense_grad.h`):

    dL/dx_i = Σ_j g[i, j]·W_j,   dL/dW_j = Σ_i g[i, j]·x_i,   dL/db_j = Σ_i g[i, j],
    g = dL/dy on those pairs.

These are the gradients of the dense layer's where the gate computed every active unit; product
and margin get none (the estimator learns by its own rule). A NaN output passes no gradient, as
in tf.nn.relu's, so a row of NaN inputs leaves dL/dW finite where a dense GEMM's 0·NaN would not;
the loss is NaN either way. float32 only, and the compiled library must be loaded.
LrcGatedDenseGrad has a registered gradient of its own (`lrc_keras.ops`), so second-order
gradients (gradient penalties, Hessian-vector products) run through the gated backward too.

Example:
    product = lrc_keras.estimators.low_rank_product(x, estimator_u, estimator_v)
    with tf.GradientTape() as tape:
        y = gated_dense_train(x, kernel, bias, product, margin)
        loss = tf.reduce_sum(y * target)
    grad_x, grad_kernel, grad_bias = tape.gradient(loss, [x, kernel, bias])
"""

import tensorflow as tf

from lrc_keras import gating
from lrc_keras import ops
from lrc_keras.metrics import confusion_counts


def gated_dense_train(x, kernel, bias, product, margin):
    """y of `gated_dense_train_with_density`."""
    return gated_dense_train_with_density(x, kernel, bias, product, margin)[0]


def gated_dense_train_with_density(x, kernel, bias, product, margin):
    """`(y, active_fraction)` of LrcGatedDense, with the gated backward as its gradient.

    Args:
      x: float32 [batch, input_dim].
      kernel: float32 [units, input_dim] (the layer's stored layout).
      bias: float32 [units].
      product: float32 [batch, units], the estimate (x·U)·V without the bias.
      margin: scalar; a unit is computed where product + bias > -margin.
    Returns:
      y [batch, units] and the fraction of computed pairs (a float32 scalar, no gradient).
    """
    x, kernel, bias, product, margin = _checked(x, kernel, bias, product, margin)

    def forward(x, kernel, bias):
        y, active_fraction = ops.compiled_library().lrc_gated_dense(x, kernel, bias, product, margin)
        return y, tf.zeros([0, tf.shape(y)[1]], y.dtype), active_fraction

    y, _, active_fraction = _differentiated(forward, x, kernel, bias, gated=True)
    return y, active_fraction


def train_layer(x, kernel, bias, run_layer_op, sample_rows, gated):
    """`(y, skipped, gate_counts, active_fraction)` of a training call of the compiled
    LrcGatedLayer, with the backward over y's computed positive pairs and skipped's positive
    pairs (they never overlap), dL/dy on the first and dL/dskipped on the second.

    `run_layer_op(x, kernel, bias, z)` calls the op with the layer's other inputs
    (`lrc_keras.ops.gated_layer`); skipped holds, for the first `sample_rows` rows, the active
    units the gate skipped (relu(z) where ẑ ≤ -margin, else 0), which the skipped-unit penalty
    and the gate's counts need. `gated` chooses how, a Python bool or a scalar bool tensor that
    decides in the graph at every call: True gives the op z for the sampled rows alone (TF's GEMM)
    and runs the gated backward (LrcGatedDenseGrad); False gives it z for every row and runs the
    backward by GEMMs. Both choices live inside one custom gradient, so a second-order gradient
    differentiates the chosen backward (TensorFlow cannot differentiate twice a custom gradient
    inside tf.cond). float32 only.
    """

    def forward(x, kernel, bias):
        return run_layer_op(x, kernel, bias, ops.kernel_product(_densely_computed_rows(x, sample_rows, gated), kernel))

    return _differentiated(forward, x, kernel, bias, gated)


def _densely_computed_rows(x, sample_rows, gated):
    """The rows whose z TensorFlow's GEMM computes for the op: the sampled rows on the gated path,
    every row on the dense path. A slice's bound, not a tf.cond: each cond adds two functions to
    every trace of the train step, and graph time grows with them."""
    if gated is True:
        return x[:sample_rows]
    if gated is False:
        return x
    return x[:tf.where(gated, sample_rows, tf.shape(x)[0])]


def train_reference(x, kernel, bias, product, margin, sample_rows):
    """`(y, skipped, gate_counts, active_fraction)` as `train_layer`'s, in plain TensorFlow (any
    float dtype, no compiled op): z densely, then the mask, differentiated by TensorFlow."""
    z = ops.dense_preactivation(x, kernel, bias)
    mask = gating.gate_mask(product + bias, margin)
    rows = slice(None, sample_rows)
    skipped = gating.masked_relu(z[rows], tf.logical_not(mask[rows]))
    counts = confusion_counts(mask[rows], tf.stop_gradient(z[rows]) > 0)
    return gating.masked_relu(z, mask), skipped, counts, tf.reduce_mean(tf.cast(mask, tf.float32))


def _checked(x, kernel, bias, product, margin):
    inputs = {"x": x, "kernel": kernel, "bias": bias, "product": product}
    inputs = {name: tf.convert_to_tensor(value) for name, value in inputs.items()}
    for name, value in inputs.items():
        if value.dtype != tf.float32:
            raise TypeError(f"gated_dense_train: {name} must be float32 (the compiled kernels' only dtype), got {value.dtype.name}")
    return (*inputs.values(), tf.convert_to_tensor(margin, tf.float32))


def _differentiated(forward, x, kernel, bias, gated):
    """forward(x, kernel, bias) = (y, skipped, *statistics), with the backward over y's and
    skipped's positive pairs: LrcGatedDenseGrad where `gated`, else GEMMs."""
    # Tensors, not variables: the gradient below is the variables' gradient through their reads.
    x, kernel, bias = tf.convert_to_tensor(x), tf.convert_to_tensor(kernel), tf.convert_to_tensor(bias)

    @tf.custom_gradient
    def differentiated(x, kernel, bias):
        outputs = forward(x, kernel, bias)
        y, skipped = outputs[:2]

        def gradient(grad_y, skipped_gradient, *_):
            # skipped_gradient is None where nothing in the loss reads skipped (no skipped-unit penalty).

            def gated_backward():
                grad_skipped = tf.zeros_like(skipped) if skipped_gradient is None else skipped_gradient
                return tuple(ops.compiled_library().lrc_gated_dense_grad(grad_y, y, grad_skipped, skipped, x, kernel))

            def dense_backward():
                # ReluGrad(g, a) is g where a > 0, else 0: one pass, where a tf.where and its
                # comparison take two (~50 µs each at 128 x 1000 here). y and skipped never
                # overlap; the sampled rows' part is padded to the batch with zeros.
                grad_z = tf.raw_ops.ReluGrad(gradients=grad_y, features=y)
                if skipped_gradient is not None:
                    below = [[0, tf.shape(y)[0] - tf.shape(skipped)[0]], [0, 0]]
                    grad_z += tf.pad(tf.raw_ops.ReluGrad(gradients=skipped_gradient, features=skipped), below)
                return tf.matmul(grad_z, kernel), tf.matmul(grad_z, x, transpose_a=True), tf.reduce_sum(grad_z, axis=0)

            return _either(gated, gated_backward, dense_backward)

        return outputs, gradient

    return differentiated(x, kernel, bias)


def _either(gated, if_gated, if_dense):
    """`if_gated()` or `if_dense()` as `gated` (a Python bool or a scalar bool tensor) says."""
    if gated is True:
        return if_gated()
    if gated is False:
        return if_dense()
    return tf.cond(gated, if_gated, if_dense)
