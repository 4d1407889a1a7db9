"""The paper's MNIST experiment: a fully connected ReLU network of LowRankGatedDense layers.

    python examples/mnist.py --baseline                       # tensorflow-datasets' mnist
    python examples/mnist.py --npz digits.npz --baseline      # arrays: x uint8 [N, 28, 28], y [N]
    python examples/mnist.py --npz digits.npz --baseline --sweep-ranks 5,10,20,50
    python examples/mnist.py --npz digits.npz --baseline --estimator svd,joint --seeds 0,1,2
    tensorboard --logdir runs

With --npz, a quarter of the arrays chosen by --split-seed is held out as the test set.
--seeds trains every network once per seed on that split and reports mean ± std over seeds.
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
    # L1 3e-4: the gated network stays closest to its Dense twin; 1e-3 is the paper's sparser,
    # faster regime (docs/measured.md: both, over three seeds).
    parser = cli.ExampleParser(__doc__.splitlines()[0], data.MNIST, hidden=[1000, 1000], epochs=10, l1=3e-4,
                               ranks=[20])
    args = parser.parse_args(argv)
    return experiment.run(args, data.MNIST, data.load(data.MNIST, args.npz, args.data_dir, args.split_seed))


if __name__ == "__main__":
    cli.main_guard(main, None)
