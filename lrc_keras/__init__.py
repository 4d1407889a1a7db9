"""lrc-keras: low-rank conditional computation for ReLU networks in Keras 3."""

from lrc_keras import startup

startup.start()  # the Keras backend check and TensorFlow's start, before the layer and its ops

from lrc_keras import callbacks
from lrc_keras import ops
from lrc_keras.audit import measure_gates
from lrc_keras.calibrate import calibrate
from lrc_keras.convert import convert
from lrc_keras.convert import to_dense
from lrc_keras.audit import set_audit
from lrc_keras.layers import LowRankGatedDense

__all__ = ["LowRankGatedDense", "calibrate", "callbacks", "convert", "measure_gates", "ops", "set_audit", "to_dense"]
