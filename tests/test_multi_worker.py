"""Training under MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1.

Both workers and a single-process reference train the model of `multi_worker_train.py` on the
same global batches. The estimator's statistics are all-reduced and every worker refits U, V
itself, so the workers must end bit-identical, and equal to the reference up to float rounding.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import lrc_keras
from multi_worker_train import GLOBAL_BATCH, STEPS, global_batches

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lrc_keras.__file__)))
TIMEOUT_S = 120


def free_ports(count):
    """Ports nothing listens on now: bound to port 0 together (so distinct), then released."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start(out, env, multi_worker):
    """The training script writing `out`, its output in `out`.log (a file: a pipe could fill up)."""
    argv = [sys.executable, os.path.join(HERE, "multi_worker_train.py"), str(out)]
    with open(f"{out}.log", "w") as log:
        return subprocess.Popen(
            argv + (["--multi-worker"] if multi_worker else []), env=env, cwd=os.path.dirname(out),
            stdout=log, stderr=subprocess.STDOUT,
        )


def wait_all(processes):
    """Return codes once all exit; as soon as one fails or TIMEOUT_S passes, the rest are killed
    (a worker whose peer died would otherwise wait for its collectives)."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            codes = [process.poll() for process in processes]
            if all(code is not None for code in codes) or any(code not in (None, 0) for code in codes):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    return [process.returncode for process in processes]


def load(path):
    with np.load(path) as f:
        return {str(name): f[f"arr_{i}"] for i, name in enumerate(f["names"])}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi_worker")
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update({"PYTHONPATH": PACKAGE_ROOT, "TF_CPP_MIN_LOG_LEVEL": "3", "LRC_CACHE_DIR": str(tmp)})
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    outputs = [tmp / "worker0.npz", tmp / "worker1.npz", tmp / "reference.npz"]
    processes = [
        start(outputs[i], {**env, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}, True)
        for i in range(2)
    ]
    processes.append(start(outputs[2], env, False))
    codes = wait_all(processes)
    failed = [
        f"{out.name}: return code {code}" + (" (killed: another failed, or time ran out)" if code == -9 else "")
        + f"\n{open(f'{out}.log').read()[-3000:]}"
        for out, code in zip(outputs, codes) if code != 0
    ]
    assert not failed, "\n".join(failed)
    return [load(tmp / f"{name}.npz") for name in ("worker0", "worker1", "reference")]


def test_multi_worker_workers_end_identical(trained):
    worker0, worker1, _ = trained
    assert list(worker0) == list(worker1)
    for name in worker0:
        if not name.endswith("observed_density"):  # each worker's own last batch half: see below
            np.testing.assert_array_equal(worker0[name], worker1[name], err_msg=name)
    assert worker0["sequential/gated_input_svd/estimator_state/training_steps"] == STEPS  # 6 refits of each layer
    assert worker0["sequential/gated_svd/density_penalty"] > 2e-4, "the density target's strength adapted (from 1e-4)"


def test_multi_worker_matches_one_process(trained):
    worker0, worker1, reference = trained
    assert list(worker0) == list(reference)
    for name, expected in reference.items():
        if name.endswith("observed_density"):
            # Not reduced (only_first_replica): each worker keeps the density of its half of the
            # last batch, whose mean over the two equal halves is the global batch's.
            np.testing.assert_allclose((worker0[name] + worker1[name]) / 2, expected, atol=5e-3, err_msg=name)
        else:
            scale = float(np.max(np.abs(expected))) or 1.0
            np.testing.assert_allclose(worker0[name], expected, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def test_multi_worker_input_rows_are_the_global_batches(trained):
    # The first layer's inputs are the data: every worker's buffer holds the rows of all workers,
    # in the order of the global batches (each worker's half of a global batch, gathered).
    worker0, _, _ = trained
    x, _ = global_batches()
    assert worker0["sequential/gated_input_svd/estimator_state/input_rows_seen"] == STEPS * GLOBAL_BATCH
    np.testing.assert_array_equal(worker0["sequential/gated_input_svd/estimator_state/input_rows"][: STEPS * GLOBAL_BATCH], x)
