"""A gated layer and its Dense twin, one layer at a time: `LowRankGatedDense.from_dense` and
`LowRankGatedDense.to_dense` (whole models: `lrc_keras.convert`)."""

import keras
import tensorflow as tf

from lrc_keras.inputs import checked_sample_inputs


def gated_from_dense(gated_class, dense_layer, rank, sample_inputs=None, **kwargs):
    """A `gated_class` copy of a built `keras.layers.Dense` with ReLU activation.

    The kernel and bias are copied (the kernel transposed into the stored layout) and the
    estimator fitted by its rule, from `sample_inputs` (inputs of `dense_layer`, 2-D) where the
    rule uses inputs. Regularizers, constraints, the name and the dtype policy carry over unless
    given in `kwargs`.
    """
    if not isinstance(dense_layer, keras.layers.Dense):
        raise ValueError(
            f"from_dense needs a keras.layers.Dense, got {type(dense_layer).__name__} "
            f"{getattr(dense_layer, 'name', '')!r}"
        )
    if dense_layer.activation is not keras.activations.relu:
        raise ValueError(
            f"from_dense needs a Dense layer with ReLU activation; {dense_layer.name!r} has "
            f"activation {getattr(dense_layer.activation, '__name__', dense_layer.activation)!r}"
        )
    if not dense_layer.built:
        raise ValueError(
            f"from_dense needs a built Dense layer (its kernel holds the weights to copy); "
            f"{dense_layer.name!r} is not built yet"
        )
    input_dim = dense_layer.kernel.shape[0]
    sample_inputs = checked_sample_inputs(sample_inputs, input_dim, dense_layer.name)
    settings = {
        "name": dense_layer.name,
        "use_bias": dense_layer.use_bias,
        "kernel_regularizer": dense_layer.kernel_regularizer,
        "bias_regularizer": dense_layer.bias_regularizer,
        "activity_regularizer": dense_layer.activity_regularizer,
        "kernel_constraint": dense_layer.kernel_constraint,
        "bias_constraint": dense_layer.bias_constraint,
        "dtype": dense_layer.dtype_policy,
        **kwargs,
    }
    layer = gated_class(dense_layer.units, rank, **settings)
    layer.build((None, input_dim))
    layer.kernel.assign(tf.transpose(dense_layer.kernel))
    if dense_layer.use_bias:
        layer.bias.assign(dense_layer.bias)
    layer.refit(sample_inputs)
    return layer


def dense_twin(layer):
    """The `keras.layers.Dense(units, activation="relu")` twin with a built gated layer's weights.

    It computes every unit, so its outputs equal the gated layer's wherever the estimator
    selects every active unit; regularizers, constraints, the name and the dtype policy carry over.
    """
    dense = keras.layers.Dense(
        layer.units,
        activation="relu",
        use_bias=layer.use_bias,
        kernel_regularizer=layer.kernel_regularizer,
        bias_regularizer=layer.bias_regularizer,
        activity_regularizer=layer.activity_regularizer,
        kernel_constraint=layer.kernel_constraint,
        bias_constraint=layer.bias_constraint,
        name=layer.name,
        dtype=layer.dtype_policy,
    )
    dense.build((None, layer.kernel.shape[1]))
    dense.kernel.assign(tf.transpose(layer.kernel))
    if layer.use_bias:
        dense.bias.assign(layer.bias)
    return dense
