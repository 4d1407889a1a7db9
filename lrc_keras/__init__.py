"""lrc-keras: low-rank conditional computation for ReLU networks in Keras 3.

`import lrc_keras` checks that Keras will run on TensorFlow and does nothing else: TensorFlow,
Keras and the layer are imported when one of the names below is first used (PEP 562), so that
`lrc_keras.quiet_start()` may still come before TensorFlow's import.
"""

import importlib
import sys
import types

from lrc_keras import startup
from lrc_keras.startup import quiet_start

startup.check_backend()

# Each public name: (module, attribute), the attribute None where the name is the module.
_PUBLIC = {
    "LowRankGatedDense": ("lrc_keras.layers", "LowRankGatedDense"),
    "calibrate": ("lrc_keras.calibrate", "calibrate"),
    "callbacks": ("lrc_keras.callbacks", None),
    "convert": ("lrc_keras.convert", "convert"),
    "crossover": ("lrc_keras.crossover", None),
    "measure_gates": ("lrc_keras.audit", "measure_gates"),
    "ops": ("lrc_keras.ops", None),
    "set_audit": ("lrc_keras.audit", "set_audit"),
    "to_dense": ("lrc_keras.convert", "to_dense"),
}

__all__ = sorted([*_PUBLIC, "quiet_start"])


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lrc_keras' has no attribute {name!r}")
    startup.check_chosen_backend()
    module_name, attribute = _PUBLIC[name]
    module = importlib.import_module(module_name)
    globals()[name] = module if attribute is None else getattr(module, attribute)
    return globals()[name]


class _Package(types.ModuleType):
    """The package, whose `calibrate` and `convert` stay the functions when their modules are imported
    (the import system binds each imported module to the package under its name)."""

    def __setattr__(self, name, value):
        module_name, attribute = _PUBLIC.get(name, (None, None))
        if isinstance(value, types.ModuleType) and value.__name__ == module_name and attribute:
            value = getattr(value, attribute)
        super().__setattr__(name, value)


def __dir__():
    return sorted({*globals(), *_PUBLIC})


sys.modules[__name__].__class__ = _Package
