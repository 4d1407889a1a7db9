"""The metrics stage: how well the estimator's mask matches the true signs of z."""

import keras
import tensorflow as tf

GATE_RATES = (
    "sign_accuracy",
    "recall",
    "precision",
    "false_negative_rate",
    "predicted_density",
    "true_density",
)


def rates_from_counts(tp, fp, fn, tn):
    """The rates of GATE_RATES from confusion counts (numbers or tensors).

    A rate with an empty denominator (no positive unit, nothing computed) is 1
    for recall and precision (nothing was missed, nothing wasted) and 0 for the
    false-negative rate.
    """
    total = tp + fp + fn + tn
    positives = tp + fn
    predicted = tp + fp
    return {
        "sign_accuracy": _ratio(tp + tn, total, 1.0),
        "recall": _ratio(tp, positives, 1.0),
        "precision": _ratio(tp, predicted, 1.0),
        "false_negative_rate": _ratio(fn, positives, 0.0),
        "predicted_density": _ratio(predicted, total, 0.0),
        "true_density": _ratio(positives, total, 0.0),
    }


def _ratio(numerator, denominator, empty):
    if isinstance(denominator, (int, float)):
        return numerator / denominator if denominator else empty
    return tf.where(denominator > 0, numerator / tf.maximum(denominator, 1), empty)


def confusion_counts(mask, positive):
    """(tp, fp, fn, tn) of a boolean mask against the boolean truth z > 0."""

    def count(a, b):
        return tf.reduce_sum(tf.cast(tf.logical_and(a, b), tf.float64))

    computed, skipped = mask, tf.logical_not(mask)
    negative = tf.logical_not(positive)
    return (
        count(computed, positive),
        count(computed, negative),
        count(skipped, positive),
        count(skipped, negative),
    )


class GateStatistics(keras.metrics.Metric):
    """Confusion counts of a layer's gate, reported as the GATE_RATES rates.

    `result()` is a dict keyed `"{prefix}{statistic}"`, so one object puts all
    six rates in the `fit`/`evaluate` logs and in TensorBoard. Counts are
    float64 so that they stay exact past 2**24 units per epoch.
    """

    def __init__(self, prefix, name=None, **kwargs):
        super().__init__(name=name or f"{prefix}gate", **kwargs)
        self.prefix = prefix
        self.counts = [
            self.add_variable(
                shape=(), initializer="zeros", dtype="float64", name=name, aggregation="sum"
            )
            for name in ("true_positives", "false_positives", "false_negatives", "true_negatives")
        ]

    def update_state(self, mask, positive):
        for variable, count in zip(self.counts, confusion_counts(mask, positive)):
            variable.assign_add(count)

    def result(self):
        """The rates; NaN where nothing was measured (e.g. validation without an audit)."""
        counts = [tf.convert_to_tensor(v) for v in self.counts]
        measured = tf.add_n(counts) > 0
        return {
            self.prefix + key: tf.where(measured, tf.cast(value, tf.float32), float("nan"))
            for key, value in rates_from_counts(*counts).items()
        }

    def get_config(self):
        return {"prefix": self.prefix, "name": self.name}
