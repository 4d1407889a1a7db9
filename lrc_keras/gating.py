"""The mask stage: which units to compute, and the rule's inverses.

A unit j of row i is computed when ẑ[i, j] > -margin, or when ẑ[i, j] is NaN, so that NaN inputs
surface as NaN outputs instead of being silently gated to 0 (`custom_ops/gated_dense.h`
implements the same rule as `UnitIsComputed`). Skipped units output exactly 0.

The inverses choose a margin from estimates: the margin that computes a given fraction of the
units (`margin_for_density`) and the largest one that still computes a given fraction of the
truly active units (`margin_for_recall`).
"""

import math

import numpy as np
import tensorflow as tf


def gate_mask(z_hat, margin):
    """Units to compute: ẑ > -margin, and NaN estimates (so NaN propagates)."""
    return tf.logical_not(z_hat <= -margin)


def masked_relu(z, mask):
    """relu(z) where mask, exactly 0 elsewhere (also where z is NaN or inf)."""
    return tf.where(mask, tf.nn.relu(z), tf.zeros_like(z))


def margin_for_density(z_hat, density):
    """The finite margin at which a fraction `density` of the (finite) estimates z_hat select
    their unit: just past the largest estimate for 0, just past the smallest for 1."""
    z_hat = np.asarray(z_hat, np.float32)
    if density <= 0:
        return -float(np.max(z_hat))
    if density >= 1:
        return -float(np.nextafter(np.min(z_hat), np.float32(-np.inf)))
    return -float(np.quantile(z_hat, 1.0 - density))


def margin_for_recall(positive_estimates, target_recall, all_estimates):
    """The smallest margin (largest threshold t, margin -t) that keeps recall >= target_recall.

    Units are computed where ẑ > t: at most floor((1 - target)·P) of the P estimates of truly
    active units may lie at or below t.
    """
    if positive_estimates.size == 0:
        return -float(np.nextafter(np.max(all_estimates), np.inf))  # nothing needs computing
    ordered = np.sort(positive_estimates.astype(np.float32))
    allowed_misses = int(math.floor((1 - target_recall) * ordered.size + 1e-9))
    threshold = np.nextafter(ordered[allowed_misses], -np.inf, dtype=np.float32)
    return -float(threshold)
