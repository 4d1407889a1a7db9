"""The estimate stage: the rank-r sign estimator ẑ = (x·U)·V + b, and the rules that fit U, V.

Stored layout (the kernel's is shared with the compiled ops, see `custom_ops/gated_dense.h`):
    kernel             (units, input_dim)          row j is unit j's weights, contiguous
    estimator_factors  (rank·input_dim + rank·units,)  U (input_dim, rank) then V (rank, units),
                                                   each row-major, V as the paper writes it
so W = kernel^T and ẑ = (x·U)·V + b. U and V share one variable so that a refit replaces both in
one assignment: a call running beside it reads the old pair or the new one, never old U with
new V (`pack_factors`, `unpack_factors`; the layer's `current_factors()` reads them).

An estimator is a small object holding its own settings (`get_config`), passed to the layer as
`LowRankGatedDense(estimator=InputSVDEstimator(refit_every=50))` or by name
(`estimator="input_svd"`, its defaults). Its variables live in a Keras layer nested in the gated
layer, `layer.estimator_state` (an `EstimatorState`): the factors, then the state the rule keeps
(`build_state`). The estimator says what to do with each training batch (`observe`), how to
compute new factors (`factors`) and which auxiliary loss, if any, trains U, V (`loss`). Every
method receives the layer, so one estimator object may serve several layers. A new estimator is
one class decorated with `@register`; the layer needs no change.

A fit is the estimator's rule, not a function of the weights to differentiate: the fitting
functions read the kernel and rows through tf.stop_gradient, so that a refit traced inside the
train step stays out of gradient tapes (under nested tapes, for second-order gradients,
TensorFlow would otherwise build the SVD's gradient, which it cannot for run-time shapes).
"""

import math
import numbers
import warnings

import keras
import numpy as np
import tensorflow as tf

from lrc_keras.inputs import check_positive_int
from lrc_keras.inputs import checked_sample_inputs

ESTIMATORS = {}
# Ridge added to the inputs' second moment, relative to its mean eigenvalue trace(C)/d: it keeps
# the fit defined for dead or constant inputs and ties it to W in directions no input spans.
RIDGE = 1e-3
# A refit's thin products, QR factorisations and small SVD run several times slower per
# multiply-add than a layer's training GEMMs; the "auto" refit schedule weighs refits by this
# factor. Measured on 2 cores for the in-training refit (one subspace iteration, 1024 rows): 4.5x
# for 3072→4000 at rank 50, 6x for 4000→2000 at 40, 8x for 2000→1000 at 30, 9–12x for 1000→1000
# and 784→1000 at rank 20, where a refit's few ms of per-op cost outweigh its multiply-adds: there
# refits take 11–15% of the layer's GEMM time, not `refit_budget`'s 5% (BENCHMARKS.md). Kept at
# 4: the refit frequency the documented accuracies were measured with.
REFIT_SLOWDOWN = 4.0


def register(cls):
    """Make `cls` available by `cls.name` and serialisable inside a layer's config."""
    ESTIMATORS[cls.name] = keras.saving.register_keras_serializable(package="lrc_keras")(cls)
    return cls


def get(identifier):
    """An estimator object from a name, an estimator object or a serialised config."""
    if isinstance(identifier, Estimator):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if isinstance(identifier, str) and identifier in ESTIMATORS:
        return ESTIMATORS[identifier]()
    raise ValueError(
        f"estimator must be one of {tuple(ESTIMATORS)} or an lrc_keras.estimators.Estimator, "
        f"got estimator={identifier!r}"
    )


def low_rank_product(x, estimator_u, estimator_v):
    """(x·U)·V for 2-D x: two thin GEMMs, r·(d + n) multiply-adds per row.

    U must be (input_dim, rank) and V (rank, units); shapes known when traced are checked here,
    so that a mismatch names the factors rather than surfacing as MatMul's error.
    """
    input_dim, (u_rows, u_rank), (v_rank, _) = x.shape[-1], estimator_u.shape, estimator_v.shape
    if (input_dim is not None and u_rows is not None and input_dim != u_rows) or (
            u_rank is not None and v_rank is not None and u_rank != v_rank):
        raise ValueError(
            f"estimator_u {tuple(estimator_u.shape)} and estimator_v {tuple(estimator_v.shape)} do not make an "
            f"estimate for inputs of width {input_dim}: they must be (input_dim, rank) and (rank, units) (if "
            f"set_rank ran while this call was being traced, call again)"
        )
    return tf.matmul(tf.matmul(x, estimator_u), estimator_v)


def pack_factors(estimator_u, estimator_v):
    """U (input_dim, rank) and V (rank, units) as the one vector `estimator_factors` stores."""
    return tf.concat([tf.reshape(estimator_u, [-1]), tf.reshape(estimator_v, [-1])], axis=0)


def unpack_factors(packed, input_dim, rank):
    """(U, V) from one read of `estimator_factors`: the inverse of `pack_factors`."""
    split = input_dim * rank
    return tf.reshape(packed[:split], [input_dim, rank]), tf.reshape(packed[split:], [rank, -1])


def estimate(x, estimator_u, estimator_v, bias):
    """ẑ = (x·U)·V + b for 2-D x."""
    z_hat = low_rank_product(x, estimator_u, estimator_v)
    return z_hat if bias is None else z_hat + bias


def balanced_factors(w, basis):
    """U = W·P·D⁻¹, V = D·Pᵀ for an orthonormal (n, r) basis P, D the root of ‖W·pᵢ‖.

    U·V = W·P·Pᵀ whatever D; this D gives each column of U and row of V the same norm, which
    keeps the joint estimator's gradients balanced.
    """
    projected = tf.matmul(w, basis)
    root = tf.sqrt(tf.maximum(tf.norm(projected, axis=0), 1e-30))
    return projected / root, tf.transpose(basis * root)


def truncated_svd_factors(kernel, rank):
    """Best rank-`rank` factors of W = kernel^T (the exact truncated SVD), float32, stored layout.

    Eckart-Young: the best rank-r approximation of W in Frobenius and spectral norm.
    """
    kernel = tf.cast(tf.stop_gradient(kernel), tf.float32)
    # kernel = left·diag(s)·rightᵀ, so the right singular vectors of W = kernelᵀ are `left`.
    _, left, _ = tf.linalg.svd(kernel, full_matrices=False)
    return balanced_factors(tf.transpose(kernel), left[:, :rank])


def reduced_rank_factors(kernel, rows, rank, seed, warm_start=None, power_iterations=3, oversampling=10,
                         ridge=RIDGE):
    """Rank-`rank` U, V minimising ‖X·(W − U·V)‖² + λ‖W − U·V‖² over the rows X.

    Reduced-rank regression: the minimiser is W·P·Pᵀ, P the top-r right singular vectors of
    A = [X·W; √λ·W], λ = ridge·‖X‖²_F/d (`ridge` relative to the mean eigenvalue of XᵀX): the
    whitened SVD of W under the second moment XᵀX + λI, without forming it. P comes from
    `top_right_singular_vectors`, through products with W, Wᵀ, X and Xᵀ only: no d×d matrix, no
    Cholesky, no triangular solve. X and W are scaled to a largest magnitude of 1 first, which
    leaves P unchanged and keeps every product finite for any finite input.
    """
    w = tf.transpose(tf.cast(tf.stop_gradient(kernel), tf.float32))  # (d, n)
    x = tf.cast(tf.stop_gradient(rows), tf.float32)
    x = x / tf.maximum(tf.reduce_max(tf.abs(x)), 1e-30)
    w_scaled = w / tf.maximum(tf.reduce_max(tf.abs(w)), 1e-30)
    m, d = tf.shape(x)[0], tf.shape(w)[0]
    root_ridge = tf.sqrt(ridge * tf.reduce_sum(tf.square(x)) / tf.cast(d, tf.float32) + 1e-30)

    def times_a(q):  # A·q = [X·(W·q); √λ·W·q]
        wq = tf.matmul(w_scaled, q)
        return tf.concat([tf.matmul(x, wq), root_ridge * wq], axis=0)

    def times_a_transposed(p):  # Aᵀ·p = Wᵀ·(Xᵀ·p₁ + √λ·p₂)
        return tf.matmul(w_scaled, tf.matmul(x, p[:m], transpose_a=True) + root_ridge * p[m:], transpose_a=True)

    right = top_right_singular_vectors(
        times_a, times_a_transposed, w, rank, seed, warm_start, power_iterations, oversampling
    )
    return balanced_factors(w, right)


def buffered_factors(kernel, buffer, filled, rank, seed, warm_start, power_iterations):
    """`reduced_rank_factors` of the first `filled` rows of the buffer, or, while it holds none, the
    truncated SVD of the kernel."""
    return tf.cond(
        filled > 0,
        lambda: reduced_rank_factors(kernel, buffer[:filled], rank, seed, warm_start=warm_start,
                                     power_iterations=power_iterations),
        lambda: truncated_svd_factors(kernel, rank),
    )


def subspace_svd_factors(kernel, rank, seed, warm_start, power_iterations=1, oversampling=10):
    """The truncated SVD factors of W = kernelᵀ by `top_right_singular_vectors` from a warm
    start: what the svd estimator refits with in training, where an exact SVD of a wide kernel
    (seconds) would cost more than the steps between refits."""
    w = tf.transpose(tf.cast(tf.stop_gradient(kernel), tf.float32))
    w_scaled = w / tf.maximum(tf.reduce_max(tf.abs(w)), 1e-30)
    right = top_right_singular_vectors(
        lambda q: tf.matmul(w_scaled, q), lambda p: tf.matmul(w_scaled, p, transpose_a=True),
        w, rank, seed, warm_start, power_iterations, oversampling,
    )
    return balanced_factors(w, right)


def top_right_singular_vectors(times_a, times_a_transposed, w, rank, seed, warm_start, power_iterations,
                               oversampling):
    """(n, rank) top right singular vectors of the operator A (n columns, as W's), by a randomized
    subspace iteration (Halko, Martinsson & Tropp 2011) of `power_iterations` passes.

    `seed` (two ints) fixes the random start so that every replica and worker computes the same
    vectors. `warm_start`, an (n, r) matrix whose columns span the last fit's vectors (the
    current Vᵀ), replaces its first r columns: weights move little between refits, so one pass
    from there tracks the subspace.
    """
    d, n = tf.shape(w)[0], tf.shape(w)[1]
    columns = tf.minimum(rank + oversampling, tf.minimum(d, n))
    start = tf.random.stateless_normal(tf.stack([n, columns]), seed=seed)
    if warm_start is not None:
        start = tf.concat([tf.cast(warm_start, tf.float32), start[:, tf.shape(warm_start)[1]:]], axis=1)
    basis, _ = tf.linalg.qr(times_a(start))
    for _ in range(power_iterations):
        basis, _ = tf.linalg.qr(times_a(tf.linalg.qr(times_a_transposed(basis))[0]))
    # A ≈ Q·(Qᵀ·A): the right singular vectors of the small (columns × n) matrix Qᵀ·A are A's.
    _, _, right = tf.linalg.svd(tf.transpose(times_a_transposed(basis)), full_matrices=False)
    return right[:, :rank]


def refit_multiply_adds(input_dim, units, rank, rows, power_iterations=3, oversampling=10):
    """Multiply-adds of `reduced_rank_factors` on `rows` buffered rows: its products with A and
    Aᵀ, the QR factorisations and the small SVD."""
    columns = min(rank + oversampling, input_dim, units)
    products = 2 * power_iterations + 2
    tall = rows + input_dim
    return (products * (input_dim * units + rows * input_dim) * columns
            + (power_iterations + 1) * 2 * (tall + units) * columns**2 + 4 * units * columns**2)


class Estimator:
    """A rule for the estimator's factors U, V. Subclasses set `name` and override what differs.

    The layer's `EstimatorState` calls `build_state(state, input_dim)` when it makes its
    variables (at the layer's build and at `set_rank`); the layer calls `factors(layer, ...)`
    for new U, V (at build, from `layer.refit()`, and on the refit schedule inside the compiled
    train step), `observe(layer, x)` with each training batch, and adds
    `loss(layer, z_hat, positive)` to its losses when the estimator is `trainable`. Refits
    inside training are computed identically by every replica and every worker (from the same
    kernel and the same gathered rows) and kept from the first replica.
    """

    name = None
    trainable = False  # whether U, V are trained by gradient

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        settings = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({settings})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.get_config().items()))))

    def build_state(self, state, input_dim):
        """Make the variables the rule keeps between steps on `state` (`EstimatorState.add_state`)."""

    def factors(self, layer, sample_inputs=None, rank=None):
        """New float32 (U, V) of rank `rank` (default the layer's) from the current kernel.

        Rules that use inputs fit them to `sample_inputs` when given (2-D, float32). Nothing is
        assigned: `LowRankGatedDense.assign_estimator` stores the result.
        """
        return truncated_svd_factors(layer.kernel, rank or layer.rank)

    def initial_factors(self, layer):
        """(U, V) for the initial kernel, before any input: `factors(layer)` unless overridden.

        It runs as the initializer of `estimator_factors`, which may be deferred until after
        build (Keras' symbolic build of a subclassed model): it may read the kernel but not the
        variables this estimator's `build_state` creates after the factors.
        """
        return self.factors(layer)

    def observe(self, layer, x):
        """Called with every 2-D training batch inside the train step."""

    def loss(self, layer, z_hat, positive):
        """The auxiliary loss that trains U, V (estimators with `trainable` True), from the
        estimate ẑ and the truth z > 0 (`positive`)."""
        raise NotImplementedError(f"{type(self).__name__} is trainable but defines no loss")


class EstimatorState(keras.layers.Layer):
    """The variables of one gated layer's estimator, in a Keras layer nested in it (as tfmot's
    pruning wrapper owns its mask): `estimator_factors`, then the state the rule keeps between
    steps (`Estimator.build_state`: step counters, recent input rows), each also the attribute
    of its name. Saved with the gated layer, under `estimator_state`.

    `set_rank` replaces the factors by a variable of another shape, and Keras locks a layer's
    state once its `build` has run; so this layer has no `build` of its own: `create` makes the
    variables and `recreate` deletes them (Keras untracks a deleted variable attribute) and makes
    them again in the same order, the saved layout, with the state's values.
    """

    def __init__(self, estimator, **kwargs):
        super().__init__(**kwargs)
        self.estimator = estimator

    def create(self, layer):
        """The factors for `layer.rank`, from `Estimator.initial_factors`, then the rule's state."""

        # An initializer rather than an assignment: when Keras builds a subclassed model's layers
        # symbolically, variables are initialised after build returns, and an assignment there
        # would be lost (or, failing, make Keras build the layer twice).
        def initial_factors(shape, dtype=None):
            return tf.cast(pack_factors(*self.estimator.initial_factors(layer)), dtype)

        input_dim = layer.kernel.shape[1]
        # Assigned inside the (possibly replicated) train step: the first replica's value is kept.
        self.estimator_factors = self.add_weight(
            name="estimator_factors", shape=(layer.rank * (input_dim + layer.units),), initializer=initial_factors,
            trainable=self.estimator.trainable, aggregation="only_first_replica",
        )
        self.estimator.build_state(self, input_dim)
        self.built = True

    def add_state(self, name, shape=(), dtype="int64"):
        """A zero-initialised variable of the rule's state, the attribute `name`. Every replica
        writes the same value (from gathered rows and counts): the first replica's is kept."""
        setattr(self, name, self.add_weight(
            name=name, shape=shape, initializer="zeros", dtype=dtype, trainable=False,
            aggregation="only_first_replica", autocast=False,
        ))

    def recreate(self, layer):
        """Make the variables again for `layer.rank`; the state keeps its values."""
        state = {v.name: v.numpy() for v in self.variables if v is not self.estimator_factors}
        for variable in list(self.variables):
            delattr(self, variable.name)
        self.create(layer)
        for variable in self.variables:
            if variable.name in state:
                variable.assign(state[variable.name])

    def load_own_variables(self, store):
        """An empty store is a model saved by an earlier version, whose layout kept these variables
        on the gated layer, which has loaded them (`lrc_keras.saved_layouts`)."""
        if len(store):
            super().load_own_variables(store)


class EstimatorMethods:
    """What LowRankGatedDense offers on its estimator, kept beside the estimators and inherited by
    the layer: the factors, `assign_estimator`, `refit` and `set_rank`. The layer has `estimator`,
    `kernel`, `units` and `rank`, and calls `_build_estimator()` in its build."""

    def _build_estimator(self):
        # Functions check the rank they were traced for against this at every call: set_rank
        # assigns it (it outlives the estimator's new variables), so functions traced before fail.
        self.estimator_rank = self.add_weight(
            name="estimator_rank", shape=(), initializer=keras.initializers.Constant(self.rank),
            dtype="int32", trainable=False, aggregation="only_first_replica",
        )
        self.estimator_state = EstimatorState(
            self.estimator, name="estimator_state", dtype=self.dtype_policy, trainable=self.trainable
        )
        self.estimator_state.create(self)

    @property
    def estimator_factors(self):
        """The variable holding U then V (`pack_factors`), of `estimator_state`."""
        return self.estimator_state.estimator_factors

    def current_factors(self):
        """(U, V) from one read of `estimator_factors`: always a pair one refit stored."""
        return unpack_factors(tf.convert_to_tensor(self.estimator_factors), self.kernel.shape[1], self.rank)

    @property
    def estimator_u(self):
        """U (input_dim, rank), read now; `current_factors()` gives U and V from one read."""
        return self.current_factors()[0]

    @property
    def estimator_v(self):
        """V (rank, units), read now; `current_factors()` gives U and V from one read."""
        return self.current_factors()[1]

    def assign_estimator(self, estimator_u, estimator_v):
        """Store float32 factors in the variable's dtype (bfloat16/float16 layers fit in float32),
        both in one assignment: a call running beside it sees the old pair or this one."""
        dtype = self.estimator_factors.dtype
        self.estimator_factors.assign(pack_factors(tf.cast(estimator_u, dtype), tf.cast(estimator_v, dtype)))

    def refit(self, sample_inputs=None):
        """Set U, V by the estimator's rule from the current kernel.

        `sample_inputs` (2-D, this layer's input width, finite), where given, are the inputs
        the rules that use inputs fit to (input_svd, joint's start) instead of the statistics
        gathered in training; they are checked before any weight changes.
        """
        sample_inputs = checked_sample_inputs(sample_inputs, self.kernel.shape[1], self.name)
        estimator_u, estimator_v = self.estimator.factors(self, sample_inputs)
        if not (np.all(np.isfinite(estimator_u)) and np.all(np.isfinite(estimator_v))):
            warn_non_finite(self.name)
            return
        self.assign_estimator(estimator_u, estimator_v)

    def set_rank(self, rank, sample_inputs=None):
        """Change the estimator's rank of a built layer and refit U, V (see `refit`).

        The estimator's variables are made anew in `estimator_state`, its state (counters,
        input rows) keeping its values. Functions Keras compiled before (`predict`, `evaluate`,
        `fit`) still hold the old variables: they fail with a message saying to compile the
        model again, never answer with the old rank.
        """
        check_positive_int("rank", rank)
        input_dim = self.kernel.shape[1]
        self._check_rank_fits(rank, input_dim)
        sample_inputs = checked_sample_inputs(sample_inputs, input_dim, self.name)
        self.rank = int(rank)
        self.estimator_state.recreate(self)
        self.estimator_rank.assign(self.rank)
        self.refit(sample_inputs)

    def check_traced_rank(self):
        """Functions traced before a `set_rank` hold the old factors: make them fail clearly.

        For the TensorFlow paths; the compiled LrcGatedLayer checks the same inside the op, at no
        cost of its own (three ops here: read, compare, Assert)."""
        tf.debugging.Assert(
            tf.equal(self.estimator_rank, self.rank),
            [f"{self.name}: set_rank changed the rank of the estimator after this function was traced; compile "
             f"the model again (model.compile(...)) before predict, evaluate or fit"],
        )

    def _check_rank_fits(self, rank, input_dim):
        if rank > min(input_dim, self.units):
            raise ValueError(
                f"{self.name}: rank={rank} exceeds min(input_dim, units) = "
                f"min({input_dim}, {self.units}) = {min(input_dim, self.units)}"
            )


def _warm_start(layer):
    """The current Vᵀ, whose columns span the last fit's top right singular vectors (unwatched, as
    every argument of a traced refit)."""
    return _unwatched(tf.transpose(tf.cast(layer.current_factors()[1], tf.float32)))


def _unwatched(value):
    """The value as a tensor no gradient tape watches. A traced function called on a watched tensor
    gets its gradient function built at the call under nested tapes (second-order gradients), and
    a refit's SVD has none for these shapes; a refit is never differentiated."""
    return tf.stop_gradient(tf.convert_to_tensor(value))


def refit_when(layer, condition, factors):
    """U, V ← factors() where `condition` and every entry is finite, else unchanged, in a graph.

    Non-finite factors (a kernel that diverged) never replace the last good ones. Under a
    distribution strategy the assignment stays outside tf.cond, as it synchronises the replicas
    (merge_call), which control flow cannot contain; without one, steps that do not refit skip
    it (and its reads) altogether.
    """
    variable = layer.estimator_factors

    def new_if_finite():
        stored, new = tf.convert_to_tensor(variable), pack_factors(*factors())
        # One select, not a tf.cond: each cond adds a function to every trace of the train step.
        return tf.where(tf.reduce_all(tf.math.is_finite(new)), tf.cast(new, variable.dtype), stored)

    def assign_new_if_finite():
        variable.assign(new_if_finite())

    if tf.distribute.has_strategy():
        variable.assign(tf.cond(condition, new_if_finite, lambda: tf.convert_to_tensor(variable)))
    else:
        tf.cond(condition, assign_new_if_finite, lambda: None)


def traced_refit(function):
    """`function` (a refit in training) as a tf.function traced once per layer shape and left out
    of the train step's graph until a refit runs.

    Keras traces a train step twice when the step creates variables (an optimizer not yet built,
    a metric given by name), and building a refit's graph (QR factorisations, SVDs) in each trace
    was most of a gated layer's tracing; TensorFlow also inlines a called function
    into the graph it optimises before the first step, where the refit's nodes doubled a gated
    network's graph (`_noinline`: it is optimised when a refit first runs instead).
    """
    return tf.function(function, autograph=False, experimental_attributes={"_noinline": True})


def _check_refit_every(refit_every, allow_auto):
    allowed = (None, "auto") if allow_auto else (None,)
    if refit_every in allowed and not isinstance(refit_every, bool):
        return refit_every
    if isinstance(refit_every, bool) or not isinstance(refit_every, numbers.Integral) or refit_every < 1:
        choices = 'a positive integer, "auto" or None' if allow_auto else "a positive integer or None"
        raise ValueError(f"refit_every must be {choices}, got refit_every={refit_every!r}")
    return int(refit_every)


@register
class SVDEstimator(Estimator):
    """The paper's estimator: the truncated SVD of W, the best rank-r U·V ≈ W for any input.

    `refit()` computes it exactly; refits inside training track it by one subspace iteration
    from the current factors (`subspace_svd_factors`), as an exact SVD of a wide kernel costs
    seconds.

    Args:
        refit_every: Training steps between refits inside the train step, or None: never.
    """

    name = "svd"

    def __init__(self, refit_every=200):
        self.refit_every = _check_refit_every(refit_every, allow_auto=False)
        self._traced_refit_factors = traced_refit(subspace_svd_factors)

    def get_config(self):
        return {"refit_every": self.refit_every}

    def build_state(self, state, input_dim):
        state.add_state("training_steps")

    def observe(self, layer, x):
        if self.refit_every is None:
            return
        steps = layer.estimator_state.training_steps.assign_add(1)
        refit_when(layer, tf.equal(steps % self.refit_every, 0), lambda: self._traced_refit_factors(
            _unwatched(layer.kernel), layer.rank, tf.stack([tf.cast(steps, tf.int32), 0]),
            warm_start=_warm_start(layer)))


@register
class InputSVDEstimator(Estimator):
    """U·V minimising ‖X·(W − U·V)‖² over the layer's own recent inputs X (`reduced_rank_factors`).

    Training keeps the last `buffer_rows` finite input rows (`rows_per_step` of each replica's
    batch per step, gathered from every replica and worker, so all compute the same factors) and
    refits from them. Memory: buffer_rows·d floats. Before any row is seen the factors are the
    exact truncated SVD of W.

    Args:
        refit_every: `"auto"` (default): refit once the layer's training multiply-adds since the
            last refit reach 1/`refit_budget` of the refit's own (`refit_multiply_adds`, weighed
            by `REFIT_SLOWDOWN`), so refits cost about `refit_budget` of a wide layer's
            training (3072→4000 at rank 50) and more of a narrow one's (784→1000 at rank 20:
            every ~6800 rows, 53 steps of 128, ~15% of its GEMM time on 2 cores); a
            positive int: every that many training steps; None: never inside training.
        buffer_rows: Positive int, how many recent input rows the refit fits.
        rows_per_step: Positive int, rows of each replica's batch added to the buffer per step.
        refit_budget: Float in (0, 1], the share of the layer's training work refits may take
            when `refit_every="auto"`.
    """

    name = "input_svd"
    # Subspace iterations per refit in training, starting from the last fit's subspace.
    power_iterations = 1

    def __init__(self, refit_every="auto", buffer_rows=1024, rows_per_step=32, refit_budget=0.05):
        self.refit_every = _check_refit_every(refit_every, allow_auto=True)
        check_positive_int("buffer_rows", buffer_rows)
        check_positive_int("rows_per_step", rows_per_step)
        if (isinstance(refit_budget, bool) or not isinstance(refit_budget, numbers.Real)
                or not 0 < refit_budget <= 1):
            raise ValueError(f"refit_budget must be a number in (0, 1], got refit_budget={refit_budget!r}")
        self.buffer_rows = int(buffer_rows)
        self.rows_per_step = int(rows_per_step)
        self.refit_budget = float(refit_budget)
        # An estimator is a plain object, not trackable: nothing saves its traced refit.
        self._traced_buffered_factors = traced_refit(buffered_factors)

    def get_config(self):
        return {"refit_every": self.refit_every, "buffer_rows": self.buffer_rows,
                "rows_per_step": self.rows_per_step, "refit_budget": self.refit_budget}

    def build_state(self, state, input_dim):
        state.add_state("training_steps")
        state.add_state("input_rows", shape=(self.buffer_rows, input_dim), dtype="float32")
        state.add_state("input_rows_seen")
        # Training rows (of every replica) since the last refit: what the "auto" schedule weighs.
        state.add_state("rows_since_refit", dtype="float32")

    def initial_factors(self, layer):
        """No input seen yet: the truncated SVD of the kernel, as `factors` gives on an empty buffer."""
        return truncated_svd_factors(layer.kernel, layer.rank)

    def factors(self, layer, sample_inputs=None, rank=None):
        rank, state = rank or layer.rank, layer.estimator_state
        if sample_inputs is not None:
            return reduced_rank_factors(layer.kernel, sample_inputs, rank, seed=[0, 0])
        filled = tf.minimum(tf.convert_to_tensor(state.input_rows_seen), self.buffer_rows)
        seed = tf.stack([tf.cast(state.training_steps, tf.int32), 0])
        return self._traced_buffered_factors(
            _unwatched(layer.kernel), _unwatched(state.input_rows), filled, rank, seed,
            _warm_start(layer) if rank == layer.rank else None, self.power_iterations,
        )

    def observe(self, layer, x):
        state = layer.estimator_state
        context = tf.distribute.get_replica_context()
        rows = tf.cast(x[: self.rows_per_step], tf.float32)
        batch_rows = tf.cast(tf.shape(x)[0], tf.float32)
        if context.num_replicas_in_sync > 1:
            rows = context.all_gather(rows, axis=0)
            batch_rows = context.all_reduce(tf.distribute.ReduceOp.SUM, batch_rows)
        # A zero row adds nothing to ‖X·(W − U·V)‖²: non-finite rows are stored as zeros.
        rows = tf.where(tf.reduce_all(tf.math.is_finite(rows), axis=1, keepdims=True), rows, 0.0)[: self.buffer_rows]
        count = tf.shape(rows, out_type=tf.int64)[0]
        slots = (state.input_rows_seen + tf.range(count)) % self.buffer_rows
        state.input_rows.value.scatter_update(tf.IndexedSlices(rows, slots))
        state.input_rows_seen.assign_add(count)
        steps = state.training_steps.assign_add(1)
        since = state.rows_since_refit + batch_rows
        due = self._refit_due(layer, steps, since)
        refit_when(layer, due, lambda: self.factors(layer))
        state.rows_since_refit.assign(tf.where(due, 0.0, since))

    def _refit_due(self, layer, steps, rows_since_refit):
        if self.refit_every is None:
            return tf.constant(False)
        if self.refit_every != "auto":
            return tf.equal(steps % self.refit_every, 0)
        return rows_since_refit >= self.rows_between_refits(layer)

    def rows_between_refits(self, layer):
        """Training rows after which an "auto" refit has cost `refit_budget` of the training."""
        input_dim, units = layer.kernel.shape[1], layer.units
        # Per row, training costs the forward GEMM, its two gradients and the estimate.
        per_row = 3 * input_dim * units + layer.rank * (input_dim + units)
        refit = REFIT_SLOWDOWN * refit_multiply_adds(
            input_dim, units, layer.rank, self.buffer_rows, self.power_iterations
        )
        return math.ceil(refit / (self.refit_budget * per_row))


@register
class JointEstimator(Estimator):
    """U, V trained with the network through an auxiliary loss (`estimator_loss`).

    Gradients of that loss reach only U and V, never W, b or the layer's input. U, V start from
    the input-aware factors (`reduced_rank_factors`) of the first training batch, or of the
    sample inputs given to `refit`, `from_dense` or `convert`; before that, from the truncated
    SVD of the kernel.

    Args:
        loss_weight: Non-negative float, weight of the estimator's loss.
        positive_weight: Float ≥ 1, how much more a missed active unit costs than a wasted
            computation.
    """

    name = "joint"
    trainable = True

    def __init__(self, loss_weight=1.0, positive_weight=4.0):
        for key, value, valid, requirement in (
            ("loss_weight", loss_weight, lambda v: v >= 0, ">= 0"),
            ("positive_weight", positive_weight, lambda v: v >= 1, ">= 1"),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not valid(value):
                raise ValueError(f"{key} must be a finite number {requirement}, got {key}={value!r}")
        self.loss_weight = float(loss_weight)
        self.positive_weight = float(positive_weight)

    def get_config(self):
        return {"loss_weight": self.loss_weight, "positive_weight": self.positive_weight}

    def build_state(self, state, input_dim):
        state.add_state("training_steps")

    def factors(self, layer, sample_inputs=None, rank=None):
        if sample_inputs is None:
            return super().factors(layer, rank=rank)
        return reduced_rank_factors(layer.kernel, sample_inputs, rank or layer.rank, seed=[0, 0])

    def observe(self, layer, x):
        steps = layer.estimator_state.training_steps.assign_add(1)
        rows = tf.boolean_mask(x, tf.reduce_all(tf.math.is_finite(x), axis=1))
        refit_when(layer, tf.logical_and(tf.equal(steps, 1), tf.shape(rows)[0] > 0),
                   lambda: self.factors(layer, rows))

    def loss(self, layer, z_hat, positive):
        return self.loss_weight * estimator_loss(z_hat, positive, self.positive_weight)


def estimator_loss(z_hat, positive, positive_weight):
    """Recall-weighted binary cross-entropy teaching ẑ the sign of z (`positive`: z > 0).

    The labels carry no gradient, so this loss never pulls the network's kernel toward the
    estimator; `positive_weight` > 1 charges a missed active unit more than a wasted
    computation, as recall is what protects accuracy.
    """
    labels = tf.cast(positive, z_hat.dtype)
    return tf.reduce_mean(
        tf.nn.weighted_cross_entropy_with_logits(labels=labels, logits=z_hat, pos_weight=positive_weight)
    )


def warn_non_finite(layer_name):
    warnings.warn(
        f"{layer_name}: the refit gave non-finite factors (is the kernel finite?); the last good "
        f"ones are kept", RuntimeWarning, stacklevel=3,
    )
