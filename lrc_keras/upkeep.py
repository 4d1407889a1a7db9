"""What a gated layer's call records besides y: in training, from the outputs of its compiled op (or
the TensorFlow path), the gate metrics, the observed density, a trained estimator's loss and the
activity penalties of the skipped units and of a density target; in an audited inference, the gate
measured against z computed densely (`lrc_keras.set_audit`)."""

import tensorflow as tf

from lrc_keras import estimators
from lrc_keras import gating
from lrc_keras import ops
from lrc_keras.metrics import confusion_counts

# Rows of each training batch whose z the gate metrics, the skipped-unit penalty and a trained
# estimator's loss use (the first rows: fit shuffles them, an unbiased sample). The dense path has
# their z anyway; the gated path computes it for them alone, which costs a step no more at 32 rows
# than at 8 (BENCHMARKS.md).
GATE_SAMPLE_ROWS = 32


def record_training_step(layer, x, y, skipped, counts, active_fraction, batch_size):
    """Record a training call's gate and add its losses to `layer`.

    x: the 2-D inputs; y, skipped, counts (tp, fp, fn, tn, float64) and active_fraction: the
    training path's outputs (`lrc_keras.dispatch.train` with GATE_SAMPLE_ROWS); batch_size: the
    batch's size before any reshape to 2-D, which Keras divides the activity penalty by.
    """
    layer.gate_metric.add_counts(counts)
    layer.observed_density.assign(active_fraction)
    if layer.estimator.trainable:  # its loss reaches U and V through the sampled rows' estimate
        z_hat = estimators.estimate(tf.stop_gradient(x[:GATE_SAMPLE_ROWS]), *layer.current_factors(),
                                    tf.stop_gradient(ops.bias_or_zeros(layer.bias, layer.kernel, x.dtype)))
        # y and skipped never overlap, so their sum is relu(z) on the sampled rows.
        positive = tf.stop_gradient(y[:GATE_SAMPLE_ROWS] + skipped) > 0
        layer.add_loss(layer.estimator.loss(layer, z_hat, positive))
    # Keras charges the output and divides by the batch size; the skipped units are charged on the
    # sampled rows scaled to the whole batch: the same penalty and gradient in expectation (for
    # additive regularizers such as L1 and L2) for a fraction of the work.
    skipped = tf.cast(skipped, tf.float32)
    scale = tf.cast(tf.shape(x)[0], tf.float32) / tf.cast(tf.shape(skipped)[0] * batch_size, tf.float32)
    if layer.regularize_skipped_units and layer.activity_regularizer is not None:
        layer.add_loss(layer.activity_regularizer(skipped) * scale)
    if layer.target_density is not None:
        activity = tf.reduce_sum(tf.cast(y, tf.float32)) / tf.cast(batch_size, tf.float32)
        if layer.regularize_skipped_units:
            activity += tf.reduce_sum(skipped) * scale
        layer.add_loss(layer.target_density.penalty(layer, counts, activity))


def audited_inference(layer, x):
    """y of an inference that also computes z densely to measure the gate, into the layer's gate
    metrics and observed density (`lrc_keras.set_audit`)."""
    layer.check_traced_rank()
    _, mask = layer.gate(x)
    z = ops.dense_preactivation(x, layer.kernel, layer.bias)
    counts = confusion_counts(mask, z > 0)
    layer.gate_metric.add_counts(counts)
    # tp + fp over all entries: the density, without another pass over the mask.
    layer.observed_density.assign(tf.cast((counts[0] + counts[1]) / tf.reduce_sum(counts), tf.float32))
    return gating.masked_relu(z, mask)
