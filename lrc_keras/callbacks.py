"""Callbacks: EstimatorRefit (refit the estimators from Python) and GateSummaries (TensorBoard)."""

import os

import keras
import tensorflow as tf

from lrc_keras.audit import gated_layers
from lrc_keras.audit import measure_gates
from lrc_keras.inputs import checked_model_inputs
from lrc_keras.metrics import GATE_RATES


class EstimatorRefit(keras.callbacks.Callback):
    """Refit every LowRankGatedDense's estimator by its own rule from the callback loop: svd
    layers from the kernel, input_svd layers from their buffered input rows. A joint layer's
    factors are trained by gradient: it is left alone.

    The layers already refit inside the train step (their estimator's `refit_every`); this is
    for users who prefer to schedule it from Python, e.g. with `SVDEstimator(refit_every=None)`.

    Args:
        every_n_steps: Positive integer or None: refit after every n-th batch.
        on_epoch_end: Boolean: refit at the end of every epoch.
    """

    def __init__(self, every_n_steps=None, on_epoch_end=True):
        super().__init__()
        self.every_n_steps = _check_every_n_steps(every_n_steps)
        self.refit_on_epoch_end = on_epoch_end
        self.batches_seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches_seen += 1
        if self.every_n_steps and self.batches_seen % self.every_n_steps == 0:
            self._refit()

    def on_epoch_end(self, epoch, logs=None):
        if self.refit_on_epoch_end:
            self._refit()

    def _refit(self):
        for layer in gated_layers(self.model):
            if not layer.estimator.trainable:
                layer.refit()


class GateSummaries(keras.callbacks.Callback):
    """TensorBoard summaries of how well each gated layer's estimator predicts activation signs.

    On a fixed validation batch, for every LowRankGatedDense, it writes scalars
    `<layer>/sign_accuracy`, `recall`, `precision`, `false_negative_rate`,
    `predicted_density`, `true_density` (the GATE_RATES), `cost_model_speedup` and
    `energy_captured` (the share of the kernel's squared singular values, Σσ², in
    its first `rank`: how much of W the best rank-r factorisation keeps), and
    histograms `<layer>/estimate_error` (ẑ - z) and `<layer>/kernel_singular_values`,
    to `log_dir/gates`, at the optimizer's step. Use it beside
    `keras.callbacks.TensorBoard(log_dir)`; docs/tensorboard.md lists every tag.

    Args:
        log_dir: The TensorBoard log directory.
        validation_data: Inputs `x`, or a tuple `(x, y)`; the first
            `max_rows` rows form the fixed batch.
        every_n_steps: Positive integer or None: also write every n batches
            (always at the end of each epoch).
        max_rows: Size of the fixed validation batch.
        rates: Whether to write the GATE_RATES. False where `fit`'s validation
            measures them already (`lrc_keras.set_audit(model)` before `fit`),
            so that TensorBoard shows each once, as `epoch_<layer>_<rate>`.
    """

    def __init__(self, log_dir, validation_data, every_n_steps=None, max_rows=1024, rates=True):
        super().__init__()
        self.scalars = (GATE_RATES if rates else ()) + ("cost_model_speedup", "energy_captured")
        x = validation_data[0] if isinstance(validation_data, tuple) else validation_data
        self.x = checked_model_inputs(x, "GateSummaries validation_data")[:max_rows]
        self.every_n_steps = _check_every_n_steps(every_n_steps)
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "gates"))

    def on_train_batch_end(self, batch, logs=None):
        if self.every_n_steps and (batch + 1) % self.every_n_steps == 0:
            self.write()

    def on_epoch_end(self, epoch, logs=None):
        self.write()

    def on_train_end(self, logs=None):
        self.writer.flush()

    def write(self):
        step = int(self.model.optimizer.iterations.numpy())
        with self.writer.as_default(step=step):
            for report in measure_gates(self.model, self.x):
                name = report["layer"]
                for key in self.scalars:
                    tf.summary.scalar(f"{name}/{key}", report[key])
                tf.summary.histogram(f"{name}/estimate_error", report["estimate_error"])
                tf.summary.histogram(f"{name}/kernel_singular_values", report["singular_values"])


def _check_every_n_steps(every_n_steps):
    if every_n_steps is not None and (
        isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
    ):
        raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
    return every_n_steps
