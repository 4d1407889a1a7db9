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
# Each rate is (weights · counts) / (weights · counts) over the counts (tp, fp, fn, tn), with its
# value for an empty denominator: 1 for recall and precision (nothing was missed, nothing
# wasted), 0 for the others.
_NUMERATORS = ((1, 0, 0, 1), (1, 0, 0, 0), (1, 0, 0, 0), (0, 0, 1, 0), (1, 1, 0, 0), (1, 0, 1, 0))
_DENOMINATORS = ((1, 1, 1, 1), (1, 0, 1, 0), (1, 1, 0, 0), (1, 0, 1, 0), (1, 1, 1, 1), (1, 1, 1, 1))
_EMPTY = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0)


def rates_from_counts(counts):
    """The GATE_RATES rates, as a float64 vector in that order, from counts (tp, fp, fn, tn)."""
    counts = tf.cast(counts, tf.float64)
    numerators = tf.linalg.matvec(tf.constant(_NUMERATORS, tf.float64), counts)
    denominators = tf.linalg.matvec(tf.constant(_DENOMINATORS, tf.float64), counts)
    return tf.where(denominators > 0, numerators / tf.maximum(denominators, 1.0), tf.constant(_EMPTY, tf.float64))


# (tp, fp, fn, tn) from (mask ∧ positive, mask, positive, all entries).
_COUNTS_FROM_TOTALS = ((1, 0, 0, 0), (-1, 1, 0, 0), (-1, 0, 1, 0), (1, -1, -1, 1))


def confusion_counts(mask, positive):
    """(tp, fp, fn, tn) of a boolean 2-D mask against the boolean truth z > 0, float64.

    One counting pass over (mask ∧ positive, mask, positive) in int64, exact past 2²⁴ entries,
    and a handful of ops: this runs in every training step of every gated layer.
    """
    flags = tf.cast(tf.stack([tf.logical_and(mask, positive), mask, positive]), tf.int64)
    totals = tf.concat([tf.reduce_sum(flags, axis=[1, 2]), [tf.size(mask, out_type=tf.int64)]], axis=0)
    return tf.linalg.matvec(tf.constant(_COUNTS_FROM_TOTALS, tf.float64), tf.cast(totals, tf.float64))


class GateStatistics(keras.metrics.Metric):
    """Confusion counts of a layer's gate, reported as the GATE_RATES rates.

    `result()` is a dict keyed `"{prefix}{statistic}"`, so one object puts all six rates in the
    `fit`/`evaluate` logs and in TensorBoard. The counts are one float64 vector (tp, fp, fn, tn),
    exact past 2**24 units per epoch, updated and read with a handful of ops: Keras reads every
    metric's result at every training step, and a dozen small ops per layer showed in a step.
    """

    def __init__(self, prefix, name=None, **kwargs):
        super().__init__(name=name or f"{prefix}gate", **kwargs)
        self.prefix = prefix
        self.counts = self.add_variable(
            shape=(4,), initializer="zeros", dtype="float64", name="confusion_counts", aggregation="sum"
        )

    def update_state(self, mask, positive):
        self.add_counts(confusion_counts(mask, positive))

    def add_counts(self, counts):
        """Adds counts (tp, fp, fn, tn) that the caller already has (`confusion_counts`)."""
        self.counts.assign_add(counts)

    def result(self):
        """The rates; NaN where nothing was measured (e.g. validation without an audit)."""
        counts = tf.convert_to_tensor(self.counts)
        rates = tf.cast(tf.where(tf.reduce_sum(counts) > 0, rates_from_counts(counts), float("nan")), tf.float32)
        return dict(zip((self.prefix + key for key in GATE_RATES), tf.unstack(rates)))

    def get_config(self):
        return {"prefix": self.prefix, "name": self.name}


class LatestValue(keras.metrics.Metric):
    """The last value given to `update_state` since the last reset, NaN before any: how `fit` logs a
    layer's state, such as a density target's penalty strength (`{layer}_density_penalty`), once per epoch."""

    def __init__(self, name, **kwargs):
        super().__init__(name=name, **kwargs)
        self.value = self.add_variable(
            shape=(), initializer=keras.initializers.Constant(float("nan")), dtype="float32", name="value",
            aggregation="mean",
        )

    def update_state(self, value):
        self.value.assign(tf.cast(value, tf.float32))

    def reset_state(self):
        self.value.assign(float("nan"))

    def result(self):
        return tf.convert_to_tensor(self.value)

    def get_config(self):
        return {"name": self.name}
