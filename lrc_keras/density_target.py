"""A density target: an L1 activity penalty whose strength adapts in training until the layer's gate
computes a chosen share of its units.

`LowRankGatedDense(4000, rank=50, target_density=0.05)` (or `target_density=DensityTarget(0.05, ...)`)
adds to the training loss `strength · Σ|y| / batch` (and, with `regularize_skipped_units`, the same on the
sampled active units the gate skipped). At every training step, from the gate's counts on the sampled rows:
- the base strength, the layer's non-trainable `density_penalty` variable, moves by
  `exp(rate · clip(log(ρ / target), -1, 1))`, ρ the predicted density: up while the gate computes more than
  the target, down while it computes less. It starts at `initial_strength` and grows a few percent a step at
  most, so the penalty rises gradually, as ProSparse's does; it is what holds ρ at the target in the end.
- the step's strength is `base · exp(gain · clip(log(active / target), -1, 1))`, from the share of units
  active (z > 0). The penalty moves the active units at once, the gate only as the estimator is refitted:
  this factor strengthens the penalty while the layer is far above its target and eases it as the target
  nears, so that the base, which follows the lagging gate, winds up less and overshoots less.
Both stay within [MIN_STRENGTH, MAX_STRENGTH]. Under a distribution strategy the counts are summed over every
replica and worker first, so all compute the same strength from the global batch.
"""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf

# Bounds of the strength: positive (a multiplicative update can leave neither 0 nor infinity) and far
# beyond any useful L1 activity penalty on either side.
MIN_STRENGTH = 1e-9
MAX_STRENGTH = 10.0


@keras.saving.register_keras_serializable(package="lrc_keras")
class DensityTarget:
    """The predicted density a layer trains to, and how its penalty's strength adapts.

    The object holds settings only: the strength lives in each layer's `density_penalty` variable,
    so one object may serve several layers.

    Args:
        target: Number in (0, 1]: the share of the units the gate should compute (ρ, the
            predicted density).
        initial_strength: Positive finite number: the base L1 strength at the start of training.
        rate: Positive finite number: the largest change of log(base strength) in one training
            step. Larger adapts faster but overshoots more, as the density follows the penalty
            only through the weights, and the gate only at the estimator's refits.
        gain: Positive finite number: the step's strength is the base times
            (active share / target)^gain (within e^±gain), which reacts to the layer's activity
            at once. A larger gain reaches the target sooner, with a stronger penalty early.
    """

    def __init__(self, target, initial_strength=1e-4, rate=0.03, gain=2.0):
        self.target = _checked_target(target)
        self.initial_strength = _checked_positive("initial_strength", initial_strength)
        self.rate = _checked_positive("rate", rate)
        self.gain = _checked_positive("gain", gain)

    def get_config(self):
        return {"target": self.target, "initial_strength": self.initial_strength, "rate": self.rate, "gain": self.gain}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"DensityTarget({', '.join(f'{key}={value!r}' for key, value in self.get_config().items())})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(tuple(self.get_config().values()))

    def build(self, layer):
        """Create the layer's `density_penalty` (the strength), saved with the model."""
        # Assigned inside the (possibly replicated) train step, identically on every replica.
        layer.density_penalty = layer.add_weight(
            name="density_penalty", shape=(), initializer=keras.initializers.Constant(self.initial_strength),
            dtype="float32", trainable=False, aggregation="only_first_replica", autocast=False,
        )

    def penalty(self, layer, counts, activity):
        """This step's loss, `strength · activity`; updates the base strength from the gate's counts.

        `counts`: (tp, fp, fn, tn) of the step's sampled rows on this replica, float64; `activity`:
        the L1 norm of the layer's activity per example, float32.
        """
        base = self.usable_strength(layer.density_penalty)
        # (computed, active, all) pairs of the sampled rows, summed over replicas and workers.
        totals = tf.stack([counts[0] + counts[1], counts[0] + counts[2], tf.reduce_sum(counts)])
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            totals = context.all_reduce(tf.distribute.ReduceOp.SUM, totals)
        predicted_error, active_error = self.errors(totals)
        strength = _clipped(base * tf.exp(self.gain * active_error))
        layer.density_penalty.assign(_clipped(base * tf.exp(self.rate * predicted_error)))
        layer.density_penalty_metric.update_state(strength)
        return strength * activity

    def errors(self, totals):
        """log(density / target) of the computed and of the active units, within ±1 (so that no step
        changes the strength by more than e^rate, nor boosts it by more than e^gain); 0 where nothing was
        measured (an empty batch)."""
        densities = tf.cast(totals[:2] / tf.maximum(totals[2], 1.0), tf.float32)
        errors = tf.clip_by_value(tf.math.log(tf.maximum(densities, 1e-6) / self.target), -1.0, 1.0)
        return tf.unstack(tf.where(totals[2] > 0, errors, 0.0))

    def usable_strength(self, strength):
        """The strength, or the initial one where it is not a positive finite number (assigned or loaded so)."""
        strength = tf.convert_to_tensor(strength)
        return tf.where(tf.math.is_finite(strength) & (strength > 0), strength, self.initial_strength)


def get(identifier):
    """A DensityTarget from None (no target), a number (the target, other settings default), a
    DensityTarget or its serialised config."""
    if identifier is None or isinstance(identifier, DensityTarget):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    return DensityTarget(identifier)


def _clipped(strength):
    return tf.clip_by_value(strength, MIN_STRENGTH, MAX_STRENGTH)


def _checked_target(target):
    if (isinstance(target, (bool, np.bool_)) or not isinstance(target, numbers.Real)
            or not 0 < float(target) <= 1):  # NaN fails the comparison
        raise ValueError(
            f"target_density must be a number in (0, 1] (the share of units to compute), got target_density={target!r}"
        )
    return float(target)


def _checked_positive(name, value):
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
            or not (math.isfinite(float(value)) and value > 0)):
        raise ValueError(f"{name} must be a positive finite number, got {name}={value!r}")
    return float(value)
