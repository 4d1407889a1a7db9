"""Measuring a trained network: the cost model at its measured densities, and its speed against a reference."""

import keras
import numpy as np
import tensorflow as tf

from lrc_keras.cost import network_cost_model_speedup
from lrc_keras.timing import median_call_latency
from lrc_keras.timing import median_times

SPEED_BATCHES = (1, 16, 256)
# How one inference is timed (see `speedups`), in the order the reports show them.
SPEED_KINDS = ("in_graph", "call", "predict")


def cost_model_speedup(model, gate_reports):
    """Whole-network multiply-adds of the Dense twin over the gated network's, at the measured densities.

    `gate_reports`: lrc_keras.measure_gates(model, x); the layers that stay Dense count in both.
    """
    dense_shapes = [tuple(layer.kernel.shape) for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    gated = [(r["input_dim"], r["units"], r["rank"], r["predicted_density"]) for r in gate_reports]
    return network_cost_model_speedup(dense_shapes, gated)


def speedups(reference, model, x, batches=SPEED_BATCHES, on_batch=None):
    """Per batch size, the reference's inference time over the model's, timed three ways.

    "in_graph": calls looped inside one graph (`median_times`), the network's own cost as the
    benchmark times layers; "call": one Python call of a tf.function wrapping the whole network
    (`training=False`), what a user's serving loop sees, fixed call overhead included;
    "predict": one `predict_on_batch`, Keras' own entry point. "seconds" holds each kind's
    median seconds per call, {"reference": ..., "model": ...}. Rows of `x` are repeated to fill a
    batch. Switch `lrc_keras.set_audit` off first: an audited network computes every unit.
    `on_batch(batch, result)`, if given, is called as each batch size's result is ready.
    """
    networks = {"reference": reference, "model": model}
    # One tf.function per network, traced once per batch size, as a user would keep it.
    wrapped = {name: tf.function(network) for name, network in networks.items()}
    results = {}
    for batch in batches:
        sample = tf.constant(np.resize(x, (batch,) + x.shape[1:]))
        seconds = {
            "in_graph": median_times(
                {name: (lambda v, network=network: network(v, training=False)) for name, network in networks.items()},
                sample, repeats=7, calls=10,
            ),
            "call": {name: median_call_latency(lambda v, f=f: f(v, training=False), sample)
                     for name, f in wrapped.items()},
            "predict": {name: median_call_latency(network.predict_on_batch, sample)
                        for name, network in networks.items()},
        }
        results[batch] = {kind: seconds[kind]["reference"] / seconds[kind]["model"] for kind in SPEED_KINDS}
        results[batch]["seconds"] = seconds
        if on_batch:
            on_batch(batch, results[batch])
    return results
