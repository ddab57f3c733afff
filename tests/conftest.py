"""Every test runs with 8 emulated CPU devices, set before JAX initialises its backend."""
import os

NUM_TEST_DEVICES = 8

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_TEST_DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)


def pytest_report_header(config):
    return f"jax {jax.__version__}: {jax.device_count()} {jax.default_backend()} devices"
