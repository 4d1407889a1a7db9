"""The paper's SVHN experiment: 32x32x3 crops, flattened, through LowRankGatedDense layers.

    python examples/svhn.py --baseline                   # tensorflow-datasets' svhn_cropped
    python examples/svhn.py --npz crops.npz --baseline   # arrays: x uint8 [N, 32, 32, 3], y [N]
    tensorboard --logdir runs

Inputs are normalised per colour channel with the training set's mean and deviation. With
--npz, a quarter of the arrays chosen by --split-seed is held out as the test set. The
flags are those of examples/mnist.py (--seeds, --estimator, --baseline, --sweep-ranks, ...).
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
import experiment  # noqa: E402


def main(argv=None):
    parser = cli.ExampleParser(__doc__.splitlines()[0], data.SVHN, hidden=[4000, 2000, 1000], epochs=10, l1=1e-4,
                               ranks=[50, 40, 30])
    args = parser.parse_args(argv)
    return experiment.run(args, data.SVHN, data.load(data.SVHN, args.npz, args.data_dir, args.split_seed))


if __name__ == "__main__":
    cli.main_guard(main, None)
