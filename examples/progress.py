"""What a run reports while it trains: one short line per epoch on the terminal, each metric once in TensorBoard.

Keras' own progress line lists every logged metric, six per gated layer; here the terminal gets
loss, accuracy and the whole network's gate figures, and the per-layer metrics stay in the
`history` that `fit` returns and in TensorBoard (docs/tensorboard.md).
"""

import math
import time

import keras

from lrc_keras.audit import gated_layers


def describe(model):
    """"the Dense network 784-1000-1000-10" or "the gated network 784-1000-1000-10 (rank 20,20, estimator input_svd)"."""
    widths = "-".join(map(str, [model.inputs[0].shape[-1]] + [layer.units for layer in model.layers
                                                               if hasattr(layer, "units")]))
    gated = gated_layers(model)
    if not gated:
        return f"the Dense network {widths}"
    ranks = ",".join(str(layer.rank) for layer in gated)
    return f"the gated network {widths} (rank {ranks}, estimator {gated[0].estimator.name})"


class Phase:
    """`what ...` on the terminal before a step that may take a while, and its seconds on the same line when it is
    done: `with Phase(what):`, or `.done()`."""

    def __init__(self, what):
        print(f"{what} ...", end="", flush=True)
        self.started = time.perf_counter()

    def done(self):
        print(f" {time.perf_counter() - self.started:.1f} s", flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.done()


class EpochLine(keras.callbacks.Callback):
    """After each epoch, one line: its wall time, loss and accuracy, and for a gated network its density and recall.

    Give it last among fit's callbacks: Keras calls them in order, so the epoch's time then
    includes the others' work at its end (validation, TensorBoard, GateSummaries). The first
    training step, which traces the train function, gets a line of its own.

    `training_seconds` (the reports' "s/epoch") runs from the epoch's first training step to its
    validation: before that step, fit makes the epoch's iterator of the arrays, which on the
    project's machine waited 2-5 s in about half the epochs for the last one's to shut down, for
    Dense too (BENCHMARKS.md), whatever the network. The line's wall time keeps it.

    density: the share of all hidden units of the gated layers that the gates computed; recall:
    the share of the active ones (z > 0) among them. Both weigh each layer by its units, from
    the layers' `<layer>_predicted_density`, `_true_density` and `_recall` logs; "validation"
    repeats them on the validation data where they were measured (lrc_keras.set_audit).
    """

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs
        self.training_seconds = []  # each epoch's training time, validation left out: the reports' "s/epoch"

    def on_train_begin(self, logs=None):
        self.units = {layer.name: layer.units for layer in gated_layers(self.model)}
        self.tracing = Phase("tracing the training step and taking it once (epoch 1's time includes this)")

    def on_train_batch_begin(self, batch, logs=None):
        if self.first_step is None:
            self.first_step = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self.tracing:
            self.tracing.done()
            self.tracing = None

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        self.first_step = None
        self.trained = None

    def on_test_begin(self, logs=None):
        if self.trained is None:  # fit's validation: the epoch's training is over
            self.trained = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        self.training_seconds.append((self.trained or time.perf_counter()) - (self.first_step or self.started))
        parts = [f"epoch {epoch + 1:>{len(str(self.epochs))}}/{self.epochs}", f"{seconds:5.1f} s",
                 "train:", *self.figures(logs, "")]
        validation = self.figures(logs, "val_")
        if validation:
            parts += ["  validation:", *validation]
        print(" ".join(parts), flush=True)

    def figures(self, logs, prefix):
        shown = [f"{name} {logs[prefix + name]:.4f}" for name in ("loss", "accuracy") if prefix + name in logs]
        if self.units and f"{prefix}{next(iter(self.units))}_recall" in logs:
            density, recall = network_gate_rates(logs, self.units, prefix)
            if not math.isnan(density):
                shown += [f"density {density:.3f}", f"recall {recall:.3f}"]
        return shown


def network_gate_rates(logs, units, prefix=""):
    """(predicted density, recall) of all gated units together, from the per-layer rates in `logs`."""
    total = sum(units.values())
    computed = sum(units[name] * logs[f"{prefix}{name}_predicted_density"] for name in units)
    active = sum(units[name] * logs[f"{prefix}{name}_true_density"] for name in units)
    caught = sum(units[name] * logs[f"{prefix}{name}_true_density"] * logs[f"{prefix}{name}_recall"] for name in units)
    return computed / total, caught / active if active else 1.0


class TensorBoard(keras.callbacks.TensorBoard):
    """keras.callbacks.TensorBoard with each metric once: without the copy of every validation metric,
    `evaluation_<metric>_vs_iterations`, that Keras also writes (the numbers of `epoch_<metric>`)."""

    def on_test_end(self, logs=None):
        super().on_test_end({})
