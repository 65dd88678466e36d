"""Every test runs on CPU with 8 fake devices, so sharding is exercised without accelerators."""

import os
import sys
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
# One persistent XLA compilation cache for the suite: it compiles the same tiny programs many times, in the
# pytest workers and in the CLI subprocesses they start (which inherit these variables). Measured here:
# tests/test_train.py from an empty cache 184 -> 119 s. Set JAX_COMPILATION_CACHE_DIR to use another folder.
_XLA_CACHE = os.path.join(tempfile.gettempdir(), "voltron_jax_test_xla_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
