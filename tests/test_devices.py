import jax

from tests.conftest import NUM_TEST_DEVICES


def test_emulated_devices():
    assert jax.device_count() == NUM_TEST_DEVICES
