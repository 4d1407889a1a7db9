"""Memory of the CPU kernel (issue 12 §1): scratch bounded by the layer, not by the batch, and
an allocation failure is a Python exception, not an abort.

Each check runs in a fresh process (tests/memory_harness.py) with two intra-op threads.
"""

import memory_harness
import pytest
from memory_harness import HERE

from lrc_keras import ops

pytestmark = pytest.mark.skipif(not ops.is_compiled(), reason="the compiled op is not loaded")

# A layer with input_dim 1, where the kernel's tiles used to be 98 304 units x 98 304 rows and
# its scratch 98 304 x batch x 8 bytes a thread; `run(batch, units)` returns y and the float64
# reference, checked away from the gate's boundary.
PRELUDE = """
import ctypes, resource, sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(2)
sys.path.insert(0, %r)
from conftest import away_from_boundary, numpy_gated_dense, op_inputs, random_weights
from lrc_keras import ops

def run(batch, units, seed=0):
    rng = np.random.default_rng(seed)
    weights = random_weights(rng, 1, units, 1)
    x = rng.standard_normal((batch, 1)).astype(np.float32)
    return x, weights, ops.gated_dense(*op_inputs(x, *weights), 0.0).numpy()

def check(x, weights, y):
    expected, mask, z_hat, _ = numpy_gated_dense(x, *weights, 0.0)
    keep = away_from_boundary(z_hat, 0.0)
    np.testing.assert_allclose(y[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert np.all(y[~mask & keep] == 0.0)

run(64, 16)  # TensorFlow's thread pools and allocators exist from here on
""" % HERE


def run_children(scripts, env=None):
    return memory_harness.run_children(PRELUDE, scripts, env, timeout=120)


def test_large_batch_of_a_narrow_layer_runs_under_a_memory_limit():
    # The limit is set after TensorFlow's start-up, 1 GiB above its virtual size then: TF's own
    # size depends on the machine, the old kernel's scratch did not fit (9.4 GB a thread at
    # batch 12 000), and this batch needs ~300 MB (product and y at 3000 units).
    script = """
vm_kb = int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmSize')))
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm_kb * 1024 + 2**30, hard))
results = [run(12000, 16), run(12000, 3000)]
resource.setrlimit(resource.RLIMIT_AS, (hard, hard))  # the float64 reference is not the op's
for x, weights, y in results:
    check(x[::10], weights, y[::10])  # every tenth row: the float64 reference takes seconds
print('OK')
"""
    [(returncode, stdout, stderr)] = run_children([script])
    assert returncode == 0 and stdout.strip() == "OK", (returncode, stderr[-2000:])


def test_scratch_allocation_failure_is_resource_exhausted(tmp_path):
    # Scratch is now at most 512 KiB a thread, so no memory limit fails it deterministically
    # (the op's inputs and outputs would fail first): operator new fails it instead, in the
    # worker threads, where an escaping std::bad_alloc used to abort the process.
    library = memory_harness.failing_new_library(str(tmp_path))
    script = """
failing_new = ctypes.CDLL(%r)
# Two threads split 2048 units into shards of 256 (Eigen aims at 4 shards a thread), whose
# 256 x 256 tiles need 514 KiB each (256 x (256 rows + 1 count) x 8 bytes + 256 flag bytes); nothing else the op does asks for more than 256 KiB.
failing_new.fail_allocations_above(ctypes.c_size_t(256 * 1024))
try:
    run(1024, 2048)
    print('NO ERROR')
except tf.errors.ResourceExhaustedError as error:
    print('RESOURCE EXHAUSTED', error.message)
failing_new.fail_allocations_above(ctypes.c_size_t(2**64 - 1))
check(*run(1024, 2048))  # the process and the op still work
print('OK')
""" % library
    [(returncode, stdout, stderr)] = run_children([script], env={"LD_PRELOAD": library})
    assert returncode == 0, (returncode, stderr[-2000:])
    assert stdout.startswith("RESOURCE EXHAUSTED"), stdout
    assert "LrcGatedDense: out of memory allocating the scratch of a tile of up to " \
        "256 units x 256 rows (526592 bytes a thread) for batch 1024, input_dim 1, units 2048" in stdout, stdout
    assert stdout.strip().endswith("OK")


def test_peak_memory_grows_with_the_data_not_with_scratch():
    # Peak RSS growth of one call (after a warm-up) is what the call newly touched: y, and
    # TensorFlow's copies of the estimate's product (4 bytes x units a row each) and of x. The old kernel added 98 304 x 8 bytes a
    # row per thread (2.25 GB at batch 3000); a tile capped only by the shard's units would add
    # 256 x 8 bytes a row per thread (48 MB at batch 12 000).
    units = 256  # a full tile wide: the scratch's largest
    script = """
x, weights = np.ones((%d, 1), np.float32), random_weights(np.random.default_rng(0), 1, %d, 1)
inputs = op_inputs(x, *weights)  # the estimate's product is the estimate stage's memory
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
y = ops.gated_dense(*inputs, 0.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    batches = (3000, 12000)
    children = run_children([script % (batch, units) for batch in batches])
    for returncode, _, stderr in children:
        assert returncode == 0, stderr[-2000:]
    growth = {batch: 1024 * int(stdout) for batch, (_, stdout, _) in zip(batches, children)}
    data = {batch: batch * (1 + 2 * units) * 4 for batch in batches}
    mib = 2**20
    for batch in batches:  # scratch: two threads' 514 KiB, and the allocator's slack
        assert growth[batch] <= data[batch] + 4 * mib, (batch, growth[batch], data[batch])
    assert growth[12000] - growth[3000] <= data[12000] - data[3000] + 2 * mib, (growth, data)
