"""Save, with the lrc-keras on the path, a tiny trained model of each estimator and what it predicts:
tests/data/legacy_<version>_<estimator>.keras and .npz, which later versions must load with the same predictions.

    PYTHONPATH=<checkout of that version> python tests/data/save_fixtures.py <version>
"""

import os
import sys

import keras
import numpy as np

from lrc_keras import LowRankGatedDense
from lrc_keras.estimators import InputSVDEstimator, JointEstimator, SVDEstimator

ESTIMATORS = {"input_svd": InputSVDEstimator(refit_every=3), "svd": SVDEstimator(refit_every=3),
              "joint": JointEstimator()}


def save(version, name, estimator, **layer_settings):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 6)).astype("float32")
    y = rng.integers(0, 3, 64)
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((6,)),
        LowRankGatedDense(8, rank=2, estimator=estimator, margin=0.25, name="gated",
                          activity_regularizer=keras.regularizers.L1(1e-3), **layer_settings),
        keras.layers.Dense(3),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)  # 8 steps: refits, rows and counters in the state
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"legacy_{version}_{name}")
    model.save(path + ".keras")
    layer = model.layers[0]
    variables = {v.name: v.numpy() for v in layer.weights}
    np.savez(path + ".npz", x=x, y_pred=model.predict(x, verbose=0), estimator_u=layer.estimator_u.numpy(),
             estimator_v=layer.estimator_v.numpy(), **variables)


if __name__ == "__main__":
    for name, estimator in ESTIMATORS.items():
        # svd's model also carries a density target, whose penalty is one more saved variable.
        save(sys.argv[1], name, estimator, **({"target_density": 0.5} if name == "svd" else {}))
