"""Models saved by earlier versions of lrc-keras, read into this version's LowRankGatedDense.

Today the layer saves its own variables (`kernel`, `bias`, `gate_margin`, `observed_density`, a
density target's `density_penalty`, `estimator_rank`) and its nested `estimator_state` the
estimator's (`estimator_factors`, then the rule's state). Three earlier layouts saved all of them
as the layer's own, and are named here by what differs:

    "estimator on the layer"  the estimator's variables among the layer's: the trainable ones
                              first (kernel, bias, a trained estimator's factors), then
                              `gate_margin`, `estimator_rank`, the other estimators' factors, the
                              rule's state, `observed_density` and `density_penalty`.
    "separate factors"        as "estimator on the layer", with U and V in two variables,
                              `estimator_u` then `estimator_v`, where the one `estimator_factors`
                              is now (a refit now replaces both at once).
    "layer settings"          the estimator's settings were the layer's own (`refit_every`,
                              `estimator_loss_weight`, `estimator_positive_weight` in its config),
                              the trainable variables were saved first, then U and V, the
                              estimator's state (input_svd kept a d×d input moment, which has no
                              place now: its row buffer refills in training) and
                              `observed_density`.

A saved layer is matched to a layout by its number of variables (`tests/data` holds a model of
each layout for each estimator, saved by `tests/data/save_fixtures.py`).
"""

from lrc_keras import estimators

# The "layer settings" layout's settings that belong to an estimator now, and where they went.
MOVED_TO_ESTIMATOR = {
    "refit_every": "InputSVDEstimator(refit_every=...) or SVDEstimator(refit_every=...)",
    "estimator_loss_weight": "JointEstimator(loss_weight=...)",
    "estimator_positive_weight": "JointEstimator(positive_weight=...)",
}


def check_no_moved_settings(kwargs):
    """A ValueError naming the first setting of `kwargs` that belongs to an estimator now."""
    moved = sorted(set(kwargs) & set(MOVED_TO_ESTIMATOR))
    if moved:
        raise ValueError(
            f"{moved[0]} is a setting of the estimator now: pass estimator="
            f"{MOVED_TO_ESTIMATOR[moved[0]]} from lrc_keras.estimators (got {moved[0]}={kwargs[moved[0]]!r})"
        )


def current_config(config):
    """A layer config of this version: one of the "layer settings" layout gets its estimator object."""
    config = dict(config)
    if set(config) & set(MOVED_TO_ESTIMATOR):
        config["estimator"] = _estimator_of_layer_settings(config)
    return config


def is_earlier_layout(layer, store):
    """Whether the `store` saved for `layer` holds other than this version's own variables of it."""
    return len(store) != len(_own_names(layer))


def load_variables(layer, store):
    """Assign `layer`'s variables, its estimator's included, from a `store` saved in an earlier
    layout (matched by its size)."""
    layouts = {"estimator on the layer": _estimator_on_the_layer(layer), "separate factors": _separate_factors(layer),
               "layer settings": _layer_settings(layer)}
    names = next((names for names in layouts.values() if len(names) == len(store)), None)
    if names is None:
        own = _own_names(layer)
        raise ValueError(
            f"{layer.name}: the saved layer has {len(store)} variables; this version expects {len(own)} "
            f"({', '.join(own)}) and reads earlier versions' "
            + " or ".join(f"{len(names)} ({layout} layout)" for layout, names in layouts.items())
            + ". Re-save the model with the version that wrote it."
        )
    saved = {name: store[str(index)] for index, name in enumerate(names)}
    for variable in layer.weights:
        if variable.name in saved:
            variable.assign(saved[variable.name])
    if "estimator_u" in saved:
        layer.assign_estimator(saved["estimator_u"], saved["estimator_v"])


def _own_names(layer):
    """This version's own variables of the layer, without those of its `estimator_state`."""
    estimator_variables = {id(v) for v in layer.estimator_state.weights}
    return [v.name for v in layer.weights if id(v) not in estimator_variables]


def _estimator_on_the_layer(layer):
    weights = ["kernel"] + (["bias"] if layer.use_bias else [])
    state = [v.name for v in layer.estimator_state.weights if v is not layer.estimator_factors]
    density = ["observed_density"] + (["density_penalty"] if layer.target_density is not None else [])
    if layer.estimator.trainable:
        return weights + ["estimator_factors", "gate_margin", "estimator_rank"] + state + density
    return weights + ["gate_margin", "estimator_rank", "estimator_factors"] + state + density


def _separate_factors(layer):
    names = _estimator_on_the_layer(layer)
    at = names.index("estimator_factors")
    return names[:at] + ["estimator_u", "estimator_v"] + names[at + 1:]


def _layer_settings(layer):
    trainable = ["kernel"] + (["bias"] if layer.use_bias else [])
    # joint's factors are trainable, the others' are not: either way they followed the bias.
    state = ["training_steps"] + (["input_moment", "input_count"] if layer.estimator.name == "input_svd" else [])
    return trainable + ["estimator_u", "estimator_v"] + state + ["observed_density"]


def _estimator_of_layer_settings(config):
    """The estimator object a "layer settings" config describes; pops the layer-level settings."""
    name = config.get("estimator", "input_svd")
    refit_every = config.pop("refit_every", "auto")
    loss_weight = config.pop("estimator_loss_weight", 1.0)
    positive_weight = config.pop("estimator_positive_weight", 4.0)
    if name == "joint":
        return estimators.JointEstimator(loss_weight, positive_weight)
    if name == "svd":
        return estimators.SVDEstimator(200 if refit_every == "auto" else refit_every)
    if name == "input_svd":  # its "auto" schedule is now bounded by cost rather than 25 steps
        return estimators.InputSVDEstimator(refit_every)
    return estimators.get(name)
