"""What a user sees when lrc_keras is imported: the backend check, the shadowed-op warning, a quiet start."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import lrc_keras
from lrc_keras import startup

PACKAGE_DIR = os.path.dirname(os.path.abspath(lrc_keras.__file__))
PACKAGE_PARENT = os.path.dirname(PACKAGE_DIR)  # the package under test: this tree's, or the installed copy in CI
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code, cwd, **env):
    """Runs `python -c code` in a fresh process: (returncode, stdout, stderr)."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("KERAS_BACKEND", "KERAS_HOME", "PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("backend", ["jax", "numpy"])
def test_another_backend_is_one_line(tmp_path, backend):
    returncode, _, stderr = python("import lrc_keras", tmp_path, PYTHONPATH=PACKAGE_PARENT, KERAS_BACKEND=backend)
    assert returncode != 0
    assert stderr.splitlines()[-1] == (
        "ImportError: lrc_keras needs Keras' TensorFlow backend (its ops are TensorFlow custom ops), "
        f"but KERAS_BACKEND={backend}; set KERAS_BACKEND=tensorflow")
    assert "ModuleNotFoundError" not in stderr  # Keras never tried to import jax


def test_backend_from_keras_configuration_is_one_line(tmp_path):
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "numpy"}))
    returncode, _, stderr = python("import lrc_keras", tmp_path, PYTHONPATH=PACKAGE_PARENT, KERAS_HOME=str(tmp_path))
    assert returncode != 0
    assert stderr.splitlines()[-1] == (
        "ImportError: lrc_keras needs Keras' TensorFlow backend (its ops are TensorFlow custom ops), "
        f"but {tmp_path / 'keras.json'} sets the backend 'numpy'; set KERAS_BACKEND=tensorflow")
    assert "ModuleNotFoundError" not in stderr


def fake_installation(site, package_dir=None, editable_tree=None):
    """A distribution `lrc-keras` in `site`: its package (with a library file) there, or an editable
    install of `editable_tree` (whose package has the library file)."""
    info = site / "lrc_keras-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lrc-keras\nVersion: 0.1.0\n")
    if editable_tree is not None:
        (info / "direct_url.json").write_text(json.dumps(
            {"dir_info": {"editable": True}, "url": editable_tree.as_uri()}))
        package_dir = editable_tree / "lrc_keras"
    package_dir.mkdir(parents=True)
    (package_dir / "_lrc_ops.so").write_bytes(b"")  # only looked for, never loaded
    return package_dir


@pytest.mark.parametrize("installed", ["site-packages", "editable"])
def test_source_tree_without_the_op_names_the_built_copy_and_the_fix(tmp_path, installed):
    clone = tmp_path / "clone"
    shutil.copytree(PACKAGE_DIR, clone / "lrc_keras", ignore=shutil.ignore_patterns("_lrc_ops.*", "__pycache__"))
    (clone / "setup.py").write_text("")
    site = tmp_path / "site"
    if installed == "editable":
        built = fake_installation(site, editable_tree=tmp_path / "other_clone")
    else:
        built = fake_installation(site, package_dir=site / "lrc_keras")
    # Started in the clone's root: the current folder comes first on the import path.
    returncode, stdout, stderr = python("import lrc_keras; print(lrc_keras.__file__, lrc_keras.ops.is_compiled())",
                                        clone, PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="2")
    assert returncode == 0, stderr
    assert stdout.split() == [str(clone / "lrc_keras" / "__init__.py"), "False"]
    warning = [line for line in stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warning) == 1, stderr
    assert (f"Python imported lrc_keras from the source tree {clone}, which has no "
            f"{clone / 'lrc_keras' / '_lrc_ops.so'}, not the built copy in {built}") in warning[0]
    assert warning[0].endswith(f"To fix, build it into this source tree with `pip install -e {clone}`, "
                               "or run from another folder.")


ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
ONEDNN = "I0000 00:00:1795973468.205273    3902 port.cc:153] oneDNN custom operations are on.\n"
NO_DRIVER = ("I0000 00:00:1795973468.205557    3902 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
             "GPU will not be used.\n")
CUINIT = ("E0000 00:00:1795973470.370363    3902 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
          "Failed call to cuInit: UNKNOWN ERROR (303)\n")
WARNING = "W0000 00:00:1795973470.370363    3902 some_file.cc:7] a warning\n"
ERROR = "E1129 17:30:01.370363    3902 some_file.cc:9] an error\n"
PYTHON = "/x.py:3: UserWarning: a Python warning\n"


@pytest.mark.parametrize("level, lines, shown", [
    (1, [ABSL_NOTICE, ONEDNN, NO_DRIVER, WARNING, CUINIT, ERROR, PYTHON], [WARNING, ERROR, PYTHON]),
    (2, [ABSL_NOTICE, ONEDNN, NO_DRIVER, WARNING, CUINIT, ERROR, PYTHON], [ERROR, PYTHON]),
    (3, [ABSL_NOTICE, ONEDNN, WARNING, CUINIT, ERROR, PYTHON], [PYTHON]),
    # A machine with a driver whose cuInit fails: that is news.
    (1, [ABSL_NOTICE, ONEDNN, CUINIT], [CUINIT]),
], ids=["warnings", "errors", "fatal", "driver-present"])
def test_start_up_lines_shown_at_a_log_level(level, lines, shown):
    assert startup._shown(lines, level) == shown


ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ ]+:\d+\] ")


def banner_lines(stderr):
    """TensorFlow's start-up lines in `stderr`: absl's INFO lines, its notice, a failed cuInit."""
    return [line for line in stderr.splitlines()
            if (ABSL_LINE.match(line) and line[0] == "I") or "absl::InitializeLog" in line or "cuInit" in line]


@pytest.mark.parametrize("command", [[os.path.join(REPOSITORY, "benchmarks", "benchmark.py")],
                                     [os.path.join(REPOSITORY, "benchmarks", "gated_layer_step.py")],
                                     [os.path.join(REPOSITORY, "examples", "mnist.py")]],
                         ids=["benchmark", "gated_layer_step", "mnist"])
def test_commands_start_quietly(tmp_path, command):
    # TF_CPP_MIN_LOG_LEVEL unset: the command sets 1, which hides TensorFlow's INFO banner.
    done = subprocess.run([sys.executable, *command, "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
                          | {"PYTHONPATH": PACKAGE_PARENT})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")
    assert banner_lines(done.stderr) == []


# What a process's start-up may change: its standard file descriptors, TF_CPP_MIN_LOG_LEVEL, Python's loggers
# and warning filters. Printed as JSON, with the calls to os.dup and os.dup2 made while `import_code` ran.
STATE = """
import json, logging, os, sys, warnings
fds = [os.readlink(f"/proc/self/fd/{{fd}}") for fd in (0, 1, 2)]
calls = []
for name in ("dup", "dup2"):
    def recorded(*args, call=getattr(os, name), name=name):
        calls.append(name)
        return call(*args)
    setattr(os, name, recorded)
{import_code}
loggers = {{name: (logger.level, logger.propagate, logger.disabled, [type(h).__name__ for h in logger.handlers])
           for name, logger in logging.Logger.manager.loggerDict.items() if isinstance(logger, logging.Logger)}}
print(json.dumps({{"calls": calls, "fds kept": fds == [os.readlink(f"/proc/self/fd/{{fd}}") for fd in (0, 1, 2)],
                  "log_level": os.environ.get("TF_CPP_MIN_LOG_LEVEL"), "warnings": len(warnings.filters),
                  "root": [logging.root.level, [type(h).__name__ for h in logging.root.handlers]],
                  "loggers": loggers}}))
"""


@pytest.mark.parametrize("log_level", [None, "1"], ids=["TF_CPP_MIN_LOG_LEVEL unset", "TF_CPP_MIN_LOG_LEVEL=1"])
def test_import_changes_no_file_descriptor_and_no_logging(tmp_path, log_level):
    env = {"PYTHONPATH": PACKAGE_PARENT} | ({"TF_CPP_MIN_LOG_LEVEL": log_level} if log_level else {})
    # lrc_keras imported first, then used (which imports TensorFlow and Keras), against TensorFlow and Keras alone.
    states = []
    for import_code in ("import lrc_keras\nlrc_keras.LowRankGatedDense(4, rank=2)\nimport tensorflow, keras",
                        "import tensorflow, keras"):
        returncode, stdout, stderr = python(STATE.format(import_code=import_code), tmp_path, **env)
        assert returncode == 0, stderr
        states.append(json.loads(stdout.splitlines()[-1]))
    with_lrc_keras, alone = states
    assert with_lrc_keras["calls"] == [] and with_lrc_keras["fds kept"] and with_lrc_keras["log_level"] == log_level
    assert with_lrc_keras == alone


def test_public_names_whatever_is_imported_first(tmp_path):
    # Importing the modules lrc_keras.convert and lrc_keras.calibrate first leaves the functions of those names.
    returncode, stdout, stderr = python(
        "import lrc_keras.convert, lrc_keras.calibrate, lrc_keras\n"
        "print(*(type(getattr(lrc_keras, name)).__name__ for name in sorted(lrc_keras.__all__)))",
        tmp_path, PYTHONPATH=PACKAGE_PARENT, TF_CPP_MIN_LOG_LEVEL="3")
    assert returncode == 0, stderr
    assert dict(zip(sorted(lrc_keras.__all__), stdout.split())) == {
        "LowRankGatedDense": "type", "calibrate": "function", "callbacks": "module", "convert": "function",
        "crossover": "module", "measure_gates": "function", "ops": "module", "quiet_start": "function", "set_audit": "function",
        "to_dense": "function"}


def readme_quickstart():
    readme = open(os.path.join(REPOSITORY, "README.md")).read()
    quickstart = readme[readme.index("## Quickstart"):]
    start = quickstart.index("```python\n") + len("```python\n")
    return quickstart[start:quickstart.index("\n```", start)]


def test_readme_quickstart_as_pasted_prints_no_banner(tmp_path):
    # The package under test on the import path, as an install puts it there.
    script = tmp_path / "quickstart.py"
    script.write_text(readme_quickstart())
    returncode, stdout, stderr = python(f"exec(open({str(script)!r}).read())", tmp_path, PYTHONPATH=PACKAGE_PARENT)
    assert returncode == 0, stderr
    assert banner_lines(stderr) == [], stderr
    assert re.search(r"^test accuracy 0\.\d{3}$", stdout, re.MULTILINE) and "hidden_1: density" in stdout, stdout
