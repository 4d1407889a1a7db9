"""python benchmarks/benchmark.py: gated inference (or, with --training, a training step) against Dense.

For each layer shape, batch size and predicted density ρ (set exactly through the margin), it
times Dense and LowRankGatedDense inference inside tf.function (enough calls per graph that the
Python call is ~1% of it, the two interleaved, median of repeats), and prints and saves the ratio
next to the cost model's limit d·n / (r·(d + n) + ρ·d·n). With --npz (MNIST digits), it also trains a 784-1000-1000-10 gated
network with an L1 activity penalty and benchmarks its two hidden layers on their real inputs.
Where TensorFlow sees a GPU, the synthetic rows are measured there too, labelled "GPU".

With --training it times a training step instead (`train_on_batch`, L1 1e-3 activity penalty,
batch 128) of the paper's two networks, 784-1000-1000-10 at rank 20 and 3072-4000-2000-1000-10 at
ranks 50/40/30, for the Dense twin, a gated network per estimator (training_path "dense") and
the default estimator on training_path "gated", all interleaved in rounds so that drift on the
machine reaches every network alike. The gated path's time follows the density, so with --npz
the 784 network trains every variant on the digits first (--pretrain-epochs) and times steps on
digit batches at the densities training reached, printed beside; the 3072 network times fixed
random inputs at its initial densities. The timed steps run with the learning rate set to 0, so
the densities stay those; the estimators keep their upkeep and refits. Refits are
rare, expensive steps, so each network's figure is its mean step over all rounds: the default
20 rounds of 20 steps (after 3 untimed) hold the svd estimator's refits at steps 200 and 400 and
input_svd's every ~55 steps in proportion. The median of the per-round means is printed beside.
"""

import lrc_keras

if __name__ == "__main__":
    # Before TensorFlow's import: its C++ logs at warning level and above (unless TF_CPP_MIN_LOG_LEVEL
    # says otherwise), and its start-up banner is held back.
    lrc_keras.quiet_start()

import argparse
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from lrc_keras import LowRankGatedDense, crossover, ops
from lrc_keras.gating import margin_for_density
from lrc_keras.timing import MIN_GRAPH_SECONDS, median_times
from lrc_keras.cost import cost_model_speedup

SHAPES = ((784, 1000, 20), (1000, 1000, 20), (3072, 4000, 50))
BATCHES = (1, 16, 256)
DENSITIES = (0.05, 0.1, 0.25, 0.5)


def time_pair(dense, gated, x, repeats, calls):
    times = median_times({"dense": dense, "gated": gated}, tf.constant(x), repeats, calls)
    return times["dense"], times["gated"]


def benchmark_layer(dense, gated, x, density, label, repeats, calls):
    """One table row: density None keeps the layer's own margin (a trained layer)."""
    if density is not None:
        gated.margin = margin_for_density(gated.gate(x)[0].numpy(), density)
    # What inference_path="auto" compares with the crossover, which this machine's measurement sets.
    gated.observed_density.assign(float(np.mean(gated.gate(x)[1])))
    crossover.measure(gated)
    dense_time, gated_time = time_pair(dense, gated, x, repeats, calls)
    observed = float(gated.observed_density.numpy())
    input_dim, units = gated.kernel.shape[1], gated.units
    return {
        "layer": label,
        "batch": int(x.shape[0]),
        "density": round(observed, 4),
        "dense_us": dense_time * 1e6,
        "gated_us": gated_time * 1e6,
        "speedup": dense_time / gated_time,
        "cost_model_limit": cost_model_speedup(input_dim, units, gated.rank, observed),
    }


def synthetic_rows(rng, repeats, calls, device_label=""):
    rows = []
    for input_dim, units, rank in SHAPES:
        dense = keras.layers.Dense(units, activation="relu")
        dense.build((None, input_dim))
        gated = LowRankGatedDense.from_dense(dense, rank)
        for batch in BATCHES:
            x = rng.standard_normal((batch, input_dim)).astype(np.float32)
            for density in DENSITIES:
                label = f"{device_label}{input_dim}->{units} r={rank}"
                rows.append(benchmark_layer(dense, gated, x, density, label, repeats, calls))
                print(format_row(rows[-1]), flush=True)
    return rows


def trained_rows(npz, rng, repeats, calls, l1=3e-4, epochs=10):
    x, labels = mnist_arrays(npz)
    model = keras.Sequential(
        [keras.Input((784,))]
        + [LowRankGatedDense(1000, rank=20, activity_regularizer=keras.regularizers.L1(l1)) for _ in range(2)]
        + [keras.layers.Dense(10)]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, labels, batch_size=128, epochs=epochs, verbose=0)
    rows = []
    inputs = x
    for layer in model.layers[:2]:
        dense = keras.layers.Dense(layer.units, activation="relu")
        dense.build((None, inputs.shape[1]))
        dense.set_weights([layer.kernel.numpy().T, layer.bias.numpy()])
        for batch in BATCHES:
            batch_x = inputs[rng.choice(len(inputs), batch, replace=False)]
            label = f"trained {inputs.shape[1]}->{layer.units} r={layer.rank} (L1 {l1})"
            rows.append(benchmark_layer(dense, layer, batch_x, None, label, repeats, calls))
            print(format_row(rows[-1]), flush=True)
        inputs = layer(inputs).numpy()
    return rows


TRAINING_NETWORKS = (
    ("784-1000-1000-10", (784, 1000, 1000, 10), (20, 20)),
    ("3072-4000-2000-1000-10", (3072, 4000, 2000, 1000, 10), (50, 40, 30)),
)
# Variant: (estimator, training_path) of the gated layers; "dense" is the Dense twin.
TRAINING_VARIANTS = {
    "dense": None,
    "input_svd": ("input_svd", "dense"),
    "svd": ("svd", "dense"),
    "joint": ("joint", "dense"),
    "gated": ("input_svd", "gated"),
    "auto": ("input_svd", "auto"),
}


def training_network(shape, ranks, variant):
    """The Dense twin (variant "dense") or a gated network with `variant`'s estimator and path."""
    layers = [keras.Input((shape[0],))]
    for units, rank in zip(shape[1:-1], ranks):
        penalty = keras.regularizers.L1(1e-3)
        if variant == "dense":
            layers.append(keras.layers.Dense(units, activation="relu", activity_regularizer=penalty))
        else:
            estimator, training_path = TRAINING_VARIANTS[variant]
            layers.append(LowRankGatedDense(units, rank=rank, estimator=estimator, training_path=training_path,
                                            activity_regularizer=penalty))
    layers.append(keras.layers.Dense(shape[-1]))
    model = keras.Sequential(layers)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def training_steps(shape, ranks, data, rounds, steps, pretrain_epochs=0, batch=128, variants=tuple(TRAINING_VARIANTS)):
    """{variant: (mean seconds a step over all rounds, median of the rounds' means, densities)}.

    `data` is (x, y); with `pretrain_epochs`, every network first fits it for that many epochs.
    The timed steps cycle through 20 fixed batches of it.
    """
    x, y = data
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(x), batch, replace=False) for _ in range(20)]
    models = {}
    for variant in variants:
        keras.utils.set_random_seed(0)
        models[variant] = training_network(shape, ranks, variant)
        if pretrain_epochs:
            models[variant].fit(x, y, batch_size=batch, epochs=pretrain_epochs, verbose=0)
    for model in models.values():  # trace, and take Adam's first steps out of the timing
        for rows in batches[:3]:
            model.train_on_batch(x[rows], y[rows])
        # The same work a step, but weights that stay where training left them: 400 more steps
        # on 20 batches would keep making the layers sparser, and the gated path cheaper.
        model.optimizer.learning_rate.assign(0.0)
    rounds_seconds = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant, model in models.items():
            start = time.perf_counter()
            for step in range(steps):
                rows = batches[step % len(batches)]
                model.train_on_batch(x[rows], y[rows])
            rounds_seconds[variant].append((time.perf_counter() - start) / steps)
    return {variant: (float(np.mean(times)), float(np.median(times)), predicted_densities(models[variant], x[:1000]))
            for variant, times in rounds_seconds.items()}


def predicted_densities(model, x):
    """The fraction of units each gated layer computes on x (empty for the Dense twin)."""
    return [round(float(np.mean(layer.gate(inputs)[1])), 3) for layer, inputs in _gated_layers_and_inputs(model, x)]


def _gated_layers_and_inputs(model, x):
    inputs = tf.constant(x)
    for layer in model.layers:
        if isinstance(layer, LowRankGatedDense):
            yield layer, inputs
        inputs = layer(inputs)


def training_rows(rng, rounds, steps, npz=None, pretrain_epochs=10):
    rows = []
    for label, shape, ranks in TRAINING_NETWORKS:
        pretrain = 0
        if npz and shape[0] == 784:
            data, pretrain = mnist_arrays(npz), pretrain_epochs
        else:
            data = (rng.random((1024, shape[0]), np.float32), rng.integers(0, shape[-1], 1024))
        times = training_steps(shape, ranks, data, rounds, steps, pretrain)
        dense_mean, dense_median, _ = times["dense"]
        row = {"network": label, "ranks": list(ranks), "dense_ms": dense_mean * 1e3,
               "dense_median_ms": dense_median * 1e3, "rounds": rounds, "steps": steps,
               "data": f"digits, after {pretrain} epochs" if pretrain else "random"}
        for variant in list(TRAINING_VARIANTS)[1:]:
            row[f"{variant}_ratio"] = times[variant][0] / dense_mean
            row[f"{variant}_median_ratio"] = times[variant][1] / dense_median
            row[f"{variant}_densities"] = times[variant][2]
        rows.append(row)
        print(format_training_row(row), flush=True)
    return rows


def mnist_arrays(npz):
    data = np.load(npz)
    return data["x"].reshape(len(data["x"]), -1).astype(np.float32) / 255.0, data["y"].astype(np.int64)


def format_training_row(row):
    cells = " | ".join(
        f"{row[f'{v}_ratio']:.2f}x ({row[f'{v}_median_ratio']:.2f}x) ρ {'/'.join(map(str, row[f'{v}_densities']))}"
        for v in list(TRAINING_VARIANTS)[1:]
    )
    return f"| {row['network']}, ranks {'/'.join(map(str, row['ranks']))}, {row['data']} | {row['dense_ms']:.1f} | {cells} |"


TRAINING_HEADER = (
    "| network, data | Dense step ms | input_svd, dense path | svd, dense path | joint, dense path "
    "| input_svd, gated path | input_svd, auto (the default) |\n"
    "|---|---|---|---|---|---|---|"
)


def format_row(row):
    return (
        f"| {row['layer']} | {row['batch']} | {row['density']:.3f} | {row['dense_us']:.0f} | "
        f"{row['gated_us']:.0f} | {row['speedup']:.2f}x | {row['cost_model_limit']:.2f}x |"
    )


HEADER = (
    "| layer | batch | predicted density | Dense µs | gated µs | speedup | cost-model limit |\n"
    "|---|---|---|---|---|---|---|"
)


# Each mode's own options and their defaults: giving one to the other mode is an error, not silently ignored.
MODE_OPTIONS = {"inference": {"repeats": 9, "calls": 20}, "training": {"rounds": 20, "steps": 20, "pretrain_epochs": 10}}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/benchmark.py", description=__doc__.split("\n")[0])
    parser.add_argument("--npz", default=None,
                        help="MNIST arrays (x uint8 [N, 28, 28], y [N]) for the trained-layer rows, and with "
                        "--training for training the 784 network before timing it (default: none, synthetic "
                        "inputs only)")
    parser.add_argument("--out", default=None,
                        help="where to save the table as JSON (default: benchmark_inference.json, or "
                        "benchmark_training.json with --training)")
    inference, training = (MODE_OPTIONS[mode] for mode in ("inference", "training"))
    group = parser.add_argument_group("inference (the default mode)",
                                      "gated layers against Dense, per shape, batch size and density")
    group.add_argument("--repeats", type=int, default=None,
                       help=f"timed graphs per row; the median is reported (default: {inference['repeats']})")
    group.add_argument("--calls", type=int, default=None,
                       help=f"fewest calls per timed graph, more where the graph would run under "
                       f"{MIN_GRAPH_SECONDS * 1e3:g} ms (default: {inference['calls']})")
    group = parser.add_argument_group("training (--training)", "a training step of 784-1000-1000-10 at rank 20 and "
                                      "3072-4000-2000-1000-10 at ranks 50/40/30, against their Dense twins")
    group.add_argument("--training", action="store_true", help="time training steps instead of inference")
    group.add_argument("--rounds", type=int, default=None,
                       help=f"interleaved rounds (default: {training['rounds']})")
    group.add_argument("--steps", type=int, default=None,
                       help=f"timed steps per network per round (default: {training['steps']})")
    group.add_argument("--pretrain-epochs", type=int, default=None,
                       help="with --npz: epochs every 784 network fits on the digits before timing "
                       f"(default: {training['pretrain_epochs']})")
    args = parser.parse_args(argv)
    mode = "training" if args.training else "inference"
    for other, options in MODE_OPTIONS.items():
        given = [f"--{key.replace('_', '-')}" for key in options if getattr(args, key) is not None]
        if other != mode and given:
            parser.error(f"{given[0]} belongs to the {other} mode" + (", not to --training" if args.training
                                                                        else "; add --training"))
    for key, default in MODE_OPTIONS[mode].items():
        setattr(args, key, default if getattr(args, key) is None else getattr(args, key))
    args.out = args.out or f"benchmark_{mode}.json"
    if not ops.is_compiled():
        parser.error("the compiled op is not loaded; the benchmark would only time the pure-TF path")
    rng = np.random.default_rng(0)
    if args.training:
        print("training step time against the Dense twin: mean over all steps (median of rounds)")
        print(TRAINING_HEADER)
        rows = training_rows(rng, args.rounds, args.steps, args.npz, args.pretrain_epochs)
        with open(args.out, "w") as f:
            json.dump({"tensorflow": tf.__version__, "cpus": os.cpu_count(), "training_rows": rows}, f, indent=1)
        print(f"saved {args.out}")
        return
    print(HEADER)
    with tf.device("/CPU:0"):
        rows = synthetic_rows(rng, args.repeats, args.calls)
        if args.npz:
            rows += trained_rows(args.npz, rng, args.repeats, args.calls)
    if tf.config.list_logical_devices("GPU"):
        with tf.device("/GPU:0"):
            rows += synthetic_rows(rng, args.repeats, args.calls, device_label="GPU ")
    with open(args.out, "w") as f:
        json.dump({"tensorflow": tf.__version__, "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    print(f"saved {args.out}; lowest speedup {min(r['speedup'] for r in rows):.2f}x")


if __name__ == "__main__":
    main()
