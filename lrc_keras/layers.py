"""LowRankGatedDense: a ReLU dense layer that computes only the units a low-rank estimator predicts positive."""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from lrc_keras import density_target
from lrc_keras import dispatch
from lrc_keras import estimators
from lrc_keras import gating
from lrc_keras import saved_layouts
from lrc_keras import twins
from lrc_keras import upkeep
from lrc_keras.inputs import check_positive_int
from lrc_keras.metrics import GateStatistics
from lrc_keras.metrics import LatestValue


@keras.saving.register_keras_serializable(package="lrc_keras")
class LowRankGatedDense(estimators.EstimatorMethods, keras.layers.Layer):
    """ReLU dense layer with low-rank conditional computation (Davis & Arel, 2013).

    It computes `y = relu(x·W + b)`, but only for the units whose rank-r estimate
    `ẑ = (x·U)·V + b` exceeds `-margin`; every other unit outputs exactly 0 without its dot
    product being computed. Per row, the cost is `r·(d + n) + ρ·d·n` multiply-adds instead of
    `d·n`, ρ the fraction of units predicted positive.

    Training (`training=True`) applies the estimator's mask too, so the network learns to live
    with the estimator's mistakes; the task's gradients reach W and b only through computed
    units, and the activity penalty also reaches the active units the gate skipped
    (`regularize_skipped_units`). A few sampled rows of each batch are computed densely for the
    gate metrics, that penalty and a trained estimator's loss. Inference and training each run
    one compiled op, LrcGatedLayer (`lrc_keras.dispatch` chooses the path; BENCHMARKS.md gives
    their cost against Dense). NaN estimates count as "compute": NaN inputs give NaN outputs.

    Stored layout: `kernel` is `(units, input_dim)` (W transposed, each unit's weights
    contiguous, as the compiled ops read it); `estimator_factors` holds U `(input_dim, rank)`
    then V `(rank, units)` in one variable, so that a refit replaces both at once. The
    estimator's variables live in the nested layer `estimator_state`, which `set_rank` remakes;
    its methods (`refit`, `set_rank`, `current_factors`, ...) come from
    `lrc_keras.estimators.EstimatorMethods`.

    Args:
        units: Positive integer, dimensionality of the output space.
        rank: Positive integer, rank r of the sign estimator; at most `min(input_dim, units)`
            (checked at build).
        estimator: The rule that fits U and V, an object of `lrc_keras.estimators` with its own
            settings, or its name for the defaults (`lrc_keras.estimators.ESTIMATORS`):
            `"input_svd"` / `InputSVDEstimator(refit_every="auto", ...)` (default): the U·V that
            best reproduces x·W on the layer's recent inputs, refitted during training.
            `"svd"` / `SVDEstimator(refit_every=200)`: the paper's truncated SVD of W, refitted
            during training. `"joint"` / `JointEstimator(loss_weight=1.0, positive_weight=4.0)`:
            trained with the network through an auxiliary loss.
        margin: Finite float, a unit is computed when `ẑ > -margin`. 0 is the paper's pure sign
            test; a positive margin buys recall with compute. Held in a variable, so assigning
            `layer.margin` takes effect in functions Keras has already compiled.
        use_bias: Boolean, whether the layer uses a bias vector (shared by z and its estimate).
        kernel_initializer: Initializer for the kernel, applied with Dense's
            `(input_dim, units)` fan-in/fan-out and stored transposed.
        bias_initializer: Initializer for the bias vector.
        kernel_regularizer: Regularizer for the kernel (it sees the stored layout).
        bias_regularizer: Regularizer for the bias vector.
        activity_regularizer: Regularizer for the output. The paper makes activations sparse,
            and so the layer cheap, with `keras.regularizers.L1(...)` here.
        kernel_constraint: Constraint for the kernel, applied in Dense's `(input_dim, units)`
            layout, so that Dense's constraints (e.g. `MaxNorm(axis=0)`, per unit) mean the same.
        bias_constraint: Constraint for the bias vector.
        regularize_skipped_units: Boolean. In training, also charge the activity regularizer
            on the active units the gate skipped (relu(z) where the mask is off), so that it
            sees the true activity relu(x·W + b), as on Dense; otherwise a missed unit escapes
            the penalty and stays active. False is the paper's recipe.
        inference_path: `"auto"` (the measured timing model chooses per batch), `"gated"`
            (only the selected dot products) or `"gemm"` (TF's GEMM, then the mask); see
            `lrc_keras.dispatch`, which also says what runs on a GPU.
        training_path: `"dense"` (z by a GEMM, then the mask), `"gated"` (forward and backward
            over the selected units only) or `"auto"` (gated while the density last observed is
            at most `lrc_keras.dispatch.GATED_TRAINING_MAX_DENSITY`, decided at every step).
        target_density: None, a number in (0, 1] or a `lrc_keras.density_target.DensityTarget`:
            the predicted density to train to. An L1 activity penalty whose strength (the
            non-trainable `density_penalty`) adapts at every training step until the gate
            computes that share of the units; it adds to `activity_regularizer`'s penalty.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`. float32 runs the
            compiled ops; other compute dtypes (bfloat16, float16, the mixed policies) work
            through plain TensorFlow, with a warning at the first call. The estimator is fitted
            in float32 whatever the dtype.

    Input shape:
        N-D float tensor `(batch_size, ..., input_dim)`; the layer acts on the last axis.

    Output shape:
        `(batch_size, ..., units)`.

    Metrics: `fit` logs `{name}_sign_accuracy`, `_recall`, `_precision`,
    `_false_negative_rate`, `_predicted_density` and `_true_density` (they need the dense z:
    measured in training on the first 32 rows of each batch, and in inference on every row,
    only while `layer.audit` is True); with a density target, `{name}_density_penalty` (the
    strength at the end of the epoch).

    Example:

    >>> layer = LowRankGatedDense(1000, rank=20, activity_regularizer=keras.regularizers.L1(1e-5))
    >>> y = layer(np.ones((8, 784), "float32"))
    >>> y.shape
    TensorShape([8, 1000])
    """

    def __init__(
        self,
        units,
        rank,
        estimator="input_svd",
        margin=0.0,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        inference_path="auto",
        regularize_skipped_units=True,
        training_path="auto",
        target_density=None,
        **kwargs,
    ):
        saved_layouts.check_no_moved_settings(kwargs)
        check_positive_int("units", units)
        check_positive_int("rank", rank)
        _check_margin(margin)
        if not isinstance(regularize_skipped_units, (bool, np.bool_)):
            raise ValueError(
                f"regularize_skipped_units must be a boolean, got regularize_skipped_units={regularize_skipped_units!r}"
            )
        if "activation" in kwargs:
            raise ValueError(
                f"LowRankGatedDense is always a ReLU layer (skipping a unit is exact only when its "
                f"output is relu(z)); do not pass activation (got activation={kwargs['activation']!r})"
            )
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.units = int(units)
        self.rank = int(rank)
        self.estimator = estimators.get(estimator)
        self._margin_before_build = float(margin)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.inference_path = inference_path
        self.training_path = training_path
        self.regularize_skipped_units = bool(regularize_skipped_units)
        self.target_density = density_target.get(target_density)
        self.gate_metric = GateStatistics(prefix=f"{self.name}_")
        if self.target_density is not None:
            self.density_penalty_metric = LatestValue(f"{self.name}_density_penalty")
        self.audit = False  # lrc_keras.set_audit: measure the gate in inference too
        self.captured_inputs = None  # a list while lrc_keras.audit.capture_inputs records inputs
        self.supports_jit = False  # custom ops have no XLA kernel
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
            constraint=None if self.kernel_constraint is None else _transposed_constraint(self.kernel_constraint),
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.units,), initializer=self.bias_initializer,
                regularizer=self.bias_regularizer, constraint=self.bias_constraint,
            )
        # Read by compiled functions at every call, so that a margin change reaches them.
        self.gate_margin = self.add_weight(
            name="gate_margin", shape=(), initializer=keras.initializers.Constant(self._margin_before_build),
            dtype="float32", trainable=False, aggregation="only_first_replica", autocast=False,
        )
        # The predicted density last recorded (in training, by measure_gates or calibrate), which
        # the dispatch compares with the crossover. Inference writes no variable.
        self.observed_density = self.add_weight(
            name="observed_density", shape=(), initializer="zeros", dtype="float32",
            trainable=False, aggregation="only_first_replica",
        )
        if self.target_density is not None:
            self.target_density.build(self)
        self._build_estimator()
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})

    def call(self, inputs, training=None):
        if not inputs.dtype.is_floating:
            raise TypeError(f"{self.name}: inputs must be floating point, got dtype {inputs.dtype.name}")
        x = tf.reshape(inputs, [-1, tf.shape(inputs)[-1]]) if inputs.shape.rank != 2 else inputs
        if self.captured_inputs is not None:
            self.captured_inputs.append(x)
        if training:
            self.estimator.observe(self, x)
            y, skipped, counts, active_fraction = dispatch.train(self, x, upkeep.GATE_SAMPLE_ROWS)
            upkeep.record_training_step(self, x, y, skipped, counts, active_fraction, tf.shape(inputs)[0])
        elif self.audit:
            y = upkeep.audited_inference(self, x)
        else:
            y, _ = dispatch.infer(self, x)  # pure: writes no variable
        if inputs.shape.rank != 2:
            y = tf.reshape(y, tf.concat([tf.shape(inputs)[:-1], [self.units]], axis=0))
        return y

    @property
    def inference_path(self):
        """"auto" (the measured timing model chooses), "gated" (the gated op) or "gemm" (GEMM, then mask)."""
        return self._inference_path

    @inference_path.setter
    def inference_path(self, path):
        self._inference_path = dispatch.checked_path("inference_path", path, self.name)

    @property
    def training_path(self):
        """"auto", "dense" (GEMM, then mask) or "gated" (only the selected units, forward and backward)."""
        return self._training_path

    @training_path.setter
    def training_path(self, path):
        self._training_path = dispatch.checked_path("training_path", path, self.name)

    @property
    def margin(self):
        """A unit is computed when ẑ > -margin; assigning it updates compiled functions too. Its
        one home is the `gate_margin` variable once the layer is built (loaded with the weights);
        before, the constructor's value, which build gives the variable."""
        if not self.built:
            return self._margin_before_build
        # The shortest decimal that is this float32: margin=0.1 reads back as 0.1.
        return float(str(np.float32(self.gate_margin.numpy())))

    @margin.setter
    def margin(self, margin):
        _check_margin(margin, self.name)
        if self.built:
            self.gate_margin.assign(float(margin))
        else:
            self._margin_before_build = float(margin)

    def get_config(self):
        base_config = super().get_config()
        config = {
            "units": self.units,
            "rank": self.rank,
            "estimator": keras.saving.serialize_keras_object(self.estimator),
            "margin": self.margin,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "inference_path": self.inference_path,
            "regularize_skipped_units": self.regularize_skipped_units,
            "training_path": self.training_path,
            "target_density": keras.saving.serialize_keras_object(self.target_density),
        }
        return {**base_config, **config}

    @classmethod
    def from_config(cls, config):
        """Also reads the configs of earlier versions (`lrc_keras.saved_layouts`)."""
        return cls(**saved_layouts.current_config(config))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    @classmethod
    def from_dense(cls, dense_layer, rank, sample_inputs=None, **kwargs):
        """A gated copy of a built `keras.layers.Dense` with ReLU activation, its estimator fitted
        (`lrc_keras.twins.gated_from_dense`, which says what carries over)."""
        return twins.gated_from_dense(cls, dense_layer, rank, sample_inputs, **kwargs)

    def to_dense(self):
        """The `keras.layers.Dense(units, activation="relu")` twin with this layer's weights
        (`lrc_keras.twins.dense_twin`)."""
        return twins.dense_twin(self)

    def gate(self, x):
        """`(ẑ, mask)` for 2-D inputs x: the estimate (x·U)·V + b and the units the gate computes
        (`lrc_keras.gating.gate_mask` at the layer's margin), what every reader of the gate uses."""
        z_hat = estimators.estimate(x, *self.current_factors(), self.bias)
        return z_hat, gating.gate_mask(z_hat, tf.cast(self.gate_margin, z_hat.dtype))

    def load_own_variables(self, store):
        """Loads this version's own variables (`estimator_state` loads the estimator's), or all of
        them from an earlier version's layout (`lrc_keras.saved_layouts`)."""
        if saved_layouts.is_earlier_layout(self, store):
            saved_layouts.load_variables(self, store)
        else:
            super().load_own_variables(store)


def _check_margin(margin, name=None):
    """A finite Python or numpy number (a non-finite margin would make the model unloadable)."""
    if (isinstance(margin, (bool, np.bool_)) or not isinstance(margin, numbers.Real)
            or not math.isfinite(float(margin))):
        prefix = f"{name}: " if name else ""
        raise ValueError(f"{prefix}margin must be a finite number, got margin={margin!r}")


def _transposed_constraint(constraint):
    """Apply a constraint written for Dense's (input_dim, units) kernel to the stored (units, input_dim) one."""

    def constrain(kernel):
        return tf.transpose(constraint(tf.transpose(kernel)))

    return constrain


def _transposed(initializer):
    """Initialise a (units, input_dim) kernel with Dense's (input_dim, units) fan-in and fan-out."""

    def initialize(shape, dtype=None):
        return tf.transpose(initializer((shape[1], shape[0]), dtype=dtype))

    return initialize
