"""Timing inside one TensorFlow graph: what the cost model, the benchmark and the examples measure.

A Python call of a `tf.function` costs ~250 µs on the project's machine, more than a gated layer at
batch 1, so layers are timed as `calls` iterations of a `tf.while_loop` inside one graph, enough of them
that the graph runs at least `MIN_GRAPH_SECONDS`: the Python call is then ~1% of what is timed. (With a
fixed 20 calls it had added ~12 µs to every call at batch 1, where a gated 784→1000 layer takes ~15 µs
and the loop's own iteration ~4 µs: 0.54 of the cost-model limit measured instead of 0.94.) Each
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
# A timed graph's shortest run: the ~250 µs Python call of it is then ~1% of the time.
MIN_GRAPH_SECONDS = 0.02
# The most calls in one graph (a 1 µs function would otherwise ask for 20 000).
MAX_CALLS = 5000


class _DeliberateTracing(logging.Filter):
    """Drops TF's "excessive retracing" warning about `repeated`'s graphs.

    Each timed function gets its own graph on purpose, so the cost model's first measurement
    traces a dozen of them; TF's detector counts them as retracing of one function.
    """

    def filter(self, record):
        return "repeated.<locals>.run" not in record.getMessage()


tf.get_logger().addFilter(_DeliberateTracing())


def repeated(function):
    """A tf.function `run(x, calls)` running `function(x)` `calls` times in one graph, one call after
    another; `calls` is a tensor, so that any number of calls runs the one traced graph."""
    function = tf.autograph.experimental.do_not_convert(function)

    @tf.function
    def run(x, calls):
        def body(step, total):
            first_output = tf.nest.flatten(function(x))[0]
            return step + 1, total + tf.cast(tf.reshape(first_output, [-1])[0], tf.float32)

        return tf.while_loop(lambda step, total: step < calls, body, (0, 0.0), parallel_iterations=1)[1]

    return lambda x, calls: run(x, tf.constant(calls, tf.int32))


def median_times(functions, x, repeats=REPEATS, calls=CALLS_PER_REPEAT, min_seconds=MIN_GRAPH_SECONDS):
    """Median seconds per call of each function, timed interleaved after a warm-up.

    Each function runs at least `calls` times a timed graph, more where that graph would run shorter
    than `min_seconds` (at most MAX_CALLS), as its warm-up measured it.
    """
    looped = {name: repeated(function) for name, function in functions.items()}
    graph_calls = {}
    for name, function in looped.items():
        function(x, 1).numpy()  # trace and warm up
        graph_calls[name] = _calls_lasting(function, x, calls, min_seconds)
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in looped.items():
            start = time.perf_counter()
            function(x, graph_calls[name]).numpy()
            samples[name].append((time.perf_counter() - start) / graph_calls[name])
    return {name: float(np.median(values)) for name, values in samples.items()}


def _calls_lasting(looped, x, calls, min_seconds):
    """About the fewest calls, from `calls` up (at most MAX_CALLS), whose graph runs `min_seconds`: each
    try scales the calls by the time missing, with 20% to spare, as the Python call in what it measures
    makes the scaled count short of the mark."""
    while calls < MAX_CALLS:
        start = time.perf_counter()
        looped(x, calls).numpy()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            break
        calls = min(MAX_CALLS, max(calls + 1, int(np.ceil(1.2 * calls * min_seconds / max(elapsed, 1e-9)))))
    return calls


def median_call_latency(function, x, repeats=51):
    """Median seconds of one Python call of `function(x)` returning numpy, as a user sees it."""
    function(x)  # trace and warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, function(x))
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))
