"""What `import lrc_keras` does (check the Keras backend, nothing more), and the quiet start that commands ask for.

This module imports neither Keras nor TensorFlow at its top, so that both run before them.
"""

import contextlib
import json
import os
import re
import sys
import tempfile

# TF_CPP_MIN_LOG_LEVEL that `quiet_start` sets when the user has not: warnings and errors, no INFO lines.
QUIET_LOG_LEVEL = 1

# An absl log line: severity (I, W, E, F), month and day, time (seconds since 1970 before absl starts),
# thread, file:line].
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ ]+:\d+\] ")
_SEVERITIES = "IWEF"
_ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_DRIVER = "Could not find cuda drivers on your machine"
_FAILED_CUINIT = "failed call to cuInit"


def check_backend():
    """An ImportError, in one line, unless Keras will run on TensorFlow (the layer's ops are TensorFlow
    custom ops): read from KERAS_BACKEND or Keras' configuration file, before Keras is imported, which
    would import that backend (not even installed, perhaps)."""
    backend, source = _requested_backend()
    if backend != "tensorflow":
        raise ImportError(_backend_message(source))


def check_chosen_backend():
    """After Keras is imported: the same ImportError should Keras have chosen another backend after all."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ImportError(_backend_message(f"Keras chose the backend {keras.backend.backend()!r}"))


def _requested_backend():
    """(backend, where it is set) as Keras 3 will read it: KERAS_BACKEND, else the configuration file."""
    requested = os.environ.get("KERAS_BACKEND")
    if requested:
        return requested, f"KERAS_BACKEND={requested}"
    home = os.environ.get("KERAS_HOME")
    if not home:
        user_home = os.path.expanduser("~")
        home = os.path.join(user_home if os.access(user_home, os.W_OK) else "/tmp", ".keras")
    path = os.path.join(home, "keras.json")
    try:
        with open(path) as f:
            backend = json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow", None
    return backend, f"{path} sets the backend {backend!r}"


def _backend_message(cause):
    return (f"lrc_keras needs Keras' TensorFlow backend (its ops are TensorFlow custom ops), but {cause}; "
            "set KERAS_BACKEND=tensorflow")


def quiet_start(log_level=QUIET_LOG_LEVEL):
    """Import TensorFlow with its start-up banner held back; call it before anything imports TensorFlow.

    Sets TF_CPP_MIN_LOG_LEVEL to `log_level` unless it is set. TensorFlow 2.21 prints its banner
    (the oneDNN notice, "Could not find cuda drivers ...") through absl before its own log level
    applies, whatever TF_CPP_MIN_LOG_LEVEL says: the lines printed while TensorFlow is imported and
    finds its devices are held back (file descriptor 2 points at a temporary file meanwhile) and
    shown only if their severity reaches the level. On a machine without an NVIDIA driver, which
    TensorFlow has just said at INFO level, its failed cuInit is the same news and is held back too.
    If the import fails, everything held back is shown. Nothing is held back when TensorFlow is
    imported already or the level is 0. `import lrc_keras` does none of this: the examples and
    benchmarks call it, and so may a user's script.

    Args:
        log_level: TF_CPP_MIN_LOG_LEVEL when the environment does not set it: 0 shows everything,
            1 warnings and errors, 2 errors, 3 nothing.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", str(log_level))
    level = _log_level()
    if "tensorflow" in sys.modules or level == 0:
        return
    with _stderr_held_back(lambda lines: _shown(lines, level)):
        import tensorflow

        tensorflow.config.list_physical_devices()  # finds the GPUs: where cuInit is logged


def _log_level():
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def _shown(lines, level):
    """The lines a user at TF_CPP_MIN_LOG_LEVEL `level` should see."""
    no_driver = any(_NO_DRIVER in line for line in lines)
    shown = []
    for line in lines:
        absl = _ABSL_LINE.match(line)
        if line.strip() == _ABSL_NOTICE:
            continue
        if absl and _SEVERITIES.index(absl.group(1)) < level:
            continue
        if no_driver and _FAILED_CUINIT in line:
            continue
        shown.append(line)
    return shown


@contextlib.contextmanager
def _stderr_held_back(select):
    """Collects what is written to file descriptor 2 (C++ and Python alike), then writes `select(lines)`.

    Everything is written back if the body raises; without a usable descriptor 2 nothing is held.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        lines = None
        try:
            yield
            sys.stderr.flush()
            held.seek(0)
            lines = select(held.read().decode(errors="replace").splitlines(keepends=True))
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if lines is None:
                held.seek(0)
                lines = [held.read().decode(errors="replace")]
            for line in lines:
                os.write(2, line.encode())
