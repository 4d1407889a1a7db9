"""Trains one small gated model for tests/test_multi_worker.py, in its own process.

    python multi_worker_train.py OUT.npz                  the reference: one process, plain model.fit
    TF_CONFIG=... python multi_worker_train.py OUT.npz --multi-worker
                                                          one worker of a MultiWorkerMirroredStrategy
                                                          cluster, in a custom training loop

Every process builds the same global batches and the same initial weights (numpy, fixed seeds),
trains STEPS steps and saves `model.get_weights()` (estimator factors and statistics included)
to OUT.npz. The workers use a custom loop because Keras 3.15's `fit` fails under
MultiWorkerMirroredStrategy for any model (keras-team/keras#20585; see docs/multi_worker.md, "Training on
several machines").
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

from lrc_keras import LowRankGatedDense
from lrc_keras.density_target import DensityTarget
from lrc_keras.estimators import InputSVDEstimator, SVDEstimator

# At most the rows a layer samples in training (lrc_keras.upkeep.GATE_SAMPLE_ROWS, 32) and
# InputSVDEstimator.rows_per_step (32): then every row of every replica enters the sampled
# penalty and the input rows, in the cluster as in the reference, and the results can agree.
GLOBAL_BATCH = 16
STEPS = 12
INPUT_DIM = 20


def global_batches():
    """STEPS batches of GLOBAL_BATCH rows, in order (a synthetic 3-class task)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS * GLOBAL_BATCH, INPUT_DIM)).astype("float32")
    y = np.argmax(x[:, :3] + 0.5 * x[:, 3:6], axis=1).astype("int32")
    return x, y


def build_model():
    model = keras.Sequential([
        keras.Input((INPUT_DIM,)),
        # the default estimator, refitted every 2 steps from the input rows gathered from every
        # worker, on the gated training path
        LowRankGatedDense(
            64, rank=4, estimator=InputSVDEstimator(refit_every=2), activity_regularizer=keras.regularizers.L1(1e-3),
            training_path="gated", name="gated_input_svd",
        ),
        # the paper's SVD of the kernel, refitted every 2 steps, on the default "auto" path, trained to a
        # density: its strength follows the gate counts of every worker (a fast rate, to show in 12 steps)
        LowRankGatedDense(32, rank=4, estimator=SVDEstimator(refit_every=2), target_density=DensityTarget(0.2, rate=0.5),
                          name="gated_svd"),
        keras.layers.Dense(3, name="logits"),
    ])
    # The same start in every process, whatever the initialisers' seeding under a strategy.
    rng = np.random.default_rng(1)
    model.set_weights([
        (rng.standard_normal(w.shape) / np.sqrt(w.shape[-1])).astype("float32") if "kernel" in w.path else w.numpy()
        for w in model.weights
    ])
    for layer in model.layers[:2]:
        layer.refit()
    return model


def optimizer():
    return keras.optimizers.SGD(0.05, momentum=0.9)


def per_example_loss(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def train_reference(x, y):
    model = build_model()
    model.compile(optimizer(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return model


def train_multi_worker(x, y):
    # RING: the collective implementation for CPUs (NCCL needs GPUs); AUTO would pick it too.
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING
        )
    )

    def replica_dataset(context):
        # Replica k of n takes rows [k·b, (k+1)·b) of every global batch (b = GLOBAL_BATCH / n),
        # so the cluster's step i sees exactly global batch i, as the reference's step i does.
        local = context.get_per_replica_batch_size(GLOBAL_BATCH)
        k = context.input_pipeline_id
        rows = np.concatenate([
            np.arange(i * GLOBAL_BATCH + k * local, i * GLOBAL_BATCH + (k + 1) * local) for i in range(STEPS)
        ])
        return tf.data.Dataset.from_tensor_slices((x[rows], y[rows])).batch(local)

    with strategy.scope():
        model = build_model()
        sgd = optimizer()
        sgd.build(model.trainable_variables)

    @tf.function
    def train_step(batch):
        def step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                # Sum over this replica's rows / global batch: the optimizer sums the replicas'
                # gradients, which gives the gradient of the global batch's mean loss.
                loss = tf.nn.compute_average_loss(per_example_loss(y, logits), global_batch_size=GLOBAL_BATCH)
                # Layer losses (here the activity penalty, a mean over this replica's rows) / replicas.
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            variables = model.trainable_variables
            sgd.apply_gradients(zip(tape.gradient(loss, variables), variables))

        strategy.run(step, args=batch)

    for batch in strategy.distribute_datasets_from_function(replica_dataset):
        train_step(batch)
    return model


def main(out, multi_worker):
    x, y = global_batches()
    model = train_multi_worker(x, y) if multi_worker else train_reference(x, y)
    np.savez(out, names=np.array([w.path for w in model.weights]), *model.get_weights())
    print("OK", int(model.get_layer("gated_input_svd").estimator_state.training_steps.numpy()))


if __name__ == "__main__":
    main(sys.argv[1], "--multi-worker" in sys.argv[2:])
