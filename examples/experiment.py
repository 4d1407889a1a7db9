"""Training what the flags ask for: the gated network and its Dense baseline, or one gated network per rank."""

import os

import keras

import lrc_keras
from lrc_keras.callbacks import GateSummaries

import measure
import models
import report


def run(args, dataset, data):
    """Train, print the report, write its files under --logdir, and return the runs (see report.py)."""
    os.makedirs(args.logdir, exist_ok=True)
    if args.sweep_ranks:
        return sweep(args, dataset, data)
    runs = []
    if args.baseline:
        runs.append(train_and_measure(args, dataset, data, f"{dataset.name}_dense", ranks=None))
    runs.append(train_and_measure(args, dataset, data, f"{dataset.name}_gated",
                                  ranks=per_layer(args.ranks, args.hidden)))
    print(report.run_table(runs))
    return runs


def sweep(args, dataset, data):
    """One gated network per rank: the paper-style table (Markdown, CSV) and a plot of error and speedup."""
    from tqdm import tqdm

    runs = []
    if args.baseline:
        runs.append(train_and_measure(args, dataset, data, f"{dataset.name}_dense", ranks=None))
    for rank in tqdm(args.sweep_ranks, desc="rank sweep", unit="model"):
        ranks = [min(rank, units) for units in args.hidden]
        runs.append(train_and_measure(args, dataset, data, f"{dataset.name}_rank{rank}", ranks=ranks))
    table = report.run_table(runs)
    print(table)
    with open(os.path.join(args.logdir, "sweep.md"), "w") as f:
        f.write(table + "\n")
    report.write_runs_csv(runs, os.path.join(args.logdir, "sweep.csv"))
    report.plot_sweep(runs, args.sweep_ranks, os.path.join(args.logdir, "sweep.png"))
    print(f"wrote {args.logdir}/sweep.md, sweep.csv and sweep.png")
    return runs


def per_layer(ranks, hidden):
    """--ranks as one rank per hidden layer (a single value applies to all)."""
    return ranks * len(hidden) if len(ranks) == 1 else ranks


def train_and_measure(args, dataset, data, network, ranks):
    """Train one network (gated when `ranks` is given) and measure it on the test set."""
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(args.seed)
    gate_options = {"estimator": args.estimator, "refit_every": args.refit_every, "margin": args.margin}
    model = models.build_network(x_train.shape[1], dataset.classes, args.hidden, ranks, gate_options,
                                 l1=args.l1, dropout=args.dropout, learning_rate=args.learning_rate)
    logdir = os.path.join(args.logdir, network)
    callbacks = [keras.callbacks.TensorBoard(logdir)]
    if ranks is not None:
        callbacks.append(GateSummaries(logdir, x_test))
        # Validation runs the inference path, which never computes z: audited, it measures
        # the val_* gate metrics (logs and TensorBoard) instead of reporting them as NaN.
        lrc_keras.set_audit(model, True)
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
              validation_data=(x_test, y_test), callbacks=callbacks, verbose=2)
    accuracy = model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    if ranks is not None:
        lrc_keras.set_audit(model, False)  # an audited network computes every unit: not what we time
    run = {"run": network, "network": network, "estimator": None, "seed": args.seed,
           "rank": None if ranks is None else ",".join(map(str, ranks)), "test_error": 1.0 - accuracy,
           "layers": [], "model": model}
    if ranks is not None:
        run["estimator"] = args.estimator
        run["layers"] = lrc_keras.measure_gates(model, x_test)
        run["cost_model_speedup"] = measure.cost_model_speedup(model, run["layers"])
        run["speed"] = measure.speedups(lrc_keras.to_dense(model), model, x_test)
    return run
