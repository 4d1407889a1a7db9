"""Builds lrc_keras and compiles custom_ops/ into lrc_keras/_lrc_ops.so.

`pip install .` puts the library in the installed package; `pip install -e .` compiles it into
this source tree's lrc_keras/, so that Python started in the tree (whose current folder comes
first on the import path) finds the op too.

The library is compiled with the flags of the TensorFlow of the build environment (tf.sysconfig):
any version in TENSORFLOW_RANGE, the newest that pip finds when it builds in isolation, or the one
already installed with `pip install --no-build-isolation`. The built distribution requires exactly
that version (install_requires below), and it is recorded in _lrc_ops.json so that lrc_keras.ops
refuses a library built for another TensorFlow, naming both. The wheel is a platform wheel
(cp3XX-cp3XX-linux_x86_64): it holds a compiled library, for one Python and one TensorFlow.

The GPU kernels are compiled too when nvcc is found (on the PATH or in $CUDA_HOME/bin) and the
installed TensorFlow is a CUDA build: nvcc compiles the *.cu.cc files, which need only the
CUDA runtime header, and the host compiler the rest with the CUDA headers TensorFlow ships.

Environment:
  LRC_BUILD_OPS=0   skip the compiled ops (the package then uses its pure-TensorFlow path, and
                    says at import that the build was skipped on request)
  LRC_CUDA=0        skip the GPU kernels; LRC_CUDA=1 makes a missing nvcc or CUDA TF an error
  CXX               the C++ compiler (default g++)
"""

import json
import os
import shlex
import shutil
import subprocess

from setuptools import Command
from setuptools import find_packages
from setuptools import setup
from setuptools.command.build import build
from setuptools.dist import Distribution

# The TensorFlow versions lrc-keras is tested with; pyproject.toml's build requirement says the same.
TENSORFLOW_RANGE = "tensorflow>=2.20,<2.22"
HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["custom_ops/gated_dense_ops.cc", "custom_ops/gated_dense_kernels.cc", "custom_ops/gated_dense_cpu.cc",
               "custom_ops/gated_dense_grad_ops.cc", "custom_ops/gated_dense_grad_kernels.cc",
               "custom_ops/gated_dense_grad_cpu.cc", "custom_ops/gated_layer_ops.cc",
               "custom_ops/gated_layer_kernels.cc", "custom_ops/gated_layer_cpu.cc"]
GPU_HOST_SOURCES = ["custom_ops/gated_dense_gpu.cc", "custom_ops/gated_dense_grad_gpu.cc",
                    "custom_ops/gated_layer_gpu.cc"]
GPU_DEVICE_SOURCES = ["custom_ops/gated_dense_gpu.cu.cc", "custom_ops/gated_dense_grad_gpu.cu.cc",
                      "custom_ops/gated_layer_gpu.cu.cc"]
# sm_80 (A100) and sm_90 (H100) machine code, plus PTX that newer GPUs compile at load time.
NVCC_ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
              "-gencode", "arch=compute_90,code=compute_90"]
# Baseline x86-64 code: the AVX2/FMA kernels are chosen at run time (__builtin_cpu_supports),
# so the library never executes an instruction the CPU lacks.
CXX_FLAGS = ["-shared", "-fPIC", "-O3", "-Wall", "-Wno-sign-compare",
             "-Wno-deprecated-declarations", "-Wno-interference-size"]


def run(command):
    print(" ".join(shlex.quote(part) for part in command), flush=True)
    subprocess.run(command, check=True)


def find_nvcc(tf):
    """nvcc's path when the GPU kernels should be built, else None (LRC_CUDA decides strictness)."""
    wanted = os.environ.get("LRC_CUDA", "auto")
    if wanted == "0":
        return None
    cuda_home = os.environ.get("CUDA_HOME")
    nvcc = shutil.which("nvcc") or (
        os.path.join(cuda_home, "bin", "nvcc") if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")) else None
    )
    cuda_tensorflow = tf.sysconfig.get_build_info().get("is_cuda_build", False)
    if nvcc and cuda_tensorflow:
        return nvcc
    if wanted == "1":
        raise RuntimeError(
            "LRC_CUDA=1 but " + ("nvcc was not found (PATH, $CUDA_HOME/bin)" if not nvcc else
                                 f"TensorFlow {tf.__version__} is not a CUDA build")
        )
    return None


def compile_ops(package_dir, build_temp):
    import tensorflow as tf

    library = os.path.join(package_dir, "_lrc_ops.so")
    sources = [os.path.join(HERE, source) for source in CPU_SOURCES]
    flags = [*CXX_FLAGS, *tf.sysconfig.get_compile_flags()]
    nvcc = find_nvcc(tf)
    if nvcc:
        os.makedirs(build_temp, exist_ok=True)
        device_objects = []
        for source in GPU_DEVICE_SOURCES:
            device_objects.append(os.path.join(build_temp, os.path.basename(source).replace(".cc", ".o")))
            run([nvcc, "-c", "-x", "cu", "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-DGOOGLE_CUDA=1",
                 *NVCC_ARCHS, os.path.join(HERE, source), "-o", device_objects[-1]])
        cuda_headers = os.path.join(tf.sysconfig.get_include(), "third_party", "gpus", "cuda", "include")
        flags += ["-DGOOGLE_CUDA=1", f"-I{cuda_headers}"]
        sources += [os.path.join(HERE, source) for source in GPU_HOST_SOURCES] + device_objects
    compiler = os.environ.get("CXX", "g++")
    run([compiler, *flags, *sources, "-o", library, *tf.sysconfig.get_link_flags()])
    with open(os.path.join(package_dir, "_lrc_ops.json"), "w") as f:
        json.dump({"tensorflow_version": tf.__version__, "cuda": bool(nvcc)}, f)


def record_skipped_build(package_dir):
    """Says in _lrc_ops.json that the ops were skipped on purpose, so lrc_keras.ops does not
    report a broken build; drops a library an earlier build left there."""
    library = os.path.join(package_dir, "_lrc_ops.so")
    if os.path.exists(library):
        os.remove(library)
    with open(os.path.join(package_dir, "_lrc_ops.json"), "w") as f:
        json.dump({"skipped": "LRC_BUILD_OPS=0"}, f)


class BuildOps(Command):
    """Compiles custom_ops/ into lrc_keras/_lrc_ops.so: into the build folder for a wheel, or, in an
    editable install (`pip install -e .`, setuptools' editable_mode), into the source tree itself,
    which is where the editable install imports lrc_keras from.

    A command of its own rather than part of build_py: setuptools runs a customised build_py
    "safely" in editable installs, turning a failed compilation into a hidden warning.
    """

    description = "compile the TensorFlow custom ops into lrc_keras/_lrc_ops.so"
    user_options = [("build-lib=", "d", "directory of the built package (default: build's)")]
    OUTPUTS = ("_lrc_ops.so", "_lrc_ops.json")

    def initialize_options(self):
        self.build_lib = None
        self.build_temp = None
        self.editable_mode = False

    def finalize_options(self):
        self.set_undefined_options("build", ("build_lib", "build_lib"), ("build_temp", "build_temp"))

    def package_dir(self):
        return os.path.join(HERE if self.editable_mode else self.build_lib, "lrc_keras")

    def run(self):
        package_dir = self.package_dir()
        os.makedirs(package_dir, exist_ok=True)
        if os.environ.get("LRC_BUILD_OPS", "1") == "0":
            record_skipped_build(package_dir)
        else:
            compile_ops(package_dir, os.path.join(self.build_temp, "lrc_ops_temp"))

    # setuptools' build sub-command protocol (setuptools.command.build.SubCommand).
    def get_outputs(self):
        return [os.path.join(self.package_dir(), name) for name in self.OUTPUTS]

    def get_output_mapping(self):
        return {}

    def get_source_files(self):
        return [*CPU_SOURCES, *GPU_HOST_SOURCES, *GPU_DEVICE_SOURCES]


class BuildWithOps(build):
    sub_commands = build.sub_commands + [("build_ops", None)]


class DistributionWithOps(Distribution):
    """A distribution with a compiled library: wheels are tagged for this Python and platform, not py3-none-any."""

    def has_ext_modules(self):
        return True


def tensorflow_requirement():
    """The TensorFlow that the op is compiled against, exactly; TENSORFLOW_RANGE where none is installed
    (metadata only: compile_ops needs one)."""
    try:
        import tensorflow as tf
    except ImportError:
        return TENSORFLOW_RANGE
    return f"tensorflow=={tf.__version__}"


EXAMPLES = ["tensorflow-datasets>=4.9", "importlib_resources", "tensorboard", "matplotlib"]

setup(
    name="lrc-keras",
    version="0.1.0",
    description="Low-rank conditional computation for ReLU networks in Keras 3 (Davis & Arel, 2013)",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lrc_keras", "lrc_keras.*"]),
    install_requires=[tensorflow_requirement(), "keras>=3.15,<4", "numpy"],
    extras_require={"examples": EXAMPLES, "test": ["pytest>=8", *EXAMPLES]},
    cmdclass={"build": BuildWithOps, "build_ops": BuildOps},
    distclass=DistributionWithOps,
)
