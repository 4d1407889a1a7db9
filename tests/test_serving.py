"""Serving: `model.export` writes a SavedModel that a fresh process serves with the Keras numbers.

Each export is loaded in its own Python process (nothing of this one's registered ops or state
can help it), started in a directory outside the source tree with PYTHONPATH at the package root
this process imported, as a server would.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import away_from_boundary, numpy_gated_dense
from tensorflow.core.protobuf import saved_model_pb2

import lrc_keras
from lrc_keras import LowRankGatedDense, crossover, ops

pytestmark = pytest.mark.skipif(
    not ops.is_compiled(), reason="without the compiled library an export holds no custom op"
)

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lrc_keras.__file__)))
TIMEOUT_S = 120
# The layer's op, and TF's GEMM of its x·Wᵀ (an einsum), which only the "gemm" path runs.
LAYER_OP, GEMM_OP = "LrcGatedLayer", "Einsum"

# argv: how to make the ops known ("lrc_keras", "op_library" or "nothing"), the export, the
# inputs .npy, the outputs .npy, a .json for what ran; with "op_library", the library's path.
LOADER = r"""
import json, os, sys
import numpy as np
how, export_dir, x_file, y_file, report_file = sys.argv[1:6]
if how == "lrc_keras":
    import lrc_keras.ops  # registers the ops
import tensorflow as tf
if how == "op_library":
    tf.load_op_library(sys.argv[6])  # what a server without lrc_keras does
loaded = tf.saved_model.load(export_dir)
x = np.load(x_file)
loaded.serve(x)  # the first call also instantiates the functions: keep it out of the trace
trace_dir = report_file + ".trace"
tf.profiler.experimental.start(trace_dir)
y = loaded.serve(x).numpy()
tf.profiler.experimental.stop()
np.save(y_file, y)
# The host trace names every kernel that ran (an untaken tf.cond branch runs none).
trace = b"".join(
    open(os.path.join(root, name), "rb").read()
    for root, _, names in os.walk(trace_dir) for name in names if name.endswith(".xplane.pb")
)
report = {op: trace.count(op.encode()) for op in ("LrcGatedLayer", "Einsum")}
if how == "lrc_keras":
    from lrc_keras import crossover
    report["cost_models_read"] = sorted(crossover._measured)  # what this process looked up
json.dump(report, open(report_file, "w"))
"""


@pytest.fixture(scope="module")
def trained():
    """A 20-64-32-3 gated model trained a few epochs on a synthetic task, and test inputs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 20)).astype("float32")
    y = np.argmax(x[:, :3] + 0.5 * x[:, 3:6], axis=1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((20,)),
        LowRankGatedDense(64, rank=4, inference_path="gated"),
        LowRankGatedDense(32, rank=4, inference_path="gated"),
        keras.layers.Dense(3),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    return model, rng.standard_normal((50, 20)).astype("float32")


def set_paths(model, path):
    for layer in model.layers:
        if isinstance(layer, LowRankGatedDense):
            layer.inference_path = path


def numpy_forward(model, x):
    """float64 outputs from the weights alone, and the rows no gate decision of can flip with rounding."""
    h, keep = np.asarray(x, np.float64), np.ones(len(x), bool)
    for layer in model.layers:
        if isinstance(layer, LowRankGatedDense):
            weights = [v.numpy() for v in (layer.kernel, layer.bias, layer.estimator_u, layer.estimator_v)]
            h, _, z_hat, _ = numpy_gated_dense(h, *weights, layer.margin)
            keep &= away_from_boundary(z_hat, layer.margin).all(axis=1)
        else:
            h = h @ layer.kernel.numpy() + layer.bias.numpy()
    return h, keep


def keras_outputs(model, x):
    """The Keras model's inference outputs, checked against the numpy reference."""
    y = model(x, training=False).numpy()
    expected, keep = numpy_forward(model, x)
    assert keep.mean() > 0.5, "too few rows away from a gate boundary to compare"
    np.testing.assert_allclose(y[keep], expected[keep], rtol=1e-4, atol=1e-5)
    return y


def op_types(export_dir):
    """Op types of the exported graph and of every function in its library."""
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    graph = saved_model.meta_graphs[0].graph_def
    types = {node.op for node in graph.node}
    for function in graph.library.function:
        types |= {node.op for node in function.node_def}
    return types


def serve_in_new_process(tmp_path, export_dir, x, how="lrc_keras", env=None):
    """(returncode, outputs or None, report or None, stderr) of LOADER in a fresh process."""
    np.save(tmp_path / "x.npy", x)
    y_file, report_file = tmp_path / "y.npy", tmp_path / "report.json"
    argv = [sys.executable, "-c", LOADER, how, str(export_dir), str(tmp_path / "x.npy"), str(y_file), str(report_file)]
    if how == "op_library":
        argv.append(ops.library_path())
    workdir = tmp_path / "server"
    workdir.mkdir(exist_ok=True)
    result = subprocess.run(
        argv, capture_output=True, text=True, cwd=workdir, timeout=TIMEOUT_S,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": PACKAGE_ROOT, **(env or {})},
    )
    if result.returncode != 0:
        return result.returncode, None, None, result.stderr
    return 0, np.load(y_file), json.loads(report_file.read_text()), result.stderr


@pytest.mark.parametrize("path, gemm", [("gated", False), ("gemm", True)])
def test_exported_model_serves_the_keras_numbers(trained, tmp_path, path, gemm):
    model, x = trained
    set_paths(model, path)
    expected = keras_outputs(model, x)
    model.export(str(tmp_path / "export"), verbose=False)
    types = op_types(tmp_path / "export")
    assert LAYER_OP in types and (GEMM_OP in types) == gemm, sorted(types)
    returncode, y, report, stderr = serve_in_new_process(tmp_path, tmp_path / "export", x)
    assert returncode == 0, stderr[-3000:]
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    assert report[LAYER_OP] > 0 and (report[GEMM_OP] > 0) == gemm, report


def test_loading_without_lrc_keras_names_the_missing_op(trained, tmp_path):
    model, x = trained
    set_paths(model, "gated")
    expected = keras_outputs(model, x)
    model.export(str(tmp_path / "export"), verbose=False)
    returncode, _, _, stderr = serve_in_new_process(tmp_path, tmp_path / "export", x, how="nothing")
    assert returncode != 0 and f"Op type not registered '{LAYER_OP}'" in stderr, stderr[-3000:]
    # The op library alone is enough: what a server without the Python package loads.
    returncode, y, _, stderr = serve_in_new_process(tmp_path, tmp_path / "export", x, how="op_library")
    assert returncode == 0, stderr[-3000:]
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def write_cost_model(directory, model, density):
    """A cost_model.json giving every gated layer of `model` the same crossover density at every batch."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = {
        crossover._key(layer.kernel.shape[1], layer.units, layer.rank): {b: density for b in ("1", "16", "256")}
        for layer in model.layers if isinstance(layer, LowRankGatedDense)
    }
    (directory / "cost_model.json").write_text(json.dumps(entries))
    return (directory / "cost_model.json").read_text()


# A crossover ≥ 1 means "gated at every density", 0 "gemm at every density" (lrc_keras.crossover.crossover).
@pytest.mark.parametrize("exporter, server, gemm", [(1.5, 0.0, False), (0.0, 1.5, True)])
def test_exported_auto_path_keeps_the_exporting_machines_cost_model(trained, tmp_path, monkeypatch, exporter, server,
                                                                    gemm):
    model, x = trained
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path / "exporter_cache"))
    monkeypatch.setattr(crossover, "_measured", {})  # forget what this process already read
    write_cost_model(tmp_path / "exporter_cache", model, exporter)
    set_paths(model, "auto")
    expected = keras_outputs(model, x)
    model.export(str(tmp_path / "export"), verbose=False)
    # The batch is unknown at export, so the graph holds a tf.cond with both paths.
    assert {LAYER_OP, GEMM_OP, "If"} <= op_types(tmp_path / "export")
    server_file = write_cost_model(tmp_path / "server_cache", model, server)
    returncode, y, report, stderr = serve_in_new_process(
        tmp_path, tmp_path / "export", x, env={"LRC_CACHE_DIR": str(tmp_path / "server_cache")}
    )
    assert returncode == 0, stderr[-3000:]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # The exporting machine's crossover decides; the server neither reads nor re-measures its own.
    assert report[LAYER_OP] > 0 and (report[GEMM_OP] > 0) == gemm, report
    assert report["cost_models_read"] == [], report
    assert (tmp_path / "server_cache" / "cost_model.json").read_text() == server_file


def test_dense_twin_exports_without_custom_ops(trained, tmp_path):
    # The fallback where custom ops cannot run (XLA, TFLite, a server without the library).
    model, x = trained
    twin = lrc_keras.to_dense(model)
    expected = twin(x).numpy()
    h = x.astype(np.float64)
    for layer in twin.layers:
        h = h @ layer.kernel.numpy() + layer.bias.numpy()
        h = np.maximum(h, 0.0) if layer.activation is keras.activations.relu else h
    np.testing.assert_allclose(expected, h, rtol=1e-4, atol=1e-5)
    twin.export(str(tmp_path / "export"), verbose=False)
    assert not {LAYER_OP, "LrcGatedDense", "LrcMaskedRelu"} & op_types(tmp_path / "export")
    returncode, y, _, stderr = serve_in_new_process(tmp_path, tmp_path / "export", x, how="nothing")
    assert returncode == 0, stderr[-3000:]
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
