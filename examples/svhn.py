"""The paper's SVHN experiment: 32x32x3 crops, flattened, through LowRankGatedDense layers.

    python examples/svhn.py --baseline          # tensorflow-datasets' svhn_cropped
    tensorboard --logdir runs

Inputs are normalised per colour channel with the training set's mean and deviation.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def normalise(train, test):
    """Flatten to 3072 features, per-channel standardised with the training statistics."""
    (x_train, y_train), (x_test, y_test) = train, test
    x_train = x_train.astype(np.float32)
    mean = x_train.mean(axis=(0, 1, 2))
    std = x_train.std(axis=(0, 1, 2)) + 1e-6

    def flat(x):
        return ((x.astype(np.float32) - mean) / std).reshape(len(x), -1)

    return (flat(x_train), y_train.astype(np.int64)), (flat(x_test), y_test.astype(np.int64))


def main(argv=None):
    parser = common.parser(__doc__.splitlines()[0], hidden=[4000, 2000, 1000], ranks=[50, 40, 30], epochs=10,
                           l1=1e-4)
    args = common.parse_args(parser, argv)
    return common.run(args, normalise(*common.load_tfds("svhn_cropped", args.data_dir)), "svhn")


if __name__ == "__main__":
    common.main_guard(main, None)
