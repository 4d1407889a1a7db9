"""Builds lrc_keras and compiles custom_ops/ into lrc_keras/_lrc_ops.so.

The library is compiled with the flags of the TensorFlow that pip put in the build environment
(tf.sysconfig), which is pinned to the version installed at run time (pyproject.toml and
install_requires below), and the version is recorded in _lrc_ops.json so that lrc_keras.ops
refuses a library built for another TensorFlow.

Environment:
  LRC_BUILD_OPS=0   skip the compiled ops (the package then uses its pure-TensorFlow path)
  CXX               the C++ compiler (default g++)
"""

import json
import os
import shlex
import subprocess

from setuptools import find_packages
from setuptools import setup
from setuptools.command.build_py import build_py

TENSORFLOW_PIN = "tensorflow==2.21.0"
HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["custom_ops/gated_dense_op.cc", "custom_ops/gated_dense_cpu.cc"]
# Baseline x86-64 code: the AVX2/FMA kernels are chosen at run time (__builtin_cpu_supports),
# so the library never executes an instruction the CPU lacks.
CXX_FLAGS = ["-shared", "-fPIC", "-O3", "-Wall", "-Wno-sign-compare",
             "-Wno-deprecated-declarations", "-Wno-interference-size"]


def run(command):
    print(" ".join(shlex.quote(part) for part in command), flush=True)
    subprocess.run(command, check=True)


def compile_ops(package_dir):
    import tensorflow as tf

    library = os.path.join(package_dir, "_lrc_ops.so")
    sources = [os.path.join(HERE, source) for source in CPU_SOURCES]
    compiler = os.environ.get("CXX", "g++")
    run([compiler, *CXX_FLAGS, *tf.sysconfig.get_compile_flags(), *sources, "-o", library,
         *tf.sysconfig.get_link_flags()])
    with open(os.path.join(package_dir, "_lrc_ops.json"), "w") as f:
        json.dump({"tensorflow_version": tf.__version__}, f)


class BuildPyWithOps(build_py):
    def run(self):
        super().run()
        if os.environ.get("LRC_BUILD_OPS", "1") != "0":
            compile_ops(os.path.join(self.build_lib, "lrc_keras"))


EXAMPLES = ["tensorflow-datasets>=4.9", "importlib_resources", "tensorboard", "matplotlib", "tqdm"]

setup(
    name="lrc-keras",
    version="0.1.0",
    description="Low-rank conditional computation for ReLU networks in Keras 3 (Davis & Arel, 2013)",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lrc_keras", "lrc_keras.*"]),
    install_requires=[TENSORFLOW_PIN, "keras>=3.15,<4", "numpy"],
    extras_require={"examples": EXAMPLES, "test": ["pytest>=8", *EXAMPLES]},
    cmdclass={"build_py": BuildPyWithOps},
)
