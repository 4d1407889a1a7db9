"""The estimate stage: the rank-r sign estimator ẑ = (x·U)·V + b, and the rules that fit U, V.

Stored layout (shared with the compiled ops, see `custom_ops/gated_dense.h`):
    kernel       (units, input_dim)  row j is unit j's weights, contiguous
    estimator_u  (input_dim, rank)   one dense GEMM x·U per batch
    estimator_v  (rank, units)       V as the paper writes it: the second GEMM needs no transpose
so W = kernel^T and ẑ = (x·U)·V + b.

Each rule is a small strategy class registered under the name `LowRankGatedDense(estimator=...)`
takes: it creates its variables on the layer, says what to do in each training step, how to
refit, and which auxiliary loss (if any) trains U, V. A new estimator is one class here
decorated with `@register`; the layer needs no change.
"""

import tensorflow as tf

ESTIMATORS = {}
# Ridge added to the inputs' second moment, relative to its mean eigenvalue trace(C)/d.
RIDGE = 1e-3


def register(cls):
    """Make `cls` available as `LowRankGatedDense(estimator=cls.name)`."""
    ESTIMATORS[cls.name] = cls
    return cls


def get(name):
    if name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got estimator={name!r}")
    return ESTIMATORS[name]


def low_rank_product(x, estimator_u, estimator_v):
    """(x·U)·V for 2-D x: two thin GEMMs, r·(d + n) multiply-adds per row."""
    return tf.matmul(tf.matmul(x, estimator_u), estimator_v)


def estimate(x, estimator_u, estimator_v, bias):
    """ẑ = (x·U)·V + b for 2-D x."""
    z_hat = low_rank_product(x, estimator_u, estimator_v)
    return z_hat if bias is None else z_hat + bias


def truncated_svd_factors(kernel, rank):
    """Best rank-`rank` factors of W = kernel^T, in the stored layout, in float32.

    Returns `(estimator_u, estimator_v)` with estimator_u @ estimator_v the truncated SVD of W
    (Eckart-Young: the best rank-r approximation in Frobenius and spectral norm). The singular
    values are split as sqrt(s) on both sides so that U and V have the same scale, which keeps
    the joint estimator's gradients balanced.
    """
    s, left, right = tf.linalg.svd(tf.cast(kernel, tf.float32), full_matrices=False)
    # kernel = left·diag(s)·right^T, so W = kernel^T = right·diag(s)·left^T.
    root = tf.sqrt(s[:rank])
    return right[:, :rank] * root, tf.transpose(left[:, :rank] * root)


def ridge_cholesky(moment, ridge):
    """L with L·Lᵀ = C + λI, λ = ridge·trace(C)/d (and a floor), so dead or constant inputs,
    which make C singular, cannot make the factorisation fail."""
    d = tf.shape(moment)[0]
    scale = tf.linalg.trace(moment) / tf.cast(d, moment.dtype)
    shift = ridge * scale + 1e-12
    return tf.linalg.cholesky(moment + shift * tf.eye(d, dtype=moment.dtype))


def input_aware_factors(kernel, moment, rank, seed, power_iterations=4, oversampling=10):
    """Rank-`rank` U, V minimising E‖x·W − x·U·V‖² over inputs with second moment C = `moment`.

    Reduced-rank regression ("whitened" SVD): with C = L·Lᵀ, E‖x·A‖² = ‖Lᵀ·A‖²_F, so the best
    U·V is L⁻ᵀ times the truncated SVD of M = Lᵀ·W. The SVD is randomized (Halko, Martinsson &
    Tropp 2011): a subspace iteration with `power_iterations` passes over M from a
    `rank + oversampling`-column start, then an exact SVD of M projected on that subspace. It
    needs only products with W, Wᵀ, L and Lᵀ, never M itself. Measured on two cores (Cholesky
    included): 17 ms for 784→1000 at rank 20 and 0.56 s for 3072→4000 at rank 50, against 150 ms
    and 9.2 s for an exact SVD of W alone, which is what lets the estimator be refitted every few
    dozen steps. `seed` (two ints) fixes the start so that every replica and
    worker computes the same factors. A zero or identity C gives the plain truncated SVD.
    """
    w = tf.transpose(tf.cast(kernel, tf.float32))  # (d, n)
    lower = ridge_cholesky(tf.cast(moment, tf.float32), ridge=RIDGE)
    d, n = tf.shape(w)[0], tf.shape(w)[1]
    columns = tf.minimum(rank + oversampling, tf.minimum(d, n))

    def times_m(a):  # M·a = Lᵀ·(W·a)
        return tf.matmul(lower, tf.matmul(w, a), transpose_a=True)

    def times_m_transposed(b):  # Mᵀ·b = Wᵀ·(L·b)
        return tf.matmul(w, tf.matmul(lower, b), transpose_a=True)

    basis = tf.random.stateless_normal(tf.stack([n, columns]), seed=seed)
    basis, _ = tf.linalg.qr(times_m(basis))
    for _ in range(power_iterations):
        basis, _ = tf.linalg.qr(times_m_transposed(basis))
        basis, _ = tf.linalg.qr(times_m(basis))
    # M ≈ Q·(Qᵀ·M); the SVD of the small (columns × n) matrix Qᵀ·M gives M's leading triplets.
    s, left, right = tf.linalg.svd(tf.transpose(times_m_transposed(basis)), full_matrices=False)
    root = tf.sqrt(s[:rank])
    whitened_u = tf.matmul(basis, left[:, :rank]) * root  # Lᵀ·U
    estimator_u = tf.linalg.triangular_solve(lower, whitened_u, lower=True, adjoint=True)
    return estimator_u, tf.transpose(right[:, :rank] * root)


class Estimator:
    """A rule for the estimator's factors U, V. Subclasses set `name` and override what differs.

    The layer calls `build` once (after its kernel and bias exist), `factors` for new U, V (at
    build, from `layer.refit()`, and on the refit schedule inside the compiled train step),
    `observe` with each training batch, and adds `loss` to its losses when it is not None.
    Refits inside training are computed identically by every replica and every worker (from the
    same kernel and all-reduced statistics) and kept from the first replica.
    """

    name = None
    trainable = False  # whether U, V are trained by gradient
    default_refit_every = None  # training steps between refits when refit_every="auto"

    def __init__(self, layer):
        self.layer = layer

    def build(self, input_dim):
        # Assigned inside the (possibly replicated) train step: the first replica's value is kept.
        self.layer.estimator_u = self.layer.add_weight(
            name="estimator_u", shape=(input_dim, self.layer.rank), initializer="zeros",
            trainable=self.trainable, aggregation="only_first_replica",
        )
        self.layer.estimator_v = self.layer.add_weight(
            name="estimator_v", shape=(self.layer.rank, self.layer.units), initializer="zeros",
            trainable=self.trainable, aggregation="only_first_replica",
        )

    def factors(self, sample_inputs=None, rank=None):
        """New float32 (U, V) of rank `rank` (default the layer's) from the current kernel.

        Rules that use inputs fit them to `sample_inputs` when given (2-D, float32). Nothing is
        assigned: `LowRankGatedDense.assign_estimator` stores the result.
        """
        return truncated_svd_factors(self.layer.kernel, rank or self.layer.rank)

    def observe(self, x):
        """Called with every 2-D training batch inside the train step."""

    def loss(self, z_hat, z):
        return None

    def _current_factors(self):
        return tf.cast(self.layer.estimator_u, tf.float32), tf.cast(self.layer.estimator_v, tf.float32)

    def _add_step_counter(self):
        self.layer.training_steps = self.layer.add_weight(
            name="training_steps", shape=(), initializer="zeros", dtype="int64", trainable=False,
            aggregation="only_first_replica",
        )

    def _refit_when(self, condition, factors):
        """U, V ← factors() where `condition`, else unchanged, in a graph.

        The assignment stays outside tf.cond: under a distribution strategy it synchronises the
        replicas (merge_call), which control flow cannot contain.
        """
        self.layer.assign_estimator(*tf.cond(condition, factors, self._current_factors))


@register
class SVDEstimator(Estimator):
    """The paper's estimator: the truncated SVD of W, the best rank-r U·V ≈ W for any input.

    Refitted every `refit_every` training steps inside the train step. Refit cost: an exact SVD
    of the kernel (~150 ms for 784×1000, ~9 s for 3072×4000 on two cores), hence the default of
    200 steps between refits.
    """

    name = "svd"
    default_refit_every = 200

    def build(self, input_dim):
        super().build(input_dim)
        self._add_step_counter()

    def observe(self, x):
        every = self.layer.resolved_refit_every
        if every is None:
            return
        steps = self.layer.training_steps.assign_add(1)
        self._refit_when(tf.equal(steps % every, 0), self.factors)


@register
class InputSVDEstimator(SVDEstimator):
    """U·V minimising E‖x·W − x·U·V‖² over the layer's own inputs (see `input_aware_factors`).

    Training gathers C = E[xᵀx], the second moment of the inputs, from `moment_rows` rows of each
    batch (an exponential moving average, `decay` per step, whose normalisation is tracked so
    that early estimates are unbiased; non-finite rows are left out), and each refit, every
    `refit_every` steps, solves the reduced-rank regression. Memory: d² floats for C (2.5 MB for
    d = 784, 38 MB for d = 3072). Cost per training step: moment_rows·d² multiply-adds and a pass
    over C, 1/12 of the layer's own forward and backward multiply-adds at batch 128 (measured
    0.8 ms for d = 784, 12 ms for d = 3072). Refit cost: a Cholesky of C and a randomized SVD
    (17 ms for 784→1000, see `input_aware_factors`), under 1 ms a step at the default of a
    refit every 25 steps: about once an epoch of 3000 examples at batch 128, often enough to
    follow the weights, and the inputs of deeper layers as the L1 penalty makes them sparse. Under a distribution strategy the
    statistics are summed over replicas and workers (an all-reduce), so every replica and worker
    computes the same factors from the same C.
    """

    name = "input_svd"
    default_refit_every = 25
    moment_rows = 32
    decay = 0.98

    def build(self, input_dim):
        super().build(input_dim)
        self.layer.input_moment = self.layer.add_weight(
            name="input_moment", shape=(input_dim, input_dim), initializer="zeros",
            dtype="float32", trainable=False, aggregation="sum", autocast=False,
        )
        self.layer.input_count = self.layer.add_weight(
            name="input_count", shape=(), initializer="zeros", dtype="float32", trainable=False,
            aggregation="sum", autocast=False,  # float32 statistics under mixed precision too
        )

    def factors(self, sample_inputs=None, rank=None):
        if sample_inputs is not None:
            moment, count = second_moment(sample_inputs)
        else:
            moment, count = self.layer.input_moment, self.layer.input_count
        count = tf.convert_to_tensor(count)
        moment = tf.convert_to_tensor(moment)
        # Before any input is seen, C = I: the plain truncated SVD.
        moment = tf.where(count > 0, moment / tf.maximum(count, 1e-30), tf.eye(tf.shape(moment)[0]))
        seed = tf.stack([tf.cast(self.layer.training_steps, tf.int32), 0])
        return input_aware_factors(self.layer.kernel, moment, rank or self.layer.rank, seed)

    def observe(self, x):
        moment, rows = second_moment(x[: self.moment_rows])
        # m ← decay·m + Σ_replicas xᵀx. Under a distribution strategy an assignment to these
        # "sum" variables stores the sum of what every replica assigns (Keras' assign_add is an
        # assign too), so each replica assigns its own xᵀx plus its share of decay·m.
        share = self.decay / tf.distribute.get_replica_context().num_replicas_in_sync
        self.layer.input_moment.assign(share * self.layer.input_moment + moment)
        self.layer.input_count.assign(share * self.layer.input_count + rows)
        super().observe(x)


def second_moment(x):
    """(Σ xᵀx, rows) in float32 over the rows of x whose values are all finite."""
    x = tf.cast(x, tf.float32)
    finite = tf.reduce_all(tf.math.is_finite(x), axis=1)
    x = tf.where(finite[:, None], x, 0.0)
    return tf.matmul(x, x, transpose_a=True), tf.reduce_sum(tf.cast(finite, tf.float32))


@register
class JointEstimator(Estimator):
    """U, V trained with the network through an auxiliary loss (`estimator_loss`).

    Gradients of that loss reach only U and V, never W, b or the layer's input. U, V start from
    the input-aware factors (`input_aware_factors`) of the first training batch, or of the
    sample inputs given to `refit`, `from_dense` or `convert`; before that, from the truncated
    SVD of the kernel.
    """

    name = "joint"
    trainable = True

    def build(self, input_dim):
        super().build(input_dim)
        self._add_step_counter()

    def factors(self, sample_inputs=None, rank=None):
        if sample_inputs is None:
            return super().factors(rank=rank)
        moment, count = second_moment(sample_inputs)
        return input_aware_factors(
            self.layer.kernel, moment / tf.maximum(count, 1.0), rank or self.layer.rank, seed=[0, 0]
        )

    def observe(self, x):
        steps = self.layer.training_steps.assign_add(1)
        self._refit_when(tf.equal(steps, 1), lambda: self.factors(x))

    def loss(self, z_hat, z):
        if self.layer.estimator_loss_weight == 0:
            return None
        return self.layer.estimator_loss_weight * estimator_loss(
            z_hat, z, self.layer.estimator_positive_weight
        )


def estimator_loss(z_hat, z, positive_weight):
    """Recall-weighted binary cross-entropy teaching ẑ the sign of z.

    The labels (z > 0) carry no gradient, so this loss never pulls the network's kernel toward
    the estimator; `positive_weight` > 1 charges a missed active unit more than a wasted
    computation, as recall is what protects accuracy.
    """
    labels = tf.cast(tf.stop_gradient(z) > 0, z_hat.dtype)
    return tf.reduce_mean(
        tf.nn.weighted_cross_entropy_with_logits(labels=labels, logits=z_hat, pos_weight=positive_weight)
    )
