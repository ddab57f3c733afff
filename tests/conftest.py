"""Every test runs with 8 emulated CPU devices, set before JAX initialises its backend, and with a
persistent compilation cache outside the clone that the test run and the commands it starts share."""
import os
from pathlib import Path

NUM_TEST_DEVICES = 8

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_TEST_DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compiling is most of the suite's time on 2 cores, and most programs take well under a second to
# compile, so every program is cached (JAX's default keeps only those over 1 s: almost none here).
# The cache is capped; JAX evicts the least recently used entries beyond the cap. Commands started
# by tests inherit these variables, except the multi-process runs (tests/test_multihost.py).
COMPILATION_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "v4post" / "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 * 2**30),
}
for name, value in COMPILATION_CACHE_ENV.items():
    os.environ.setdefault(name, value)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)


def pytest_report_header(config):
    return (f"jax {jax.__version__}: {jax.device_count()} {jax.default_backend()} devices; "
            f"compilation cache {jax.config.jax_compilation_cache_dir}")
