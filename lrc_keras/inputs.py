"""Input checks in one place: what the layer, convert, calibrate and the callbacks accept as
sample inputs and model inputs. Each raises a ValueError that names the offending value,
before any weight changes."""

import numbers

import numpy as np


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")


def checked_model_inputs(x, name):
    x = np.asarray(x)
    if x.size == 0 or x.ndim < 2:
        raise ValueError(f"{name} must be a non-empty batch of model inputs; got shape {x.shape}")
    if np.issubdtype(x.dtype, np.number) and not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite; it has {int(np.sum(~np.isfinite(x)))} NaN or inf values")
    return x


def checked_sample_inputs(sample_inputs, input_dim, name):
    """None, or sample inputs as a float32 2-D array of width `input_dim` without NaN or inf."""
    if sample_inputs is None:
        return None
    try:
        array = np.asarray(sample_inputs)
    except ValueError as error:  # ragged nested lists
        raise ValueError(f"{name}: sample_inputs must be a 2-D array of numbers ({error})") from None
    if array.ndim != 2 or array.shape[1] != input_dim or array.shape[0] == 0:
        raise ValueError(
            f"{name}: sample_inputs must be a non-empty 2-D array of width {input_dim} (the layer's "
            f"input_dim), got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
        bad = np.argwhere(~np.isfinite(array.astype(np.float64)))[0] if np.issubdtype(array.dtype, np.number) else None
        raise ValueError(
            f"{name}: sample_inputs must be finite numbers; got {array.dtype}"
            + (f" with {array[tuple(bad)]} at {tuple(int(i) for i in bad)}" if bad is not None else "")
        )
    largest = float(np.max(np.abs(array))) if array.size else 0.0
    # A Python float against float32's maximum as a Python float: numpy would cast it to float32, with a warning.
    if largest > float(np.finfo(np.float32).max):
        row = int(np.argwhere(np.abs(array) == largest)[0][0])
        raise ValueError(
            f"{name}: sample_inputs row {row} holds {largest:g}, beyond float32's range: the layer "
            f"computes in float32"
        )
    return array.astype(np.float32)
