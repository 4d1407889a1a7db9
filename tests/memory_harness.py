"""What the memory tests share: fresh Python processes with a prelude, and an operator new
that can be told to fail. A memory limit, a replaced operator new or a peak RSS is
process-wide, so each check runs in a process of its own, with `MALLOC_ARENA_MAX=2` so that
its virtual size does not depend on the machine's core count (glibc reserves 64 MiB of address
space for each thread's arena)."""

import os
import subprocess
import sys

from lrc_keras import ops

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ops.__file__)))


def run_children(prelude, scripts, env=None, timeout=180):
    """Runs prelude + script for each script concurrently, each in a fresh Python; returns
    (returncode, stdout, stderr)s."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", prelude + script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=HERE,
            env={**os.environ, "PYTHONPATH": PACKAGE_ROOT, "TF_CPP_MIN_LOG_LEVEL": "3",
                 "MALLOC_ARENA_MAX": "2", **(env or {})},
        )
        for script in scripts
    ]
    return [(child.wait(timeout=timeout),) + child.communicate() for child in children]


# Replaces the global operator new and new[]: after fail_allocations_above(n), a request of
# more than n bytes throws std::bad_alloc, as when memory runs out (nothrow new returns null).
FAILING_NEW = r"""
#include <atomic>
#include <cstdlib>
#include <new>
static std::atomic<std::size_t> limit{~std::size_t{0}};
extern "C" void fail_allocations_above(std::size_t bytes) { limit = bytes; }
static void* Allocate(std::size_t bytes) {
  void* p = bytes > limit.load() ? nullptr : std::malloc(bytes ? bytes : 1);
  if (!p) throw std::bad_alloc();
  return p;
}
void* operator new(std::size_t bytes) { return Allocate(bytes); }
void* operator new[](std::size_t bytes) { return Allocate(bytes); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
"""


def failing_new_library(directory):
    """Compiles FAILING_NEW into `directory`; returns the shared library's path (for ctypes)."""
    source = os.path.join(directory, "failing_new.cc")
    with open(source, "w") as f:
        f.write(FAILING_NEW)
    library = os.path.join(directory, "failing_new.so")
    subprocess.run(["g++", "-shared", "-fPIC", "-O1", source, "-o", library], check=True)
    return library
