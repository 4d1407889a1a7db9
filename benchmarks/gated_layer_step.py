"""python benchmarks/gated_layer_step.py: one training step of a layer, gated against Dense.

For each layer shape and predicted density ρ (set exactly through the margin), at one batch size,
it times inside tf.function (lrc_keras.timing: many calls per graph, interleaved, medians)
    dense      loss = Σ relu(x·W + b)·c and tf.gradients wrt x, W, b: Dense's three GEMMs
    gated      the same loss through `gated_dense_train`, the estimate (x·U)·V included
and the parts of the gated step alone: the estimate, the forward op, the backward op, and the
backward of a 16-input twin (its list-building passes, with products 16 columns wide), against
one dense GEMM. It prints a table and the per-pair rate of each gated kernel against the GEMM's.

The layer is keras.layers.Dense's initialisation, the estimator its truncated SVD (the layer's
`from_dense`), x standard normal: the pairs that pass gradient, y > 0, are printed next to ρ.
"""

import lrc_keras

if __name__ == "__main__":
    # Before TensorFlow's import: its C++ logs at warning level and above (unless TF_CPP_MIN_LOG_LEVEL
    # says otherwise), and its start-up banner is held back.
    lrc_keras.quiet_start()

import argparse
import json
import os

import numpy as np
import tensorflow as tf

from lrc_keras import ops
from lrc_keras.estimators import low_rank_product
from lrc_keras.estimators import truncated_svd_factors
from lrc_keras.gated_training import gated_dense_train_with_density
from lrc_keras.gating import margin_for_density
from lrc_keras.timing import MIN_GRAPH_SECONDS, median_times

# (input_dim, units, rank, densities): the synthetic layer and MNIST's first layer.
LAYERS = ((3072, 4000, 50, (0.1,)), (784, 1000, 20, (0.035, 0.07, 0.15, 0.25)))


def layer_weights(rng, input_dim, units, rank):
    """Dense's glorot-uniform kernel in the stored layout [units, input_dim], zero bias, SVD factors."""
    limit = np.sqrt(6.0 / (input_dim + units))
    kernel = rng.uniform(-limit, limit, (units, input_dim)).astype(np.float32)
    estimator_u, estimator_v = (factor.numpy() for factor in truncated_svd_factors(kernel, rank))
    return kernel, np.zeros(units, np.float32), estimator_u, estimator_v


def one_element_of_each(tensors):
    """A scalar that depends on every tensor, so that none of the work is pruned."""
    return tf.add_n([tf.reshape(t, [-1])[0] for t in tensors])


def step_functions(kernel, bias, estimator_u, estimator_v, margin, cotangent):
    kernel_t, bias_t = tf.constant(kernel), tf.constant(bias)
    dense_kernel = tf.constant(kernel.T)  # keras.layers.Dense's layout [input_dim, units]
    u, v, c = tf.constant(estimator_u), tf.constant(estimator_v), tf.constant(cotangent)

    def dense(x):
        loss = tf.reduce_sum(tf.nn.relu(tf.matmul(x, dense_kernel) + bias_t) * c)
        return one_element_of_each(tf.gradients(loss, [x, dense_kernel, bias_t]))

    def gated(x):
        y, _ = gated_dense_train_with_density(x, kernel_t, bias_t, low_rank_product(x, u, v), margin)
        return one_element_of_each(tf.gradients(tf.reduce_sum(y * c), [x, kernel_t, bias_t]))

    return dense, gated


def part_functions(x, kernel, bias, estimator_u, estimator_v, margin, cotangent):
    """The gated step's parts, and one dense GEMM; each a function of x."""
    library = ops.compiled_library()
    kernel_t, bias_t, dense_kernel = tf.constant(kernel), tf.constant(bias), tf.constant(kernel.T)
    u, v = tf.constant(estimator_u), tf.constant(estimator_v)
    product = low_rank_product(tf.constant(x), u, v)
    y = library.lrc_gated_dense(x, kernel_t, bias_t, product, margin)[0]
    grad_y = tf.constant(cotangent)
    no_rows = tf.zeros([0, kernel.shape[0]])  # no sampled rows: y's pairs alone
    narrow_x, narrow_kernel = tf.constant(x[:, :16]), tf.constant(kernel[:, :16])
    return {
        "gemm": lambda x: tf.matmul(x, dense_kernel),
        "estimate": lambda x: low_rank_product(x, u, v),
        "forward": lambda x: library.lrc_gated_dense(x, kernel_t, bias_t, product, margin)[0],
        "backward": lambda x: one_element_of_each(library.lrc_gated_dense_grad(grad_y, y, no_rows, no_rows, x, kernel_t)),
        "lists": lambda x: one_element_of_each(
            library.lrc_gated_dense_grad(grad_y, y, no_rows, no_rows, narrow_x + 0 * x[:1, :16], narrow_kernel)
        ),
    }, y


def measure(rng, batch, input_dim, units, rank, density, repeats, calls):
    kernel, bias, estimator_u, estimator_v = layer_weights(rng, input_dim, units, rank)
    x = rng.standard_normal((batch, input_dim)).astype(np.float32)
    cotangent = rng.standard_normal((batch, units)).astype(np.float32)
    z_hat = (x @ estimator_u) @ estimator_v + bias
    margin = margin_for_density(z_hat, density)
    dense, gated = step_functions(kernel, bias, estimator_u, estimator_v, margin, cotangent)
    parts, y = part_functions(x, kernel, bias, estimator_u, estimator_v, margin, cotangent)
    x = tf.constant(x)
    steps = median_times({"dense": dense, "gated": gated}, x, repeats, calls)
    part_times = median_times(parts, x, repeats, calls)
    computed = float(np.mean(~(z_hat <= -margin)))
    passing = float(np.mean(y.numpy() > 0))
    gemm_rate = 2 * batch * input_dim * units / part_times["gemm"]
    return {
        "layer": f"{input_dim}->{units} r={rank}",
        "batch": batch,
        "density": round(computed, 4),
        "passing": round(passing, 4),
        "dense_step_us": steps["dense"] * 1e6,
        "gated_step_us": steps["gated"] * 1e6,
        "speedup": steps["dense"] / steps["gated"],
        **{f"{name}_us": seconds * 1e6 for name, seconds in part_times.items()},
        # FLOP a second per computed pair (forward) or per passing pair and product (backward),
        # as a fraction of the dense GEMM's.
        "forward_rate": 2 * computed * batch * input_dim * units / part_times["forward"] / gemm_rate,
        "backward_rate": 4 * passing * batch * input_dim * units / part_times["backward"] / gemm_rate,
    }


def format_row(row):
    return (
        f"| {row['layer']} | {row['batch']} | {row['density']:.3f} | {row['passing']:.3f} | "
        f"{row['dense_step_us']:.0f} | {row['gated_step_us']:.0f} | {row['speedup']:.2f}x | "
        f"{row['gemm_us']:.0f} | {row['estimate_us']:.0f} | {row['forward_us']:.0f} | "
        f"{row['backward_us']:.0f} | {row['lists_us']:.0f} | {row['forward_rate']:.2f} | "
        f"{row['backward_rate']:.2f} |"
    )


HEADER = (
    "| layer | batch | ρ computed | ρ passing | Dense step µs | gated step µs | speedup | "
    "1 GEMM µs | estimate µs | forward µs | backward µs | lists µs | forward rate | backward rate |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/gated_layer_step.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="rows per training step")
    parser.add_argument("--repeats", type=int, default=7, help="timed graphs per row; the median is reported")
    parser.add_argument("--calls", type=int, default=10,
                        help=f"fewest calls per timed graph (more where it would run under {MIN_GRAPH_SECONDS * 1e3:g} ms)")
    parser.add_argument("--out", default="gated_layer_step.json", help="where to save the rows as JSON")
    args = parser.parse_args(argv)
    if not ops.is_compiled():
        parser.error("the compiled ops are not loaded; there is no gated training path to time")
    rng = np.random.default_rng(0)
    print(HEADER, flush=True)
    rows = []
    with tf.device("/CPU:0"):
        for input_dim, units, rank, densities in LAYERS:
            for density in densities:
                rows.append(measure(rng, args.batch, input_dim, units, rank, density, args.repeats, args.calls))
                print(format_row(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"tensorflow": tf.__version__, "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
