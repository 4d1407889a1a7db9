"""lrc-keras: low-rank conditional computation for ReLU networks in Keras 3."""

from lrc_keras.layers import LowRankGatedDense
from lrc_keras.audit import set_audit
from lrc_keras import callbacks
from lrc_keras import ops

__all__ = ["LowRankGatedDense", "set_audit", "callbacks", "ops"]
