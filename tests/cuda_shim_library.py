"""Builds a tests/cuda_shim source into a ctypes library: the CUDA kernels' logic on the CPU."""

import ctypes
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
CUSTOM_OPS = os.path.join(HERE, "..", "custom_ops")
FLOAT_P = ctypes.POINTER(ctypes.c_float)


def build(source_name, directory):
    """tests/cuda_shim/`source_name` compiled with g++ into `directory`, loaded with ctypes."""
    library = os.path.join(str(directory), os.path.splitext(source_name)[0] + ".so")
    subprocess.run(
        ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{CUSTOM_OPS}",
         os.path.join(HERE, "cuda_shim", source_name), "-o", library],
        check=True,
    )
    return ctypes.CDLL(library)


def pointer(array):
    """A float* to a C-contiguous float32 numpy array's data."""
    return array.ctypes.data_as(FLOAT_P)
