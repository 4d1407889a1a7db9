"""Make a trained dense MNIST network cheaper: convert, calibrate, fine-tune, compare.

    python examples/convert_mnist.py --npz digits.npz        # or tfds' mnist (--data-dir)

Trains a dense 784-1000-1000-10 ReLU network, converts its hidden layers to
LowRankGatedDense (lrc_keras.convert), chooses each layer's rank and margin for the
target recall on training inputs (lrc_keras.calibrate), fine-tunes for one epoch with
conditional training, and prints accuracy and inference speed at every stage.
"""

import os
import sys

import lrc_keras

if __name__ == "__main__":
    # Before the modules below import TensorFlow: its C++ logs at warning level and above (unless
    # TF_CPP_MIN_LOG_LEVEL says otherwise), and its start-up banner is held back.
    lrc_keras.quiet_start()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # noqa: E402
import data  # noqa: E402
import measure  # noqa: E402
import models  # noqa: E402
import progress  # noqa: E402
import report  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402


BATCHES = (1, 256)


def accuracy(model, x, y, batch_size=1024):
    """Test accuracy from eager calls: Keras' predict would trace a function for every stage's model,
    and TensorFlow warns about retracing when one code path is traced that often."""
    logits = np.concatenate([model(x[start:start + batch_size], training=False).numpy()
                             for start in range(0, len(x), batch_size)])
    return float(np.mean(np.argmax(logits, axis=1) == y))


def main(argv=None):
    parser = cli.ExampleParser(__doc__.splitlines()[0], data.MNIST, hidden=[1000, 1000], epochs=10, l1=0.0)
    parser.add_argument("--rank", type=int, default=20, help="rank given by convert (calibrate may change it)")
    parser.add_argument("--target-recall", type=float, default=0.99,
                        help="recall of the active units that calibrate chooses each layer's margin for")
    parser.add_argument("--ranks", type=cli.int_list, default="5,10,20,50,100",
                        help="candidate ranks; calibrate keeps the cheapest that reaches the target recall")
    parser.add_argument("--fine-tune-epochs", type=int, default=1, help="epochs of gated training after calibration")
    parser.add_argument("--logdir", default=None, help="where the plot of the stages goes (default: a new folder for "
                        "each run, runs/convert_mnist-<date>-<time>)")
    args = parser.parse_args(argv)
    args.logdir = args.logdir or cli.run_folder("convert_mnist")
    (x_train, y_train), (x_test, y_test) = data.load(data.MNIST, args.npz, args.data_dir, args.split_seed)
    keras.utils.set_random_seed(args.seed)

    dense = models.build_network(x_train.shape[1], data.MNIST.classes, args.hidden, l1=args.l1,
                                 dropout=args.dropout, learning_rate=args.learning_rate)
    print(f"dense: training {progress.describe(dense)} on {len(x_train)} rows, testing on {len(x_test)}", flush=True)
    dense.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=0,
              callbacks=[progress.EpochLine(args.epochs)])

    # The training digits are the inputs the default (input-aware) estimator fits to.
    converted = lrc_keras.convert(dense, rank=args.rank, sample_inputs=x_train)
    print(f"\nconverted to {progress.describe(converted)}; calibrating it for recall {args.target_recall} on "
          "the training digits", flush=True)
    # calibrate changes `converted` in place: measure each stage before the next.
    results = {"dense": accuracy(dense, x_test, y_test), "converted": accuracy(converted, x_test, y_test)}
    calibration = lrc_keras.calibrate(converted, x_train, target_recall=args.target_recall, ranks=args.ranks)
    print(calibration)
    results["calibrated"] = accuracy(converted, x_test, y_test)
    calibrated_speed = measure.speedups(dense, converted, x_test, BATCHES)
    # A tenth of the training rate: the conditional network starts close to its optimum.
    models.compile_for_classification(converted, args.learning_rate / 10)
    print(f"\nfine-tuning {progress.describe(converted)}", flush=True)
    converted.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.fine_tune_epochs, verbose=0,
                  callbacks=[progress.EpochLine(args.fine_tune_epochs)])
    results["fine-tuned"] = accuracy(converted, x_test, y_test)
    tuned_speed = measure.speedups(dense, converted, x_test, BATCHES)
    densities = [row["predicted_density"] for row in lrc_keras.measure_gates(converted, x_test)]

    kinds = " / ".join(report.SPEED_HEADINGS[kind] for kind in measure.SPEED_KINDS)
    print("\n| stage | test accuracy |" + "".join(f" speedup over dense b={batch} ({kinds}) |" for batch in BATCHES))
    print("|---|---|" + "---|" * len(BATCHES))
    print(f"| dense | {results['dense']:.4f} |" + " 1x |" * len(BATCHES))
    print(f"| converted (rank {args.rank}, margin 0) | {results['converted']:.4f} |" + " |" * len(BATCHES))
    stages = (("calibrated", f"calibrated (recall {args.target_recall})", calibrated_speed),
              ("fine-tuned", f"fine-tuned {args.fine_tune_epochs} epoch(s)", tuned_speed))
    for stage, label, speed in stages:
        print(f"| {label} | {results[stage]:.4f} |"
              + "".join(f" {report.speed_kinds_cell(speed[batch])} |" for batch in BATCHES))
    print("predicted density per gated layer on the test set after fine-tuning:",
          ", ".join(f"{d:.3f}" for d in densities))
    os.makedirs(args.logdir, exist_ok=True)
    plot = os.path.join(args.logdir, "convert_mnist.png")
    report.plot_stages(results, {"calibrated": calibrated_speed, "fine-tuned": tuned_speed}, plot)
    print(f"wrote {plot}")
    return {"accuracy": results, "speedup_calibrated": calibrated_speed, "speedup_fine_tuned": tuned_speed,
            "report": calibration, "densities": densities, "models": {"dense": dense, "fine-tuned": converted},
            "plot": plot}


if __name__ == "__main__":
    cli.main_guard(main, None)
