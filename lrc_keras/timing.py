"""Timing inside one TensorFlow graph: what the cost model, the benchmark and the examples measure.

A Python call of a `tf.function` costs ~250 µs on the project's machine, more than a gated layer at
batch 1, so layers are timed as `calls` iterations of a `tf.while_loop` inside one graph. Each
iteration feeds the same input and adds one element of the function's output to a running total,
which keeps the call from being pruned at the cost of a one-element slice; `parallel_iterations=1`
keeps iterations from overlapping. A control dependency alone would not do: grappler turns a
pure op whose output feeds only control edges into a NoOp. The earlier data dependency
`x + 0·y[:, :1]` cost an elementwise pass over x per call (12 µs at batch 1, 60–120 µs at batch
256), pulling every ratio toward 1.
"""

import logging
import time

import numpy as np
import tensorflow as tf

REPEATS = 7
CALLS_PER_REPEAT = 5


class _DeliberateTracing(logging.Filter):
    """Drops TF's "excessive retracing" warning about `repeated`'s graphs.

    Each timed function gets its own graph on purpose, so the cost model's first measurement
    traces a dozen of them; TF's detector counts them as retracing of one function.
    """

    def filter(self, record):
        return "repeated.<locals>.run" not in record.getMessage()


tf.get_logger().addFilter(_DeliberateTracing())


def repeated(function, calls):
    """A tf.function running `function(x)` `calls` times in one graph, one call after another."""
    function = tf.autograph.experimental.do_not_convert(function)

    @tf.function
    def run(x):
        def body(step, total):
            first_output = tf.nest.flatten(function(x))[0]
            return step + 1, total + tf.cast(tf.reshape(first_output, [-1])[0], tf.float32)

        return tf.while_loop(lambda step, total: step < calls, body, (0, 0.0), parallel_iterations=1)[1]

    return run


def median_times(functions, x, repeats=REPEATS, calls=CALLS_PER_REPEAT):
    """Median seconds per call of each function, timed interleaved after a warm-up."""
    looped = {name: repeated(function, calls) for name, function in functions.items()}
    for function in looped.values():
        function(x)
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in looped.items():
            start = time.perf_counter()
            function(x).numpy()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: float(np.median(values)) for name, values in samples.items()}


def median_call_latency(function, x, repeats=51):
    """Median seconds of one Python call of `function(x)` returning numpy, as a user sees it."""
    function(x)  # trace and warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, function(x))
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))
