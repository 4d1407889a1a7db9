"""What examples/mnist.py and examples/svhn.py share: flags, tfds loading, the network, the report."""

import argparse
import csv
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from lrc_keras import LowRankGatedDense
from lrc_keras import measure_gates
from lrc_keras.callbacks import GateSummaries
from lrc_keras.timing import median_times


class DataError(Exception):
    """Data that cannot be had or read: reported in one line, not a traceback."""


def int_list(text):
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parser(description, hidden, ranks, epochs, l1):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory")
    p.add_argument("--hidden", type=int_list, default=hidden, help="hidden layer sizes, e.g. 1000,1000")
    p.add_argument("--ranks", type=int_list, default=ranks, help="estimator rank per hidden layer (one value: all)")
    p.add_argument("--estimator", choices=["svd", "joint"], default="svd")
    p.add_argument("--refit-every", type=int, default=200, help="training steps between SVD refits")
    p.add_argument("--margin", type=float, default=0.0, help="compute units with estimate > -margin")
    p.add_argument("--l1", type=float, default=l1, help="L1 activity penalty on hidden activations")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logdir", default="runs", help="TensorBoard logs, tables and plots go here")
    p.add_argument("--baseline", action="store_true", help="also train the same network with Dense layers")
    p.add_argument("--sweep-ranks", type=int_list, default=None, help="train one model per rank, e.g. 5,10,20,50")
    return p


def parse_args(parser, argv):
    args = parser.parse_args(argv)
    if len(args.ranks) not in (1, len(args.hidden)):
        parser.error(
            f"--ranks needs 1 or {len(args.hidden)} values (one per hidden layer), "
            f"got {','.join(map(str, args.ranks))}"
        )
    return args


def load_tfds(name, data_dir):
    """(x_train, y_train), (x_test, y_test) as numpy, failing fast where nothing can be downloaded."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader

    # tfds retries an unreachable host for minutes; one attempt tells us enough.
    downloader.MAX_RETRIES = 0
    try:
        splits = tfds.load(name, split=["train", "test"], data_dir=data_dir, as_supervised=True)
    except Exception as error:  # tfds raises many kinds (ConnectionError, DatasetNotFoundError, ...)
        raise DataError(
            f"could not load {name!r} with tensorflow-datasets ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); pass --data-dir with a prepared copy"
            + (" or --npz with arrays" if name == "mnist" else "")
        ) from None
    # Batches rather than batch_size=-1, which aborts on datasets of unknown cardinality.
    return tuple(
        tuple(np.concatenate(parts) for parts in zip(*tfds.as_numpy(split.batch(8192))))
        for split in splits
    )


def run(args, data, name):
    """Train what the flags ask for, print the report, and return its rows."""
    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.logdir, exist_ok=True)
    if args.sweep_ranks:
        return sweep(args, data, name)
    rows = []
    if args.baseline:
        rows.append(train_and_measure(args, data, f"{name}_dense", ranks=None))
    rows.append(train_and_measure(args, data, f"{name}_gated", ranks=expand(args.ranks, args.hidden)))
    print(report_table(rows))
    return rows


def expand(ranks, hidden):
    return ranks * len(hidden) if len(ranks) == 1 else ranks


def build_network(input_dim, classes, args, ranks):
    """Fully connected ReLU network; hidden layers gated when `ranks` is given, Dense otherwise."""
    layers = [keras.Input((input_dim,))]
    for index, units in enumerate(args.hidden):
        regularizer = keras.regularizers.L1(args.l1) if args.l1 else None
        if ranks is None:
            layers.append(keras.layers.Dense(units, activation="relu", activity_regularizer=regularizer,
                                             name=f"hidden_{index}"))
        else:
            layers.append(LowRankGatedDense(units, rank=ranks[index], estimator=args.estimator,
                                            refit_every=args.refit_every, margin=args.margin,
                                            activity_regularizer=regularizer, name=f"hidden_{index}"))
        if args.dropout:
            layers.append(keras.layers.Dropout(args.dropout))
    layers.append(keras.layers.Dense(classes, name="logits"))
    model = keras.Sequential(layers)
    model.compile(
        keras.optimizers.Adam(args.learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def dense_twin(model):
    """The same network with every LowRankGatedDense replaced by Dense(relu) with its weights."""
    layers = [keras.Input(model.inputs[0].shape[1:])]
    for layer in model.layers:
        if isinstance(layer, LowRankGatedDense):
            dense = keras.layers.Dense(layer.units, activation="relu")
            dense.build((None, layer.kernel.shape[1]))
            dense.set_weights([layer.kernel.numpy().T, layer.bias.numpy()])
            layers.append(dense)
        else:
            layers.append(layer)
    return keras.Sequential(layers)


def inference_speedups(model, x):
    """Measured Dense-twin time over gated time for the whole network at batch 1 and 256."""
    twin = dense_twin(model)
    speedups = {}
    for batch in (1, 256):
        sample = tf.constant(np.resize(x, (batch,) + x.shape[1:]))
        times = median_times(
            {"dense": lambda v: twin(v, training=False), "gated": lambda v: model(v, training=False)},
            sample, repeats=7, calls=10,
        )
        speedups[batch] = times["dense"] / times["gated"]
    return speedups


def train_and_measure(args, data, run_name, ranks):
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(args.seed)
    model = build_network(x_train.shape[1], int(max(y_train.max(), y_test.max())) + 1, args, ranks)
    logdir = os.path.join(args.logdir, run_name)
    callbacks = [keras.callbacks.TensorBoard(logdir)]
    if ranks is not None:
        callbacks.append(GateSummaries(logdir, x_test))
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
              validation_data=(x_test, y_test), callbacks=callbacks, verbose=2)
    accuracy = model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    row = {"run": run_name, "rank": None if ranks is None else ",".join(map(str, ranks)),
           "test_error": 1.0 - accuracy, "layers": []}
    if ranks is not None:
        row["layers"] = measure_gates(model, x_test)
        row["cost_model_speedup"] = network_cost_speedup(model, row["layers"])
        row["measured_speedup"] = inference_speedups(model, x_test)
    return row


def network_cost_speedup(model, reports):
    """Whole-network multiply-adds, Dense over gated (the output layer counts in both)."""
    dense = gated = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            dense += layer.kernel.shape[0] * layer.kernel.shape[1]
            gated += layer.kernel.shape[0] * layer.kernel.shape[1]
    for report in reports:
        d, n, r = report["input_dim"], report["units"], report["rank"]
        dense += d * n
        gated += r * (d + n) + report["predicted_density"] * d * n
    return dense / gated


def report_table(rows):
    lines = [
        "| run | rank | test error | layer | recall | precision | predicted density | true density "
        "| cost-model speedup | measured speedup b=1 | b=256 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['run']} | {row['rank'] or '-'} | {100 * row['test_error']:.2f}% "
        if not row["layers"]:
            lines.append(head + "| - | - | - | - | - | - | - | - |")
            continue
        for report in row["layers"]:
            lines.append(
                head + f"| {report['layer']} | {report['recall']:.3f} | {report['precision']:.3f} "
                f"| {report['predicted_density']:.3f} | {report['true_density']:.3f} "
                f"| {report['cost_model_speedup']:.2f}x | | |"
            )
        lines.append(
            head + f"| whole network | | | | | {row['cost_model_speedup']:.2f}x "
            f"| {row['measured_speedup'][1]:.2f}x | {row['measured_speedup'][256]:.2f}x |"
        )
    return "\n".join(lines)


def sweep(args, data, name):
    """One model per rank: the paper-style table (Markdown, CSV) and a plot of error and speedup."""
    from tqdm import tqdm

    rows = []
    if args.baseline:
        rows.append(train_and_measure(args, data, f"{name}_dense", ranks=None))
    for rank in tqdm(args.sweep_ranks, desc="rank sweep", unit="model"):
        ranks = [min(rank, units) for units in args.hidden]
        rows.append(train_and_measure(args, data, f"{name}_rank{rank}", ranks=ranks))
    table = report_table(rows)
    print(table)
    with open(os.path.join(args.logdir, "sweep.md"), "w") as f:
        f.write(table + "\n")
    write_sweep_csv(rows, os.path.join(args.logdir, "sweep.csv"))
    plot_sweep(rows, args.sweep_ranks, os.path.join(args.logdir, "sweep.png"))
    print(f"wrote {args.logdir}/sweep.md, sweep.csv and sweep.png")
    return rows


def write_sweep_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "rank", "test_error", "mean_recall", "mean_predicted_density",
                         "cost_model_speedup", "measured_speedup_b1", "measured_speedup_b256"])
        for row in rows:
            layers = row["layers"]
            writer.writerow([
                row["run"], row["rank"] or "", f"{row['test_error']:.4f}",
                f"{np.mean([r['recall'] for r in layers]):.4f}" if layers else "",
                f"{np.mean([r['predicted_density'] for r in layers]):.4f}" if layers else "",
                f"{row['cost_model_speedup']:.3f}" if layers else "",
                f"{row['measured_speedup'][1]:.3f}" if layers else "",
                f"{row['measured_speedup'][256]:.3f}" if layers else "",
            ])


def plot_sweep(rows, ranks, path):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gated = [row for row in rows if row["layers"]]
    figure, error_axis = plt.subplots(figsize=(7, 4.5))
    error_axis.plot(ranks, [100 * r["test_error"] for r in gated], "o-", color="tab:red", label="gated test error")
    for row in rows:
        if not row["layers"]:
            error_axis.axhline(100 * row["test_error"], color="tab:red", linestyle=":", label="dense test error")
    error_axis.set_xlabel("estimator rank")
    error_axis.set_ylabel("test error (%)", color="tab:red")
    speed_axis = error_axis.twinx()
    speed_axis.plot(ranks, [r["cost_model_speedup"] for r in gated], "s--", color="tab:blue", label="cost-model speedup")
    speed_axis.plot(ranks, [r["measured_speedup"][1] for r in gated], "^-", color="tab:green", label="measured speedup, batch 1")
    speed_axis.set_ylabel("speedup over dense (x)")
    handles = error_axis.get_legend_handles_labels()[0] + speed_axis.get_legend_handles_labels()[0]
    error_axis.legend(handles, [h.get_label() for h in handles], loc="upper center", fontsize=8)
    error_axis.set_xscale("log")
    error_axis.set_xticks(ranks)
    error_axis.set_xticklabels([str(r) for r in ranks])
    error_axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    error_axis.set_title("Test error and speedup against estimator rank")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main_guard(main_function, argv):
    """Run an example's main; data problems end with one line on stderr and exit code 2."""
    try:
        return main_function(argv)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
