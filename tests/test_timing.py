import time

import numpy as np
import pytest
import tensorflow as tf

from lrc_keras import timing
from lrc_keras.timing import repeated


def test_repeated_runs_the_function_once_per_call():
    """Every iteration must execute the function: neither hoisted out of the loop nor pruned."""
    counter = tf.Variable(0.0)

    def counted(x):
        counter.assign_add(1.0)
        return tf.matmul(x, x)

    x = tf.constant(2 * np.eye(4, dtype=np.float32))
    total = repeated(counted)(x, 7)
    assert float(counter.numpy()) == 7.0
    assert float(total) == 7 * 4.0  # the sum of every call's first output element


def test_repeated_keeps_a_pure_function_alive():
    """A stateless function's output feeds only the control dependency; it must still run.

    An out-of-range gather is pure and fails only when it executes: pruned, it would pass.
    """
    with pytest.raises(tf.errors.InvalidArgumentError, match="99"):
        repeated(lambda x: tf.gather(x, [99]))(tf.ones((2, 2)), 3)


def test_measuring_the_timing_model_logs_no_retracing_warning(monkeypatch, tmp_path):
    """The timing model traces one graph per timed function on purpose: no "retracing" noise."""
    import logging

    from lrc_keras import LowRankGatedDense, crossover

    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(crossover, "_measured", {})
    layer = LowRankGatedDense(7, rank=2)
    layer.build((None, 9))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf.get_logger().addHandler(handler)
    try:
        crossover.measure(layer)
    finally:
        tf.get_logger().removeHandler(handler)
    assert not [r.getMessage() for r in records if "retracing" in r.getMessage()]


def _sleeping(seconds):
    """A function that takes at least `seconds` a call, whatever the machine."""
    def function(x):
        return tf.py_function(lambda v: (time.sleep(seconds), v)[1], [x], tf.float32)
    return function


def test_timed_graphs_run_long_enough_to_hide_the_python_call():
    """A function sleeping 1 ms (1-2 ms a call with the sleep's overshoot), asked for 2 calls and 30 ms
    a graph, gets 15-45 calls: 2 would time the ~250 µs Python call as an eighth of each call."""
    looped = repeated(_sleeping(1e-3))
    x = tf.ones([1])
    looped(x, 1)
    assert 15 <= timing._calls_lasting(looped, x, 2, 0.03) <= 45


def test_timed_graphs_never_run_more_than_max_calls(monkeypatch):
    monkeypatch.setattr(timing, "MAX_CALLS", 50)
    looped = repeated(lambda x: x * 2.0)
    x = tf.ones([1])
    looped(x, 1)
    assert timing._calls_lasting(looped, x, 2, 10.0) == 50
    assert timing._calls_lasting(looped, x, 80, 10.0) == 80  # never fewer than asked for
