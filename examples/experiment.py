"""Training what the flags ask for: gated networks (one per estimator) and the Dense baseline, once per seed;
or one gated network per rank."""

import os

import keras

import lrc_keras
from lrc_keras.audit import gated_layers
from lrc_keras import estimators
from lrc_keras.callbacks import GateSummaries

import measure
import models
import progress
import report


def run(args, dataset, data):
    """Train, print the report, write its files under --logdir, and return the runs (see report.py).

    Every seed trains the Dense baseline (with --baseline) and one gated network per estimator
    on the same split (--split-seed), so that seeds vary only initialisation and shuffling.
    """
    os.makedirs(args.logdir, exist_ok=True)
    print(f"this run writes to {args.logdir}/", flush=True)
    if args.sweep_ranks:
        return sweep(args, dataset, data)
    runs = []
    for seed in args.seeds:
        if args.baseline:
            runs.append(train_and_measure(args, dataset, data, seed))
        for estimator in args.estimators:
            runs.append(train_and_measure(args, dataset, data, seed, per_layer(args.ranks, args.hidden), estimator))
    summary = report.summarise(runs)
    print("\n" + report.summary_text(summary))
    print("\n".join(report.training_time_lines(runs, summary)))
    with open(os.path.join(args.logdir, "summary.md"), "w") as f:
        f.write(report.summary_table(summary) + "\n")
    report.write_summary_csv(summary, os.path.join(args.logdir, "summary.csv"))
    report.write_runs_csv(runs, os.path.join(args.logdir, "runs.csv"))
    report.plot_error_against_speedup(runs, os.path.join(args.logdir, "error_vs_speedup.png"))
    report.plot_gates_over_epochs(runs, os.path.join(args.logdir, "gates_over_epochs.png"))
    if report.plot_density_targets(runs, os.path.join(args.logdir, "density_targets.png")):
        print(f"\nwrote {args.logdir}/density_targets.png: each layer's density and penalty strength over epochs")
    print(f"\nwrote to {args.logdir}/: summary.md (the table as Markdown), summary.csv (mean and std over seeds), "
          "runs.csv (one line per run),\n  error_vs_speedup.png, gates_over_epochs.png, and TensorBoard logs: "
          f"tensorboard --logdir {args.logdir}")
    return runs


def sweep(args, dataset, data):
    """One gated network per rank: the paper-style table (Markdown, CSV) and a plot of error and speedup."""
    (seed,), (estimator,) = args.seeds, args.estimators
    runs = []
    if args.baseline:
        runs.append(train_and_measure(args, dataset, data, seed, name=f"{dataset.name}_dense"))
    for rank in args.sweep_ranks:
        ranks = [min(rank, units) for units in args.hidden]
        runs.append(train_and_measure(args, dataset, data, seed, ranks, estimator, name=f"{dataset.name}_rank{rank}"))
    table = report.run_table(runs)
    print("\n" + table)
    with open(os.path.join(args.logdir, "sweep.md"), "w") as f:
        f.write(table + "\n")
    report.write_runs_csv(runs, os.path.join(args.logdir, "sweep.csv"))
    report.plot_sweep(runs, args.sweep_ranks, os.path.join(args.logdir, "sweep.png"))
    report.plot_error_against_speedup(runs, os.path.join(args.logdir, "error_vs_speedup.png"))
    report.plot_gates_over_epochs(runs, os.path.join(args.logdir, "gates_over_epochs.png"))
    print(f"\nwrote to {args.logdir}/: sweep.md, sweep.csv, sweep.png, error_vs_speedup.png, gates_over_epochs.png, "
          f"and TensorBoard logs: tensorboard --logdir {args.logdir}")
    return runs


def per_layer(ranks, hidden):
    """--ranks (or --target-density) as one value per hidden layer (a single value applies to all)."""
    return ranks * len(hidden) if len(ranks) == 1 else ranks


def train_and_measure(args, dataset, data, seed, ranks=None, estimator=None, name=None):
    """Train one network, gated when `ranks` is given, and measure it on the test set.

    `estimator` None leaves the layer's default; `name` is the run's directory under --logdir
    (default: network, estimator and seed).
    """
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    if args.refit_every is not None:  # a setting of the estimator (joint has no refits)
        estimator = estimators.get(estimator or "input_svd")
        if hasattr(estimator, "refit_every"):
            estimator = type(estimator)(**{**estimator.get_config(), "refit_every": args.refit_every})
    # Flags left unset are not passed: the layer's defaults apply.
    gate_options = {key: value for key, value in
                    (("estimator", estimator), ("margin", args.margin),
                     ("regularize_skipped_units", args.regularize_skipped_units),
                     ("training_path", args.training_path))
                    if value is not None}
    # A gated layer's estimator starts from an SVD of its kernel: seconds for SVHN's 3072x4000 layer.
    with progress.Phase(f"\nbuilding the {'gated' if ranks else 'Dense'} network"):
        model = models.build_network(x_train.shape[1], dataset.classes, args.hidden, ranks, gate_options,
                                     l1=args.l1, dropout=args.dropout, learning_rate=args.learning_rate,
                                     target_densities=ranks and args.target_density and per_layer(
                                         args.target_density, args.hidden))
    gated = gated_layers(model)
    network = f"{dataset.name}_{'gated' if gated else 'dense'}"
    estimator = gated[0].estimator.name if gated else None
    name = name or "_".join([network] + ([estimator] if estimator else []) + [f"seed{seed}"])
    logdir = os.path.join(args.logdir, name)
    print(f"{name}: training {progress.describe(model)}, L1 {args.l1:g}, on {len(x_train)} rows, "
          f"testing on {len(x_test)}", flush=True)
    callbacks = [progress.TensorBoard(logdir)]
    if gated:
        # The gate rates are fit's validation metrics (audited below): GateSummaries adds the rest.
        callbacks.append(GateSummaries(logdir, x_test, rates=False))
        # Validation runs the inference path, which never computes z: audited, it measures
        # the val_* gate metrics (logs and TensorBoard) instead of reporting them as NaN.
        lrc_keras.set_audit(model, True)
    # Last, so that each epoch's time includes the other callbacks' work at its end.
    epoch_line = progress.EpochLine(args.epochs)
    callbacks.append(epoch_line)
    history = model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                        validation_data=(x_test, y_test), callbacks=callbacks, verbose=0)
    with progress.Phase(f"evaluating it on the {len(x_test)} test rows"):
        accuracy = model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    run = {"run": name, "network": network, "estimator": estimator, "seed": seed,
           "rank": None if ranks is None else ",".join(map(str, ranks)), "test_error": 1.0 - accuracy,
           "history": history.history, "epoch_seconds": epoch_line.training_seconds, "layers": [], "model": model}
    print(f"test error {100 * run['test_error']:.2f}%", flush=True)
    if gated:
        lrc_keras.set_audit(model, False)  # an audited network computes every unit: not what we time
        with progress.Phase("measuring its gates on the test set"):
            run["layers"] = lrc_keras.measure_gates(model, x_test)
        run["cost_model_speedup"] = measure.cost_model_speedup(model, run["layers"])
        with progress.Phase("measuring where its gated op beats the GEMM on this machine (once per layer shape)"):
            lrc_keras.crossover.measure(model)
        print("timing it against its Dense twin (speed-up in-graph, per call, per predict_on_batch):", flush=True)
        run["speed"] = measure.speedups(lrc_keras.to_dense(model), model, x_test, args.speed_batches,
                                        on_batch=lambda batch, result: print(
                                            f"  batch {batch}: " + ", ".join(
                                                f"{result[kind]:.2f}x" for kind in measure.SPEED_KINDS),
                                            flush=True))
    return run
