"""Make a trained dense MNIST network cheaper: convert, calibrate, fine-tune, compare.

    python examples/convert_mnist.py --npz digits.npz        # or tfds' mnist (--data-dir)

Trains a dense 784-1000-1000-10 ReLU network, converts its hidden layers to
LowRankGatedDense (lrc_keras.convert), chooses each layer's rank and margin for the
target recall on training inputs (lrc_keras.calibrate), fine-tunes for one epoch with
conditional training, and prints accuracy and inference speed at every stage.
"""

import argparse
import os
import sys

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import mnist  # noqa: E402

import lrc_keras  # noqa: E402
from lrc_keras.timing import median_times  # noqa: E402


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0, batch_size=256), axis=1) == y))


def speedup(reference, model, x, batch):
    sample = tf.constant(np.resize(x, (batch, x.shape[1])))
    times = median_times(
        {"reference": lambda v: reference(v, training=False), "model": lambda v: model(v, training=False)},
        sample, repeats=7, calls=10,
    )
    return times["reference"] / times["model"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", default=None, help="arrays x uint8 [N, 28, 28], y [N] instead of tfds")
    parser.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory")
    parser.add_argument("--hidden", type=common.int_list, default=[1000, 1000])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of dense training")
    parser.add_argument("--rank", type=int, default=20, help="rank given by convert (calibrate may change it)")
    parser.add_argument("--target-recall", type=float, default=0.99)
    parser.add_argument("--ranks", type=common.int_list, default=[5, 10, 20, 50, 100], help="calibration candidates")
    parser.add_argument("--fine-tune-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    splits = mnist.load_npz(args.npz, args.seed) if args.npz else common.load_tfds("mnist", args.data_dir)
    (x_train, y_train), (x_test, y_test) = (mnist.prepare(split) for split in splits)

    dense = keras.Sequential(
        [keras.Input((784,))]
        + [keras.layers.Dense(units, activation="relu", name=f"hidden_{i}") for i, units in enumerate(args.hidden)]
        + [keras.layers.Dense(10)]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dense.compile(keras.optimizers.Adam(1e-3), loss)
    dense.fit(x_train, y_train, batch_size=128, epochs=args.epochs, verbose=2)

    converted = lrc_keras.convert(dense, rank=args.rank)
    # calibrate changes `converted` in place: measure each stage before the next.
    results = {"dense": accuracy(dense, x_test, y_test), "converted": accuracy(converted, x_test, y_test)}
    report = lrc_keras.calibrate(converted, x_train, target_recall=args.target_recall, ranks=args.ranks)
    print(report)
    results["calibrated"] = accuracy(converted, x_test, y_test)
    calibrated_speed = {batch: speedup(dense, converted, x_test, batch) for batch in (1, 256)}
    converted.compile(keras.optimizers.Adam(1e-4), loss)
    converted.fit(x_train, y_train, batch_size=128, epochs=args.fine_tune_epochs, verbose=2)
    results["fine-tuned"] = accuracy(converted, x_test, y_test)
    tuned_speed = {batch: speedup(dense, converted, x_test, batch) for batch in (1, 256)}
    densities = [row["predicted_density"] for row in lrc_keras.measure_gates(converted, x_test)]

    print("| stage | test accuracy | speedup over dense, batch 1 | batch 256 |")
    print("|---|---|---|---|")
    print(f"| dense | {results['dense']:.4f} | 1.00x | 1.00x |")
    print(f"| converted (rank {args.rank}, margin 0) | {results['converted']:.4f} | | |")
    print(f"| calibrated (recall {args.target_recall}) | {results['calibrated']:.4f} "
          f"| {calibrated_speed[1]:.2f}x | {calibrated_speed[256]:.2f}x |")
    print(f"| fine-tuned {args.fine_tune_epochs} epoch(s) | {results['fine-tuned']:.4f} "
          f"| {tuned_speed[1]:.2f}x | {tuned_speed[256]:.2f}x |")
    print("predicted density per gated layer on the test set after fine-tuning:",
          ", ".join(f"{d:.3f}" for d in densities))
    return {"accuracy": results, "speedup_calibrated": calibrated_speed, "speedup_fine_tuned": tuned_speed,
            "report": report, "densities": densities}


if __name__ == "__main__":
    common.main_guard(main, None)
