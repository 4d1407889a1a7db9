"""The examples' command line: one parser for the three scripts, and one-line errors for bad data."""

import argparse
import inspect
import os
import sys
import textwrap
import time

from lrc_keras import LowRankGatedDense
from lrc_keras import estimators
from lrc_keras.dispatch import GATED_TRAINING_MAX_DENSITY
from lrc_keras.dispatch import TRAINING_PATHS
from lrc_keras.estimators import ESTIMATORS

from data import DataError
from measure import SPEED_BATCHES


def integers(text, minimum, expected):
    """Comma-separated integers, each at least `minimum`; else an error saying what was `expected`."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return values


def int_list(text):
    return integers(text, 1, "comma-separated positive integers")


def positive_int(text):
    values = integers(text, 1, "a positive integer")
    if len(values) > 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return values[0]


def seed_list(text):
    values = integers(text, 0, "distinct non-negative integers")
    if len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers, got {text!r}")
    return values


def density_list(text):
    """Comma-separated densities, each in (0, 1]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < value <= 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], got {text!r}")
    return values


def estimator_list(text):
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in ESTIMATORS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected estimators from {', '.join(ESTIMATORS)}, got {(unknown or [text])[0]!r}")
    return names


def comma_separated(values):
    """A list default as it is typed on the command line (argparse converts it with the flag's type)."""
    return ",".join(map(str, values))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help, except where there is none to show (None, False) or the help says it;
    lines wrapped between words only, so that no flag's name is cut at its hyphen."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class ExampleParser(argparse.ArgumentParser):
    """Flags for data, network and training; with `ranks`, also those of the gated-network experiments.

    `dataset` (data.Dataset) words the --npz help; `hidden`, `epochs`, `l1` and `ranks` are the
    script's defaults, `ranks` those of its default network (`default_ranks` fits them to
    another --hidden). convert_mnist.py, which makes its gated layers from a trained Dense
    network, leaves `ranks` out and adds its own flags.
    """

    def __init__(self, description, dataset, hidden, epochs, l1, ranks=None):
        super().__init__(description=description, formatter_class=HelpFormatter)
        self.experiment = ranks is not None
        self.dataset_name = dataset.name
        self.default_ranks = ranks
        self.add_argument("--npz", default=None, help=f"arrays {dataset.describe_arrays()} instead of "
                          "tensorflow-datasets; a quarter chosen by --split-seed is held out as the test set")
        self.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory (default: its own)")
        self.add_argument("--seed", type=int, default=0, help="seed of the weights and the shuffling")
        self.add_argument("--split-seed", type=int, default=0,
                          help="which quarter of --npz is held out" + ("; fixed while --seeds vary"
                                                                      if self.experiment else ""))
        self.add_argument("--hidden", type=int_list, default=comma_separated(hidden), help="hidden layer sizes")
        self.add_argument("--l1", type=float, default=l1, help="L1 activity penalty on hidden activations")
        self.add_argument("--dropout", type=float, default=0.0, help="dropout rate after each hidden layer")
        self.add_argument("--epochs", type=int, default=epochs, help="training epochs")
        self.add_argument("--batch-size", type=int, default=128, help="training batch size")
        self.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's learning rate")
        if self.experiment:
            self.add_argument("--ranks", type=int_list, default=None,
                              help="estimator rank per hidden layer, or one value for all (default: "
                              f"{comma_separated(ranks)} by position, the last repeated for more layers, each at "
                              "most a quarter of its layer's units)")
            layer = {name: parameter.default for name, parameter in inspect.signature(LowRankGatedDense).parameters.items()}
            self.add_argument("--estimator", dest="estimators", type=estimator_list, default=[None],
                              metavar="NAMES", help="one gated network per estimator, comma-separated, from: "
                              f"{', '.join(ESTIMATORS)} (default: {layer['estimator']})")
            self.add_argument("--refit-every", type=positive_int, default=None,
                              help="training steps between the estimator's refits of U and V (joint has none, "
                              f"its factors train by gradient) (default: each estimator's own: {refit_defaults()})")
            self.add_argument("--margin", type=float, default=None,
                              help=f"compute units with estimate > -margin (default: {layer['margin']})")
            self.add_argument("--training-path", choices=TRAINING_PATHS, default=None,
                              help="how the gated layers train: the compiled gated kernels, a GEMM then the mask, "
                              f"or auto, the gated kernels while a layer's density is at most {GATED_TRAINING_MAX_DENSITY} (default: "
                              f"{layer['training_path']})")
            self.add_argument("--gated-output-penalty", dest="regularize_skipped_units", action="store_const",
                              const=False, default=None,
                              help="charge --l1 on the gated output only, as the paper does (default: also on "
                              "the active units the gate skipped)")
            self.add_argument("--target-density", type=density_list, default=None,
                              help="train the gated layers to this predicted density, one value for all or one per "
                              "hidden layer: an L1 activity penalty whose strength adapts in training, added to --l1's "
                              "(default: no target)")
            self.add_argument("--seeds", type=seed_list, default=None,
                              help="train every network once per seed, e.g. 0,1,2, and report mean ± std "
                              "(default: --seed; --seeds overrides it)")
            self.add_argument("--speed-batches", type=int_list, default=comma_separated(SPEED_BATCHES),
                              help="batch sizes at which the speed is measured")
            self.add_argument("--logdir", default=None, help="this run's TensorBoard logs, tables and plots go here "
                              f"(default: a new folder for each run, runs/{dataset.name}-<date>-<time>)")
            self.add_argument("--baseline", action="store_true", help="also train the same network with Dense layers")
            self.add_argument("--sweep-ranks", type=int_list, default=None,
                              help="train one model per rank, e.g. 5,10,20,50")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if not self.experiment:
            return parsed
        if parsed.ranks is None:
            parsed.ranks = default_ranks(self.default_ranks, parsed.hidden)
        if len(parsed.ranks) not in (1, len(parsed.hidden)):
            self.error(
                f"--ranks needs 1 or {len(parsed.hidden)} values (one per hidden layer), "
                f"got {','.join(map(str, parsed.ranks))}"
            )
        if parsed.target_density and len(parsed.target_density) not in (1, len(parsed.hidden)):
            self.error(
                f"--target-density needs 1 or {len(parsed.hidden)} values (one per hidden layer), "
                f"got {','.join(map(str, parsed.target_density))}"
            )
        parsed.seeds = parsed.seeds or [parsed.seed]
        parsed.logdir = parsed.logdir or run_folder(self.dataset_name)
        if parsed.sweep_ranks and (len(parsed.seeds) > 1 or len(parsed.estimators) > 1):
            self.error(
                "--sweep-ranks trains one network per rank for one seed and one estimator, got "
                f"--seeds {','.join(map(str, parsed.seeds))} --estimator {','.join(map(str, parsed.estimators))}"
            )
        return parsed


def run_folder(script):
    """runs/<script>-<date>-<time>: each run's own folder, so that no run overwrites another's files."""
    return os.path.join("runs", f"{script}-{time.strftime('%Y%m%d-%H%M%S')}")


def refit_defaults():
    """"input_svd auto, svd 200": each estimator's default refit_every, for those that refit."""
    defaults = [(name, getattr(estimators.get(name), "refit_every", None)) for name in ESTIMATORS]
    return ", ".join(f"{name} {every}" for name, every in defaults if every is not None)


def default_ranks(ranks, hidden):
    """The default network's `ranks` fitted to `hidden`: by position, the last repeated, each at most
    a quarter of its layer's units (an estimator of rank r costs r·(d + n) multiply-adds)."""
    return [max(1, min(ranks[min(index, len(ranks) - 1)], units // 4)) for index, units in enumerate(hidden)]


def main_guard(main_function, argv):
    """Run an example's main; data problems end with one line on stderr and exit code 2."""
    try:
        return main_function(argv)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
