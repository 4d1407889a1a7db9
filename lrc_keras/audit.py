"""Measuring the gate in inference, where z is otherwise never computed."""

from lrc_keras.callbacks import gated_layers


def set_audit(model, enabled=True):
    """Make `evaluate`/`predict` compute z densely and update the gate metrics.

    Auditing costs the dense GEMM that the gated op avoids; switch it off again
    for fast inference. The model's compiled test and predict functions are
    dropped so that the next call traces the new path.
    """
    for layer in gated_layers(model):
        layer.audit = bool(enabled)
    model.test_function = None
    model.predict_function = None
