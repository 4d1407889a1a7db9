"""The examples' command line: one parser for the three scripts, and one-line errors for bad data."""

import argparse
import sys

from data import DataError


def int_list(text):
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


class ExampleParser(argparse.ArgumentParser):
    """Flags for data, network and training; with `ranks`, also those of the gated-network experiments.

    `dataset` (data.Dataset) words the --npz help; `hidden`, `epochs`, `l1` and `ranks` are the
    script's defaults. convert_mnist.py, which makes its gated layers from a trained Dense
    network, leaves `ranks` out and adds its own flags.
    """

    def __init__(self, description, dataset, hidden, epochs, l1, ranks=None):
        super().__init__(description=description)
        self.add_argument("--npz", default=None, help=f"arrays {dataset.describe_arrays()} instead of tfds; "
                          "a seeded quarter is held out as the test set")
        self.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory")
        self.add_argument("--seed", type=int, default=0, help="weights, shuffling and the --npz split")
        self.add_argument("--hidden", type=int_list, default=hidden, help="hidden layer sizes, e.g. 1000,1000")
        self.add_argument("--l1", type=float, default=l1, help="L1 activity penalty on hidden activations")
        self.add_argument("--dropout", type=float, default=0.0)
        self.add_argument("--epochs", type=int, default=epochs)
        self.add_argument("--batch-size", type=int, default=128)
        self.add_argument("--learning-rate", type=float, default=1e-3)
        self.experiment = ranks is not None
        if self.experiment:
            self.add_argument("--ranks", type=int_list, default=ranks,
                              help="estimator rank per hidden layer (one value: all)")
            self.add_argument("--estimator", choices=["svd", "joint"], default="svd")
            self.add_argument("--refit-every", type=int, default=200, help="training steps between SVD refits")
            self.add_argument("--margin", type=float, default=0.0, help="compute units with estimate > -margin")
            self.add_argument("--logdir", default="runs", help="TensorBoard logs, tables and plots go here")
            self.add_argument("--baseline", action="store_true", help="also train the same network with Dense layers")
            self.add_argument("--sweep-ranks", type=int_list, default=None,
                              help="train one model per rank, e.g. 5,10,20,50")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if self.experiment and len(parsed.ranks) not in (1, len(parsed.hidden)):
            self.error(
                f"--ranks needs 1 or {len(parsed.hidden)} values (one per hidden layer), "
                f"got {','.join(map(str, parsed.ranks))}"
            )
        return parsed


def main_guard(main_function, argv):
    """Run an example's main; data problems end with one line on stderr and exit code 2."""
    try:
        return main_function(argv)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
