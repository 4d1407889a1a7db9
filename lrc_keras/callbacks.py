"""Callbacks: SVDRefit (refit the estimators from Python) and GateSummaries (TensorBoard)."""

import keras

from lrc_keras.layers import LowRankGatedDense


def gated_layers(model):
    """Every LowRankGatedDense in `model`, nested models included, in order."""
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, LowRankGatedDense)]


class SVDRefit(keras.callbacks.Callback):
    """Refit every LowRankGatedDense's estimator by truncated SVD from the callback loop.

    The layer already refits inside the train step (`refit_every`); this is for
    users who prefer to schedule it from Python, e.g. with `refit_every=None`.

    Args:
        every_n_steps: Positive integer or None: refit after every n-th batch.
        on_epoch_end: Boolean: refit at the end of every epoch.
    """

    def __init__(self, every_n_steps=None, on_epoch_end=True):
        super().__init__()
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
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
            layer.refit()
