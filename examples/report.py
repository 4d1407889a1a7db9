"""Reporting trained runs: Markdown tables, CSV files, means and deviations over seeds, and the plots.

A run is a dict made by `experiment.train_and_measure`: "run" (its log directory), "network",
"estimator" (None for Dense), "seed", "rank", "test_error", "history" (`fit`'s logs per epoch),
"epoch_seconds" (each epoch's training time, from progress.EpochLine), "layers"
(lrc_keras.measure_gates reports; empty for Dense), and for gated runs
"cost_model_speedup" and "speed" (measure.speedups against the Dense twin: the reference is
"dense", the model "gated").
"""

import csv

import numpy as np

from measure import SPEED_KINDS

IDENTITY = ("network", "estimator", "seed", "rank")
LAYER_METRICS = ("recall", "predicted_density", "true_density")
SPEED_HEADINGS = {"in_graph": "in-graph", "call": "tf.function call", "predict": "predict_on_batch"}


def run_metrics(run):
    """The run's numbers by column name: what the per-run CSV holds and what is averaged over seeds."""
    metrics = {"test_error": run["test_error"], "training_seconds": float(np.sum(run["epoch_seconds"])),
               "first_epoch_seconds": float(run["epoch_seconds"][0])}
    for report in run["layers"]:
        metrics.update({f"{report['layer']}_{key}": report[key] for key in LAYER_METRICS})
        penalty = run["history"].get(f"{report['layer']}_density_penalty")
        if penalty:  # a density target's strength at the end of training
            metrics[f"{report['layer']}_density_penalty"] = penalty[-1]
    if run["layers"]:
        metrics["cost_model_speedup"] = run["cost_model_speedup"]
        for batch, speed in run["speed"].items():
            metrics.update({f"{kind}_speedup_b{batch}": speed[kind] for kind in SPEED_KINDS})
            for kind in SPEED_KINDS:
                metrics[f"{kind}_ms_b{batch}"] = 1e3 * speed["seconds"][kind]["model"]
                metrics[f"dense_{kind}_ms_b{batch}"] = 1e3 * speed["seconds"][kind]["reference"]
    return metrics


def write_runs_csv(runs, path):
    """One line per run; a gated run's columns are blank for Dense runs."""
    columns = list(dict.fromkeys(key for run in runs for key in run_metrics(run)))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", *IDENTITY, *columns])
        for run in runs:
            metrics = run_metrics(run)
            writer.writerow([run["run"], *(cell(run[key]) for key in IDENTITY),
                             *(cell(metrics.get(column)) for column in columns)])


def summarise(runs):
    """Runs grouped by (network, estimator), in first-seen order, each number's mean and deviation over seeds.

    The deviation is the sample standard deviation (ddof=1, as for a handful of seeds drawn from
    many); None when there is one seed.
    """
    groups = {}
    for run in runs:
        groups.setdefault((run["network"], run["estimator"]), []).append(run)
    summary = []
    for (network, estimator), members in groups.items():
        per_run = [run_metrics(run) for run in members]
        statistics = {}
        for key in per_run[0]:
            values = np.array([metrics[key] for metrics in per_run], np.float64)
            statistics[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None)
        summary.append({"network": network, "estimator": estimator, "seeds": [run["seed"] for run in members],
                        "layers": [report["layer"] for report in members[0]["layers"]],
                        "batches": list(members[0].get("speed", {})), "statistics": statistics})
    return summary


def paired_against_dense(runs):
    """Per gated (network, estimator): (mean, standard error, seeds) of its test error minus Dense's
    on the same seeds; empty without Dense runs."""
    dense = {run["seed"]: run["test_error"] for run in runs if not run["layers"]}
    differences = {}
    for run in runs:
        if run["layers"] and run["seed"] in dense:
            differences.setdefault((run["network"], run["estimator"]), []).append(run["test_error"] - dense[run["seed"]])
    return {key: (float(np.mean(values)), spread(values) / np.sqrt(len(values)), len(values))
            for key, values in differences.items()}


def training_time_lines(runs, summary):
    """Each network's training time (the sum of its epochs', validation left out) per epoch, and
    against Dense's where Dense was trained, then apart: the first epoch, which traces the train
    step (seconds on the project's small data sets, as long as several later epochs), and the later
    ones; the gated networks' error minus Dense's, paired by seed."""
    groups = {(group["network"], group["estimator"]): group["statistics"] for group in summary}
    dense = next((statistics for (_, estimator), statistics in groups.items() if estimator is None), None)
    paired = paired_against_dense(runs)
    epochs = len(runs[0]["epoch_seconds"])
    lines = []
    for (network, estimator), statistics in groups.items():
        name = network + (f", estimator {estimator}" if estimator else "")
        seconds, first = statistics["training_seconds"][0], statistics["first_epoch_seconds"][0]
        against_dense = dense is not None and statistics is not dense
        line = f"{name}: training {seconds / epochs:.2f} s/epoch"
        if against_dense:
            line += f" ({seconds / dense['training_seconds'][0]:.2f}x Dense's)"
        if epochs > 1:
            line += f"; epoch 1 (tracing included) {first:.2f} s"
            if against_dense:
                line += f" ({first / dense['first_epoch_seconds'][0]:.2f}x)"
            later = seconds - first
            line += f", later {later / (epochs - 1):.2f} s/epoch"
            if against_dense:
                line += f" ({later / (dense['training_seconds'][0] - dense['first_epoch_seconds'][0]):.2f}x)"
        if (network, estimator) in paired:
            mean, error, count = paired[(network, estimator)]
            line += f"; test error minus Dense's, paired over {count} seeds: {100 * mean:+.2f} ± {100 * error:.2f} pt (s.e.)"
        lines.append(line)
    return lines


def write_summary_csv(summary, path):
    """One line per network: how many seeds, and `<number>_mean` and `<number>_std` columns (runs.csv names the seeds)."""
    columns = list(dict.fromkeys(key for group in summary for key in group["statistics"]))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["network", "estimator", "seeds"]
                        + [f"{column}_{part}" for column in columns for part in ("mean", "std")])
        for group in summary:
            statistics = group["statistics"]
            writer.writerow([group["network"], cell(group["estimator"]), len(group["seeds"])]
                            + [cell(value) for column in columns for value in statistics.get(column, (None, None))])


def summary_table(summary):
    """Markdown: one line per network, every number as mean ± deviation over its seeds."""
    batches = list(dict.fromkeys(batch for group in summary for batch in group["batches"]))
    speed_heading = " / ".join(SPEED_HEADINGS[kind] for kind in SPEED_KINDS)
    lines = [
        "| network | estimator | seeds | test error (%) | recall (per layer) | predicted density | true density "
        "| cost-model speedup |" + "".join(f" speedup b={batch} ({speed_heading}) |" for batch in batches),
        "|---" * (8 + len(batches)) + "|",
    ]
    for group in summary:
        statistics = group["statistics"]

        def per_layer(key):
            return ", ".join(mean_std(*statistics[f"{layer}_{key}"], "{:.3f}") for layer in group["layers"])

        cells = [group["network"], group["estimator"] or "-", str(len(group["seeds"])),
                 mean_std(*statistics["test_error"], "{:.2f}", scale=100)]
        if group["layers"]:
            cells += [per_layer(key) for key in LAYER_METRICS]
            cells.append(mean_std(*statistics["cost_model_speedup"], "{:.2f}") + "x")
            cells += [" / ".join(mean_std(*statistics[f"{kind}_speedup_b{batch}"], "{:.2f}") + "x"
                                 for kind in SPEED_KINDS) for batch in batches]
        else:
            cells += ["-"] * (4 + len(batches))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_text(summary):
    """The summary for the terminal, no line over 200 characters: a few lines per network."""
    lines = []
    for group in summary:
        statistics = group["statistics"]
        seeds = len(group["seeds"])
        head = group["network"] + (f", estimator {group['estimator']}" if group["estimator"] else "")
        head += f" ({seeds} seed{'s' if seeds > 1 else ''}): test error {mean_std(*statistics['test_error'], '{:.2f}', 100)}%"
        if not group["layers"]:
            lines.append(head)
            continue
        lines.append(head + f", cost-model speedup {mean_std(*statistics['cost_model_speedup'], '{:.2f}')}x")
        for layer in group["layers"]:
            lines.append(f"  {layer}: " + ", ".join(
                f"{key.replace('_', ' ')} {mean_std(*statistics[f'{layer}_{key}'], '{:.3f}')}" for key in LAYER_METRICS))
        for batch in group["batches"]:
            lines.append(f"  speedup over Dense at batch {batch}: " + ", ".join(
                f"{mean_std(*statistics[f'{kind}_speedup_b{batch}'], '{:.2f}')}x {SPEED_HEADINGS[kind]}"
                for kind in SPEED_KINDS))
    return "\n".join(lines)


def run_table(runs):
    """Markdown: a line per gated layer of each run, and one for the whole network."""
    lines = [
        "| run | rank | test error | layer | recall | precision | predicted density | true density "
        "| cost-model speedup | in-graph speedup b=1 | b=256 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        head = f"| {run['run']} | {run['rank'] or '-'} | {100 * run['test_error']:.2f}% "
        if not run["layers"]:
            lines.append(head + "| - | - | - | - | - | - | - | - |")
            continue
        for report in run["layers"]:
            lines.append(
                head + f"| {report['layer']} | {report['recall']:.3f} | {report['precision']:.3f} "
                f"| {report['predicted_density']:.3f} | {report['true_density']:.3f} "
                f"| {report['cost_model_speedup']:.2f}x | | |"
            )
        speed = run["speed"]
        lines.append(
            head + f"| whole network | | | | | {run['cost_model_speedup']:.2f}x "
            f"| {speed_cell(speed, 1)} | {speed_cell(speed, 256)} |"
        )
    return "\n".join(lines)


def speed_cell(speed, batch):
    return f"{speed[batch]['in_graph']:.2f}x" if batch in speed else "-"


def speed_kinds_cell(speed_at_batch):
    """"in-graph / call / predict" speedups at one batch size (measure.speedups)."""
    return " / ".join(f"{speed_at_batch[kind]:.2f}x" for kind in SPEED_KINDS)


def plot_sweep(runs, ranks, path):
    """Test error and speedups against the estimator rank (log scale), Dense's error as a dotted line."""
    import matplotlib.ticker

    plt = _pyplot()
    gated = [run for run in runs if run["layers"]]
    figure, error_axis = plt.subplots(figsize=(7, 4.5))
    error_axis.plot(ranks, [100 * r["test_error"] for r in gated], "o-", color="tab:red", label="gated test error")
    for run in runs:
        if not run["layers"]:
            error_axis.axhline(100 * run["test_error"], color="tab:red", linestyle=":", label="dense test error")
    error_axis.set_xlabel("estimator rank")
    error_axis.set_ylabel("test error (%)", color="tab:red")
    speed_axis = error_axis.twinx()
    speed_axis.plot(ranks, [r["cost_model_speedup"] for r in gated], "s--", color="tab:blue", label="cost-model speedup")
    batch = min(gated[0]["speed"])
    speed_axis.plot(ranks, [r["speed"][batch]["in_graph"] for r in gated], "^-", color="tab:green",
                    label=f"in-graph speedup, batch {batch}")
    speed_axis.plot(ranks, [r["speed"][batch]["call"] for r in gated], "v-", color="tab:olive",
                    label=f"tf.function call speedup, batch {batch}")
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _groups(runs):
    """Runs by (network, estimator, rank), in first-seen order: one point or panel per network, over seeds."""
    groups = {}
    for run in runs:
        groups.setdefault((run["network"], run["estimator"], run["rank"]), []).append(run)
    return groups


def _label(network, estimator, rank, ranks_vary):
    if estimator is None:
        return "Dense"
    return f"{estimator}" + (f", rank {rank}" if ranks_vary else "")


def plot_error_against_speedup(runs, path, kinds=("in_graph", "call")):
    """Test error against measured speedup over Dense, one panel per batch size; error bars: std over seeds.

    Every panel on the same axes, which start at 0 % error and take in the 1x line (Dense sits at
    speedup 1 by definition: each gated network is timed against its Dense twin), so that a small
    difference looks small. Each gated network twice: timed in-graph (filled) and per tf.function
    call, fixed call overhead included (hollow).
    """
    plt = _pyplot()
    groups = _groups(runs)
    ranks_vary = len({rank for _, _, rank in groups if rank}) > 1
    batches = list(dict.fromkeys(batch for run in runs for batch in run.get("speed", {})))
    figure, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 4), squeeze=False, sharex=True,
                                sharey=True)
    for axis, batch in zip(axes[0], batches):
        for color, ((network, estimator, rank), members) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"],
                                                                 groups.items()):
            errors = 100 * np.array([run["test_error"] for run in members])
            for kind in kinds if members[0]["layers"] else kinds[:1]:
                speeds = np.array([run["speed"][batch][kind] if run["layers"] else 1.0 for run in members])
                label = _label(network, estimator, rank, ranks_vary) + (f", {SPEED_HEADINGS[kind]}"
                                                                        if members[0]["layers"] else "")
                axis.errorbar(speeds.mean(), errors.mean(), xerr=spread(speeds), yerr=spread(errors),
                              fmt="s" if estimator is None else "o", color=color, capsize=4, label=label,
                              markerfacecolor=color if kind == kinds[0] else "none")
        axis.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        axis.margins(0.15)
        axis.set_xlabel(f"speedup over Dense, batch {batch}")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylim(bottom=0.0)
    axes[0][0].set_ylabel("test error (%)")
    axes[0][0].legend(fontsize=8)
    seeds = max(len(members) for members in groups.values())
    figure.suptitle("Test error against measured speedup" + (f" (mean of {seeds} seeds; bars: std)" if seeds > 1
                                                             else " (1 seed)"))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_gates_over_epochs(runs, path):
    """Per gated network, each layer's recall and predicted density after every epoch, mean over seeds.

    The validation figures (measured on the test set when the run audited it), else the training ones.
    """
    plt = _pyplot()
    groups = {key: members for key, members in _groups(runs).items() if members[0]["layers"]}
    ranks_vary = len({rank for _, _, rank in groups}) > 1
    figure, axes = plt.subplots(1, len(groups), figsize=(max(7, 5 * len(groups)), 4), squeeze=False, sharey=True)
    for axis, ((network, estimator, rank), members) in zip(axes[0], groups.items()):
        layers = [report["layer"] for report in members[0]["layers"]]
        validation = members[0]["history"].get(f"val_{layers[0]}_recall")
        prefix = "val_" if validation is not None and not np.isnan(validation).any() else ""
        for index, layer in enumerate(layers):
            color = f"C{index}"
            for key, style, marker in (("recall", "-", "o"), ("predicted_density", "--", "s")):
                values = np.array([run["history"][f"{prefix}{layer}_{key}"] for run in members])
                epochs = np.arange(1, values.shape[1] + 1)
                axis.plot(epochs, values.mean(axis=0), style, marker=marker, markersize=4, color=color,
                          label=f"{layer} {key.replace('_', ' ')}")
                if len(members) > 1:
                    axis.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=color, alpha=0.15)
        axis.set_title(f"{network}, {_label(network, estimator, rank, ranks_vary)}", fontsize=10)
        axis.set_xlabel("epoch")
        axis.set_xticks(epochs[:: max(1, len(epochs) // 10)])
        axis.set_xlim(0.5, epochs[-1] + 0.5)
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(("test set" if prefix else "training batches") + ": recall, predicted density")
    axes[0][0].legend(fontsize=8)
    figure.suptitle("Gates over training: recall (solid, circles), predicted density (dashed, squares)"
                    + ("; band: seeds' range" if max(len(m) for m in groups.values()) > 1 else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_density_targets(runs, path):
    """Per gated network trained to a density target, each layer's predicted density (training batches,
    its target dotted) and its penalty's strength after every epoch, mean over seeds; False if none was."""
    plt = _pyplot()
    groups = {key: members for key, members in _groups(runs).items()
              if members[0]["layers"] and f"{members[0]['layers'][0]['layer']}_density_penalty" in members[0]["history"]}
    if not groups:
        return False
    figure, axes = plt.subplots(2, len(groups), figsize=(max(7, 5 * len(groups)), 6.5), squeeze=False, sharex=True)
    for column, ((network, estimator, rank), members) in enumerate(groups.items()):
        density_axis, strength_axis = axes[0][column], axes[1][column]
        for index, report in enumerate(members[0]["layers"]):
            layer = report["layer"]
            for axis, key in ((density_axis, "predicted_density"), (strength_axis, "density_penalty")):
                values = np.array([run["history"][f"{layer}_{key}"] for run in members])
                epochs = np.arange(1, values.shape[1] + 1)
                axis.plot(epochs, values.mean(axis=0), "o-", markersize=4, color=f"C{index}", label=layer)
                if len(members) > 1:
                    axis.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=f"C{index}", alpha=0.15)
            target = members[0]["model"].get_layer(layer).target_density.target
            density_axis.axhline(target, color=f"C{index}", linestyle=":", linewidth=1)
        density_axis.set_title(f"{network}, {_label(network, estimator, rank, False)}", fontsize=10)
        density_axis.set_ylabel("predicted density")
        density_axis.grid(alpha=0.3)
        strength_axis.set_yscale("log")
        strength_axis.set_ylabel("penalty strength")
        strength_axis.set_xlabel("epoch")
        strength_axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle("Each layer's density (dotted: its target) and L1 strength"
                    + ("; band: seeds' range" if max(len(m) for m in groups.values()) > 1 else ""), fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_stages(accuracies, speeds, path, kind="in_graph"):
    """convert_mnist.py's stages: test error of each, and the speedup over Dense of those that were timed.

    `accuracies`: {stage: test accuracy}, Dense first; `speeds`: {stage: measure.speedups result}.
    """
    plt = _pyplot()
    stages = list(accuracies)
    batches = list(next(iter(speeds.values())))
    figure, (error_axis, speed_axis) = plt.subplots(1, 2, figsize=(10, 4))
    bars = error_axis.bar(stages, [100 * (1 - accuracies[stage]) for stage in stages], color="tab:red")
    error_axis.bar_label(bars, fmt="%.2f")
    error_axis.set_ylabel("test error (%)")
    width = 0.8 / len(batches)
    for index, batch in enumerate(batches):
        values = [speeds[stage][batch][kind] if stage in speeds else (1.0 if stage == stages[0] else np.nan)
                  for stage in stages]
        bars = speed_axis.bar(np.arange(len(stages)) + (index - (len(batches) - 1) / 2) * width, values, width,
                              label=f"batch {batch}")
        speed_axis.bar_label(bars, fmt="%.2f")
    speed_axis.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    speed_axis.set_xticks(np.arange(len(stages)), stages)
    speed_axis.set_ylabel(f"speedup over Dense ({SPEED_HEADINGS[kind]})")
    speed_axis.legend(fontsize=8)
    figure.suptitle("Converting a trained Dense network: error and speed at each stage (blank: not timed)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def spread(values):
    """The sample standard deviation, 0 for a single value (one seed)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def mean_std(mean, std, number_format, scale=1.0):
    """"mean ± std" in `number_format`; the mean alone when there is no deviation (one seed)."""
    text = number_format.format(scale * mean)
    return text if std is None else f"{text} ± {number_format.format(scale * std)}"


def cell(value):
    """A CSV cell: blank for None, numbers to 6 significant digits (a float32 accuracy's 1 - 0.958 is
    0.041999995708465576 in full; the measurements are not that exact)."""
    if value is None:
        return ""
    return f"{float(value):.6g}" if isinstance(value, (float, np.floating)) else str(value)
