"""Memory of the gated backward's CPU kernel (LrcGatedDenseGrad): scratch that follows the work,
and failures to allocate it that are Python exceptions, not aborts.

As in test_op_memory.py, each check runs in a fresh process (tests/memory_harness.py) with two
intra-op threads.
"""

import memory_harness
import pytest

from lrc_keras import ops

pytestmark = pytest.mark.skipif(not ops.is_compiled(), reason="the compiled op is not loaded")

# `inputs(batch, input_dim, units, density)` returns grad_y, y (a fraction `density` of it
# positive), x and kernel; `check(...)` the op's gradients against float64 numpy on some rows.
PRELUDE = """
import ctypes, resource, sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(2)
from lrc_keras import ops
NO_ROWS = {}  # units: an empty sample, made by inputs(), before a test lowers the memory limit
def grad_op(grad_y, y, x, kernel):
    # The backward over y's pairs alone (no sampled rows).
    no_rows = NO_ROWS[y.shape[1]]
    return ops._library.lrc_gated_dense_grad(grad_y, y, no_rows, no_rows, x, kernel)

def inputs(batch, input_dim, units, density, seed=0):
    rng = np.random.default_rng(seed)
    NO_ROWS[units] = tf.zeros([0, units])
    y = np.where(rng.random((batch, units)) < density, 1.0, 0.0).astype(np.float32)
    return (rng.standard_normal((batch, units)).astype(np.float32), y,
            rng.standard_normal((batch, input_dim)).astype(np.float32),
            rng.standard_normal((units, input_dim)).astype(np.float32))

def check(grad_y, y, x, kernel, dx, dw, db, rows=50):
    g = np.where(y[:rows] > 0, grad_y[:rows], 0.0).astype(np.float64)
    np.testing.assert_allclose(dx[:rows], g @ kernel.astype(np.float64), rtol=1e-4, atol=1e-3)
    full = np.where(y > 0, grad_y, 0.0).astype(np.float64)
    np.testing.assert_allclose(dw, full.T @ x.astype(np.float64), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(db, full.sum(0), rtol=1e-4, atol=1e-2)

grad_op(*inputs(64, 8, 16, 0.5))  # TensorFlow's thread pools and allocators exist from here on
"""


def run_children(scripts, env=None):
    return memory_harness.run_children(PRELUDE, scripts, env, timeout=180)


def test_peak_memory_follows_the_pairs():
    # The peak RSS is reset just before the call (inputs already tensors), so its growth is what
    # the call newly touched: the gradients, and scratch of 16 bytes a pair with y > 0, a bit a
    # (row, unit), 8 bytes a row and a unit, and (batch + units) x 16 floats a worker thread
    # (input_dim 1: the narrowest gather), at most 3. A list sized for every (row, unit) would
    # take 16 x batch x units bytes whatever the density. (Pages freed earlier may be reused
    # unseen: the growth is an upper bound's test, not an equality's.)
    script = """
def status(key):
    return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key)))
batch, units, density = %d, 512, %r
arrays = [tf.constant(a) for a in inputs(batch, 1, units, density)]
open('/proc/self/clear_refs', 'w').write('5')  # the peak RSS starts again from the current RSS
before = status('VmRSS')
dx, dw, db = (t.numpy() for t in grad_op(*arrays))
print(status('VmHWM') - before)
check(*(a.numpy() for a in arrays), dx, dw, db)
"""
    cases = [(batch, density) for batch in (4000, 16000) for density in (0.0, 1.0)]
    children = run_children([script % case for case in cases])
    for returncode, _, stderr in children:
        assert returncode == 0, stderr[-2000:]
    mib = 2**20
    for (batch, density), (_, stdout, _) in zip(cases, children):
        growth = 1024 * int(stdout)
        gradients = 4 * (batch + 2 * 512)
        scratch = 16 * density * batch * 512 + batch * 512 / 8 + 8 * (batch + 512) + 3 * 64 * (batch + 512)
        assert growth <= gradients + scratch + 6 * mib, (batch, density, growth, gradients + scratch)
        if density == 0.0:  # no pairs, no lists: far below a list of every (row, unit)
            assert growth <= 16 * batch * 512 / 10, (batch, growth)


def test_packing_buffer_failure_is_resource_exhausted(tmp_path):
    # A worker thread's packing buffer, (1024 + 2048) x 64 floats = 768 KiB, is the only request
    # of the op above 256 KiB through operator new (TensorFlow's tensors use its own allocator).
    library = memory_harness.failing_new_library(str(tmp_path))
    script = """
failing_new = ctypes.CDLL(%r)
arrays = [tf.constant(a) for a in inputs(1024, 100, 2048, 0.1)]
failing_new.fail_allocations_above(ctypes.c_size_t(256 * 1024))
try:
    grad_op(*arrays)
    print('NO ERROR')
except tf.errors.ResourceExhaustedError as error:
    print('RESOURCE EXHAUSTED', error.message)
failing_new.fail_allocations_above(ctypes.c_size_t(2**64 - 1))
check(*(a.numpy() for a in arrays), *(t.numpy() for t in grad_op(*arrays)))  # all still works
print('OK')
""" % library
    [(returncode, stdout, stderr)] = run_children([script], env={"LD_PRELOAD": library})
    assert returncode == 0, (returncode, stderr[-2000:])
    assert stdout.startswith("RESOURCE EXHAUSTED"), stdout
    assert "LrcGatedDenseGrad: out of memory allocating a thread's packing buffer of " \
        "(batch 1024 + units 2048) x 64 floats" in stdout, stdout
    assert stdout.strip().endswith("OK")


def test_lists_beyond_a_memory_limit_are_resource_exhausted():
    # Every pair passes: the lists need 16 x 8000 x 2000 bytes = 256 MB, more than the 128 MiB
    # the limit leaves once the inputs (128 MB) exist; the op fails with a catchable error.
    # TF_ENABLE_ONEDNN_OPTS=0: oneDNN's CPU allocator (a BFC allocator) throws std::bad_alloc
    # from its own bookkeeping when the address space runs out, which kills the process whatever
    # the op does; TensorFlow's plain CPU allocator reports the failure to the op.
    script = """
arrays = [tf.constant(a) for a in inputs(8000, 1, 2000, 1.0)]
vm_kb = int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmSize')))
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm_kb * 1024 + 128 * 2**20, hard))
try:
    grad_op(*arrays)
    print('NO ERROR')
except tf.errors.ResourceExhaustedError as error:
    print('RESOURCE EXHAUSTED', error.message)
resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
check(*(a.numpy() for a in arrays), *(t.numpy() for t in grad_op(*arrays)))
print('OK')
"""
    [(returncode, stdout, stderr)] = run_children([script], env={"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert returncode == 0, (returncode, stderr[-2000:])
    assert stdout.startswith("RESOURCE EXHAUSTED"), stdout
    assert "LrcGatedDenseGrad: out of memory allocating the lists of the 16000000 pairs with y > 0 " \
        "(256000000 bytes) for batch 8000, units 2000" in stdout, stdout
    assert stdout.strip().endswith("OK")
