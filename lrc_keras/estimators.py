"""The estimate stage: the rank-r sign estimator ẑ = (x·U)·V + b and how it is fitted.

Stored layout (shared with the compiled ops, see `custom_ops/gated_dense.h`):
    kernel       (units, input_dim)  row j is unit j's weights, contiguous
    estimator_u  (input_dim, rank)   one dense GEMM x·U per batch
    estimator_v  (rank, units)       V as the paper writes it: the second GEMM needs no transpose
so W = kernel^T and ẑ = (x·U)·V + b.
"""

import tensorflow as tf

# The names LowRankGatedDense(estimator=...) accepts.
ESTIMATORS = ("svd", "joint")


def truncated_svd_factors(kernel, rank):
    """Best rank-`rank` factors of W = kernel^T, in the stored layout.

    Returns `(estimator_u, estimator_v, singular_values)` with
    estimator_u @ estimator_v the truncated SVD of W (Eckart-Young: the best
    rank-r approximation in Frobenius and spectral norm). The singular values
    are split as sqrt(s) on both sides so that U and V have the same scale,
    which keeps the joint estimator's gradients balanced.
    """
    s, left, right = tf.linalg.svd(kernel, full_matrices=False)
    # kernel = left·diag(s)·right^T, so W = kernel^T = right·diag(s)·left^T.
    root = tf.sqrt(s[:rank])
    return right[:, :rank] * root, tf.transpose(left[:, :rank] * root), s


def low_rank_product(x, estimator_u, estimator_v):
    """(x·U)·V for 2-D x: two thin GEMMs, r·(d + n) multiply-adds per row."""
    return tf.matmul(tf.matmul(x, estimator_u), estimator_v)


def estimate(x, estimator_u, estimator_v, bias):
    """ẑ = (x·U)·V + b for 2-D x."""
    z_hat = low_rank_product(x, estimator_u, estimator_v)
    return z_hat if bias is None else z_hat + bias


def estimator_loss(z_hat, z, positive_weight):
    """Recall-weighted binary cross-entropy teaching ẑ the sign of z.

    The labels (z > 0) carry no gradient, so this loss never pulls the
    network's kernel toward the estimator; `positive_weight` > 1 charges a
    missed active unit more than a wasted computation, as recall is what
    protects accuracy.
    """
    labels = tf.cast(tf.stop_gradient(z) > 0, z_hat.dtype)
    return tf.reduce_mean(
        tf.nn.weighted_cross_entropy_with_logits(
            labels=labels, logits=z_hat, pos_weight=positive_weight
        )
    )
