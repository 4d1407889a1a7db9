"""LowRankGatedDense: a ReLU dense layer that computes only the units a low-rank estimator predicts positive."""

import math
import numbers

import keras
import tensorflow as tf

from lrc_keras import dispatch
from lrc_keras import estimators
from lrc_keras import ops
from lrc_keras.estimators import ESTIMATORS
from lrc_keras.metrics import GateStatistics

INFERENCE_PATHS = ("auto", "gated", "dense")


@keras.saving.register_keras_serializable(package="lrc_keras")
class LowRankGatedDense(keras.layers.Layer):
    """ReLU dense layer with low-rank conditional computation (Davis & Arel, 2013).

    It computes `y = relu(x·W + b)`, but only for the units whose rank-r
    estimate `ẑ = (x·U)·V + b` exceeds `-margin`; every other unit outputs
    exactly 0 without its dot product being computed. Per row, the cost is
    `r·(d + n) + ρ·d·n` multiply-adds instead of `d·n`, where ρ is the
    fraction of units predicted positive.

    Training (`training=True`) computes z densely (a GEMM is cheapest while
    gradients are needed), applies the estimator's mask and returns
    `relu(z)·mask`: the network learns to live with the estimator's mistakes,
    and gradients reach W and b only through computed units. Inference runs
    the compiled op of `lrc_keras.ops` (pure TensorFlow when it is not built),
    which never computes a skipped unit. A NaN in the input makes the affected
    estimates NaN; NaN estimates count as "compute", so NaN inputs give NaN
    outputs rather than being hidden as zeros.

    Stored layout (the compiled ops read it as is):
    `kernel` is `(units, input_dim)` (W transposed, so each unit's weights are
    contiguous), `estimator_u` is `(input_dim, rank)` and `estimator_v` is
    `(rank, units)`, so that `ẑ = (x·estimator_u)·estimator_v + bias`.
    `get_weights()` returns `[kernel, bias, estimator_u, estimator_v,
    training_steps, observed_density]` in that layout (no bias when
    `use_bias=False`).

    Inference path: `layer.inference_path` is `"auto"` (default), `"gated"`
    or `"dense"`. `"auto"` runs the gated op unless TF's dense GEMM followed by
    the mask is faster for this shape, batch size and the density last
    observed (`observed_density`), as measured once per shape by
    `lrc_keras.dispatch`. Both paths give the same numbers up to float
    rounding (the same mask; z summed in a different order).

    Args:
        units: Positive integer, dimensionality of the output space.
        rank: Positive integer, rank r of the sign estimator; at most
            `min(input_dim, units)` (checked at build).
        estimator: `"svd"`: U and V are not trained; they are the truncated
            SVD of the kernel, set at build and refitted every `refit_every`
            training steps inside the compiled train step. `"joint"`: U and V
            are initialised by SVD, then trained with the network through an
            auxiliary recall-weighted cross-entropy loss (see
            `estimator_loss_weight`).
        refit_every: Positive integer or None, training steps between SVD
            refits in `"svd"` mode (None: never refit automatically). The
            default 200 keeps the refit under ~10% of the training time of the
            paper's layers (an exact SVD of a 1000×1000 kernel costs ~0.2 s on
            two cores, ~15 training steps of a 784-1000-1000-10 network at
            batch 128), while the kernel moves little in 200 steps at usual
            learning rates. Refit more often for high learning rates, less
            often for very large layers (3072×4000 costs ~7 s).
        margin: Float, a unit is computed when `ẑ > -margin`. 0 is the paper's
            pure sign test; a positive margin buys recall with compute.
        use_bias: Boolean, whether the layer uses a bias vector (shared by z
            and its estimate).
        kernel_initializer: Initializer for the kernel, applied with Dense's
            `(input_dim, units)` fan-in/fan-out and stored transposed.
        bias_initializer: Initializer for the bias vector.
        kernel_regularizer: Regularizer for the kernel (it sees the stored
            `(units, input_dim)` array).
        bias_regularizer: Regularizer for the bias vector.
        activity_regularizer: Regularizer for the output. The paper makes
            activations sparse, and so the layer cheap, with
            `keras.regularizers.L1(...)` here.
        estimator_loss_weight: Non-negative float, weight of the joint
            estimator's auxiliary loss (`"joint"` only).
        estimator_positive_weight: Float ≥ 1, how much more a missed active
            unit costs than a wasted computation in the auxiliary loss.
        activation: Only `"relu"` (or `keras.activations.relu`) is accepted:
            the gating is exact only for ReLU.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Input shape:
        N-D float tensor `(batch_size, ..., input_dim)`; the layer acts on the
        last axis, as Dense does.

    Output shape:
        `(batch_size, ..., units)`.

    Metrics: the layer owns a `GateStatistics` metric whose results appear in
    `fit` logs (and in TensorBoard) as `{name}_sign_accuracy`,
    `{name}_recall`, `{name}_precision`, `{name}_false_negative_rate`,
    `{name}_predicted_density` and `{name}_true_density`. They need the dense
    z, so they are measured in training, and in inference only while
    `layer.audit` is True (see `lrc_keras.set_audit`).

    Example:

    >>> layer = LowRankGatedDense(
    ...     1000, rank=20, activity_regularizer=keras.regularizers.L1(1e-5))
    >>> y = layer(np.ones((8, 784), "float32"))
    >>> y.shape
    TensorShape([8, 1000])
    """

    def __init__(
        self,
        units,
        rank,
        estimator="svd",
        refit_every=200,
        margin=0.0,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        estimator_loss_weight=1.0,
        estimator_positive_weight=4.0,
        activation="relu",
        **kwargs,
    ):
        _check_positive_int("units", units)
        _check_positive_int("rank", rank)
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got estimator={estimator!r}")
        if refit_every is not None:
            _check_positive_int("refit_every", refit_every)
        if not (isinstance(margin, (int, float)) and math.isfinite(margin)):
            raise ValueError(f"margin must be a finite number, got margin={margin!r}")
        if not estimator_loss_weight >= 0:
            raise ValueError(
                f"estimator_loss_weight must be >= 0, got estimator_loss_weight={estimator_loss_weight!r}"
            )
        if not estimator_positive_weight >= 1:
            raise ValueError(
                "estimator_positive_weight must be >= 1, got "
                f"estimator_positive_weight={estimator_positive_weight!r}"
            )
        if keras.activations.get(activation) is not keras.activations.relu:
            raise ValueError(
                f"LowRankGatedDense is a ReLU layer: skipping a unit is exact only when its output is "
                f"relu(z); got activation={activation!r}"
            )
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.units = int(units)
        self.rank = int(rank)
        self.estimator = estimator
        self.refit_every = refit_every
        self.margin = float(margin)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.estimator_loss_weight = float(estimator_loss_weight)
        self.estimator_positive_weight = float(estimator_positive_weight)
        self.gate_statistics = GateStatistics(prefix=f"{self.name}_")
        self.audit = False
        self.inference_path = "auto"
        self.captured_inputs = None  # a list while lrc_keras.audit.measure_gates records inputs
        # Custom ops have no XLA kernel.
        self.supports_jit = False
        self.input_spec = keras.layers.InputSpec(min_ndim=2)

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                f"{self.name}: the last dimension of the input must be known at build; "
                f"got input_shape={tuple(input_shape)}"
            )
        self._check_rank_fits(self.rank, input_dim)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.units, input_dim),
            initializer=_transposed(self.kernel_initializer),
            regularizer=self.kernel_regularizer,
        )
        self.bias = (
            self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )
            if self.use_bias
            else None
        )
        self._add_estimator_weights(input_dim)
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})
        self.refit()

    def call(self, inputs, training=None):
        if not inputs.dtype.is_floating:
            raise TypeError(f"{self.name}: inputs must be floating point, got dtype {inputs.dtype.name}")
        x = tf.reshape(inputs, [-1, tf.shape(inputs)[-1]]) if inputs.shape.rank != 2 else inputs
        if self.captured_inputs is not None:
            self.captured_inputs.append(x)
        if training:
            if self.estimator == "svd" and self.refit_every is not None:
                self._refit_on_schedule()
            y = self._dense_then_gate(x, training=True)
        elif self.audit:
            y = self._dense_then_gate(x, training=False)
        else:
            y = self._fastest_inference(x)
        if inputs.shape.rank != 2:
            y = tf.reshape(y, tf.concat([tf.shape(inputs)[:-1], [self.units]], axis=0))
        return y

    @property
    def inference_path(self):
        """"auto" (the cost model chooses), "gated" (the gated op) or "dense" (GEMM, then mask)."""
        return self._inference_path

    @inference_path.setter
    def inference_path(self, path):
        if path not in INFERENCE_PATHS:
            raise ValueError(f"{self.name}: inference_path must be one of {INFERENCE_PATHS}, got {path!r}")
        self._inference_path = path

    def get_config(self):
        base_config = super().get_config()
        config = {
            "units": self.units,
            "rank": self.rank,
            "estimator": self.estimator,
            "refit_every": self.refit_every,
            "margin": self.margin,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "estimator_loss_weight": self.estimator_loss_weight,
            "estimator_positive_weight": self.estimator_positive_weight,
        }
        return {**base_config, **config}

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    @classmethod
    def from_dense(cls, dense_layer, rank, **kwargs):
        """A gated copy of a built `keras.layers.Dense` with ReLU activation.

        The kernel and bias are copied (the kernel transposed into the stored
        layout) and the estimator is the truncated SVD of rank `rank`.
        Regularizers and the name carry over unless given in `kwargs`.
        """
        if not isinstance(dense_layer, keras.layers.Dense):
            raise ValueError(
                f"from_dense needs a keras.layers.Dense, got {type(dense_layer).__name__} "
                f"{getattr(dense_layer, 'name', '')!r}"
            )
        if dense_layer.activation is not keras.activations.relu:
            raise ValueError(
                f"from_dense needs a Dense layer with ReLU activation; {dense_layer.name!r} has "
                f"activation {getattr(dense_layer.activation, '__name__', dense_layer.activation)!r}"
            )
        if not dense_layer.built:
            raise ValueError(
                f"from_dense needs a built Dense layer (its kernel holds the weights to copy); "
                f"{dense_layer.name!r} is not built yet"
            )
        settings = {
            "name": dense_layer.name,
            "use_bias": dense_layer.use_bias,
            "kernel_regularizer": dense_layer.kernel_regularizer,
            "bias_regularizer": dense_layer.bias_regularizer,
            "activity_regularizer": dense_layer.activity_regularizer,
            "dtype": dense_layer.dtype_policy,
            **kwargs,
        }
        layer = cls(dense_layer.units, rank, **settings)
        kernel = dense_layer.kernel
        layer.build((None, kernel.shape[0]))
        layer.kernel.assign(tf.transpose(kernel))
        if dense_layer.use_bias:
            layer.bias.assign(dense_layer.bias)
        layer.refit()
        return layer

    def to_dense(self):
        """The `keras.layers.Dense(units, activation="relu")` twin with this layer's weights.

        It computes every unit, so its outputs equal this layer's wherever the estimator
        selects every active unit; regularizers, the name and the dtype policy carry over.
        """
        dense = keras.layers.Dense(
            self.units,
            activation="relu",
            use_bias=self.use_bias,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            activity_regularizer=self.activity_regularizer,
            name=self.name,
            dtype=self.dtype_policy,
        )
        dense.build((None, self.kernel.shape[1]))
        dense.kernel.assign(tf.transpose(self.kernel))
        if self.use_bias:
            dense.bias.assign(self.bias)
        return dense

    def set_rank(self, rank):
        """Change the estimator's rank of a built layer, refitting U, V by truncated SVD.

        The estimator variables are re-created (same names and order, so saving and
        loading keep working); compile the model again before training it further.
        """
        _check_positive_int("rank", rank)
        input_dim = self.kernel.shape[1]
        self._check_rank_fits(rank, input_dim)
        steps, density = self.training_steps.numpy(), self.observed_density.numpy()
        for variable in (self.estimator_u, self.estimator_v, self.training_steps, self.observed_density):
            self._untrack_variable(variable)
        self.rank = int(rank)
        self._tracker.unlock()
        self._add_estimator_weights(input_dim)
        self._tracker.lock()
        self.training_steps.assign(steps)
        self.observed_density.assign(density)
        self.refit()

    def refit(self):
        """Set U, V to the truncated SVD of the current kernel (the best rank-r U·V ≈ W)."""
        estimator_u, estimator_v, _ = estimators.truncated_svd_factors(self.kernel, self.rank)
        self.estimator_u.assign(estimator_u)
        self.estimator_v.assign(estimator_v)

    def _check_rank_fits(self, rank, input_dim):
        if rank > min(input_dim, self.units):
            raise ValueError(
                f"{self.name}: rank={rank} exceeds min(input_dim, units) = "
                f"min({input_dim}, {self.units}) = {min(input_dim, self.units)}"
            )

    def _add_estimator_weights(self, input_dim):
        # Estimator variables are assigned inside the (possibly replicated) train step;
        # every replica computes the same SVD, so the first replica's value is kept.
        refitted = "none" if self.estimator == "joint" else "only_first_replica"
        self.estimator_u = self.add_weight(
            name="estimator_u",
            shape=(input_dim, self.rank),
            initializer="zeros",
            trainable=self.estimator == "joint",
            aggregation=refitted,
        )
        self.estimator_v = self.add_weight(
            name="estimator_v",
            shape=(self.rank, self.units),
            initializer="zeros",
            trainable=self.estimator == "joint",
            aggregation=refitted,
        )
        self.training_steps = self.add_weight(
            name="training_steps",
            shape=(),
            initializer="zeros",
            dtype="int64",
            trainable=False,
            aggregation="only_first_replica",
        )
        self.observed_density = self.add_weight(
            name="observed_density",
            shape=(),
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )

    def _refit_on_schedule(self):
        steps = self.training_steps.assign_add(1)
        # The assignments stay outside tf.cond: under MirroredStrategy they synchronise the
        # replicas (merge_call), which control flow cannot contain.
        estimator_u, estimator_v = tf.cond(
            tf.equal(steps % self.refit_every, 0),
            lambda: estimators.truncated_svd_factors(self.kernel, self.rank)[:2],
            lambda: (tf.identity(self.estimator_u), tf.identity(self.estimator_v)),
        )
        self.estimator_u.assign(estimator_u)
        self.estimator_v.assign(estimator_v)

    def _fastest_inference(self, x):
        """The gated op, or TF's dense GEMM then the mask where the cost model says it is faster.

        The choice compares the density observed at the previous call (or in training)
        with the crossover density measured for this shape and batch (`lrc_keras.dispatch`).
        """
        args = (x, self.kernel, self.bias, self.estimator_u, self.estimator_v, self.margin)
        path = self.inference_path
        if path == "auto" and (not ops.is_compiled() or x.dtype != tf.float32):
            path = "gated"  # only the pure path exists: nothing to choose
        if path == "auto":
            crossovers = dispatch.crossover_densities(self.kernel.shape[1], self.units, self.rank)
            batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
            crossover = dispatch.crossover_for_batch(crossovers, batch)
            if isinstance(crossover, float) and not 0.0 < crossover < 1.0:
                path = "gated" if crossover >= 1.0 else "dense"
        if path == "gated":
            y, density = ops.gated_dense_with_density(*args)
        elif path == "dense":
            y, density = ops.gemm_then_mask_with_density(*args)
        else:
            y, density = tf.cond(
                self.observed_density <= crossover,
                lambda: ops.gated_dense_with_density(*args),
                lambda: ops.gemm_then_mask_with_density(*args),
            )
        # Outside tf.cond: under a distribution strategy the assignment synchronises replicas.
        self.observed_density.assign(density)
        return y

    def _dense_then_gate(self, x, training):
        """Dense z, the estimator's mask and the gate metrics; the joint loss when training."""
        bias = None if self.bias is None else tf.stop_gradient(self.bias)
        # The estimate sees no gradient from x or b: the auxiliary loss trains only U, V.
        z_hat = estimators.estimate(tf.stop_gradient(x), self.estimator_u, self.estimator_v, bias)
        mask = tf.stop_gradient(ops.gate_mask(z_hat, self.margin))
        z = ops.dense_preactivation(x, self.kernel, self.bias)
        self.gate_statistics.update_state(mask, tf.stop_gradient(z) > 0)
        self.observed_density.assign(tf.reduce_mean(tf.cast(mask, tf.float32)))
        if training and self.estimator == "joint" and self.estimator_loss_weight > 0:
            self.add_loss(
                self.estimator_loss_weight
                * estimators.estimator_loss(z_hat, z, self.estimator_positive_weight)
            )
        return ops.masked_relu(z, mask)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")


def _transposed(initializer):
    """Initialise a (units, input_dim) kernel with Dense's (input_dim, units) fan-in and fan-out."""

    def initialize(shape, dtype=None):
        return tf.transpose(initializer((shape[1], shape[0]), dtype=dtype))

    return initialize
