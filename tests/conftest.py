"""Test setup: eight simulated CPU devices (must be set before jax is imported), and one
persistent compilation cache for the whole session.

The cache matters for time, not behaviour: many tests run ``python -m glm_jax.train`` in
subprocesses that compile the same programs (a run, its interrupted twin, the resume),
and a cached executable is bit-identical to a fresh compile. The directory lives only as
long as the session, so no test sees another session's programs. Subprocesses inherit it
through the environment.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The TPU ahead-of-time compile tests load libtpu, which otherwise refuses to start while any
# other process on the machine (a jax program run by hand, say) holds its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="glm_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
