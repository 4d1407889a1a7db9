"""The gated training path: a forward and a backward that both skip the units the estimate skips.

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
    y, active_fraction, _ = _gated_dense_train(*_checked(x, kernel, bias, product, margin), sample_rows=0)
    return y, active_fraction


def gated_dense_train_with_sample(x, kernel, bias, product, margin, sample_rows):
    """`(y, skipped)`: y of `gated_dense_train`, and for the first `sample_rows` rows of x the
    active units the gate skipped, skipped = relu(z) where ẑ ≤ -margin, else 0, from z computed
    densely for those rows alone (what the skipped-unit penalty and the gate metrics need).

    One LrcGatedDenseGrad computes the gradient of both: y's pairs and skipped's positive pairs
    never overlap, so the backward runs over their union, with dL/dy on the first and
    dL/dskipped on the second. A separate backward for the sampled rows would cost two dense
    products of the whole kernel's size and their sum, more than the sampled rows' forward.
    Inputs as `gated_dense_train_with_density`'s.
    """
    y, _, skipped = _gated_dense_train(*_checked(x, kernel, bias, product, margin), sample_rows=sample_rows)
    return y, skipped


def _checked(x, kernel, bias, product, margin):
    inputs = {"x": x, "kernel": kernel, "bias": bias, "product": product}
    inputs = {name: tf.convert_to_tensor(value) for name, value in inputs.items()}
    for name, value in inputs.items():
        if value.dtype != tf.float32:
            raise TypeError(f"gated_dense_train: {name} must be float32 (the compiled kernels' only dtype), got {value.dtype.name}")
    return (*inputs.values(), tf.convert_to_tensor(margin, tf.float32))


def _gated_dense_train(x, kernel, bias, product, margin, sample_rows):
    """`(y, active_fraction, skipped)` with the gated backward over y's and skipped's pairs."""

    @tf.custom_gradient
    def forward(x, kernel, bias, product, margin):
        library = ops.compiled_library()
        # The gradient reads x and the kernel through tensors made here: inside a tf.cond branch
        # (training_path="auto"), the branch's own inputs are placeholders that the gradient's
        # graph cannot read, while tensors computed in the branch become outputs of the cond.
        x, kernel = tf.identity(x), tf.identity(kernel)
        y, active_fraction = library.lrc_gated_dense(x, kernel, bias, product, margin)
        rows = slice(None, sample_rows)
        z = ops.dense_preactivation(x[rows], kernel, bias)
        mask = gating.gate_mask(product[rows] + bias, margin)
        skipped = tf.where(mask, tf.zeros([], z.dtype), tf.nn.relu(z))

        def gradient(grad_y, grad_active_fraction, grad_skipped):
            if grad_skipped is None:
                grad_passing, passing = grad_y, y
            else:
                # The sample's rows, padded to the batch: zeros add no pair and no gradient.
                below = [[0, tf.shape(y)[0] - tf.shape(skipped)[0]], [0, 0]]
                passing = y + tf.pad(skipped, below)
                grad_passing = tf.where(y > 0, grad_y, tf.pad(grad_skipped, below))
            grad_x, grad_kernel, grad_bias = library.lrc_gated_dense_grad(grad_passing, passing, x, kernel)
            return grad_x, grad_kernel, grad_bias, None, None

        return (y, active_fraction, skipped), gradient

    return forward(x, kernel, bias, product, margin)
