"""Conditional computation for models that already exist: convert Dense+ReLU layers and back
(`lrc_keras.calibrate` then chooses their margins)."""

import math
import numbers

import keras

from lrc_keras.audit import gated_layers
from lrc_keras.audit import inputs_of
from lrc_keras.inputs import checked_model_inputs
from lrc_keras.layers import LowRankGatedDense


def convert(model, rank, layers=None, sample_inputs=None, **layer_kwargs):
    """A copy of `model` whose Dense+ReLU layers are LowRankGatedDense (`from_dense`).

    Args:
        model: A Sequential or functional Keras model (nested ones included).
        rank: An int; a float in (0, 1], the fraction of each layer's
            min(input_dim, units) (rounded up); or a dict {layer name: int or
            fraction}, in which case only the named layers are converted.
        layers: Optional names of the layers to convert (each must be a Dense
            with ReLU activation); default: every Dense with ReLU activation.
        sample_inputs: Optional model inputs. Where given, each converted layer's estimator is
            fitted to the inputs that layer sees on them (in model order, through the gated
            layers before it), as the input-aware estimators need; otherwise to the kernel
            alone.
        **layer_kwargs: Passed to `LowRankGatedDense` (e.g. `margin`, `estimator`).

    Returns:
        A new model; every other layer is a copy with the original's weights.
        At full rank its predictions equal the original's.
    """
    _check_rewirable(model, "convert")
    if sample_inputs is not None:
        sample_inputs = checked_model_inputs(sample_inputs, "sample_inputs")
    candidates = {
        layer.name: layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.Dense) and layer.activation is keras.activations.relu
    }
    wanted = _layers_to_convert(model, candidates, rank, layers)
    converted = _clone_replacing(
        model,
        lambda layer: LowRankGatedDense.from_dense(layer, _rank_for(layer, rank), **layer_kwargs)
        if layer.name in wanted
        else None,
    )
    if sample_inputs is not None:
        for layer in gated_layers(converted):
            layer.refit(inputs_of(converted, layer, sample_inputs))
    return converted


def to_dense(model):
    """A copy of `model` whose LowRankGatedDense layers are their Dense twins (`to_dense`).

    The inverse of `convert`: the twin computes every unit, so it is the reference for the
    gated model's accuracy and speed. Every other layer is a copy with the original's weights.
    """
    _check_rewirable(model, "to_dense")
    return _clone_replacing(
        model, lambda layer: layer.to_dense() if isinstance(layer, LowRankGatedDense) else None
    )


def _check_rewirable(model, caller):
    if not isinstance(model, keras.Sequential) and not _is_functional(model):
        raise ValueError(
            f"{caller} needs a Sequential or functional model; {model.name!r} is a subclassed "
            f"{type(model).__name__}, whose layers cannot be rewired"
        )


def _clone_replacing(model, replacement):
    """A copy of `model` where `replacement(layer)` stands for each layer it returns one for.

    Every other layer is re-created from its config and given the original's weights, so the
    copy shares no variable with `model`.
    """
    copied = []

    def clone(layer):
        replaced = replacement(layer)
        if replaced is not None:
            return replaced
        duplicate = layer.__class__.from_config(layer.get_config())
        copied.append((layer, duplicate))
        return duplicate

    cloned = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for original, duplicate in copied:
        duplicate.set_weights(original.get_weights())
    return cloned


def _is_functional(model):
    return isinstance(model, keras.Model) and hasattr(model, "_operations") and bool(model.inputs)


def _layers_to_convert(model, candidates, rank, layers):
    if isinstance(rank, dict):
        names = list(rank)
    elif layers is not None:
        names = list(layers)
    else:
        names = list(candidates)
    for name in names:
        if name not in candidates:
            raise ValueError(
                f"layer {name!r} is not a Dense layer with ReLU activation in {model.name!r}; "
                f"those are {sorted(candidates)}"
            )
    if not isinstance(rank, dict):
        _check_rank(rank, "rank")
    else:
        for name, value in rank.items():
            _check_rank(value, f"rank[{name!r}]")
    return set(names)


def _check_rank(rank, label):
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise ValueError(f"{label} must be an int or a fraction in (0, 1], got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if rank < 1:
            raise ValueError(f"{label} must be a positive int or a fraction in (0, 1], got {rank!r}")
    elif not 0 < rank <= 1:
        raise ValueError(f"{label} as a fraction must be in (0, 1], got {rank!r}")


def _rank_for(layer, rank):
    value = rank[layer.name] if isinstance(rank, dict) else rank
    full = min(layer.kernel.shape)
    if isinstance(value, numbers.Integral):
        return min(int(value), full)
    return max(1, math.ceil(value * full))
