"""Every test runs with 8 emulated CPU devices, set before JAX initialises its backend, and with a
persistent compilation cache outside the clone that the test run and the commands it starts share."""

import os
from pathlib import Path

import pytest

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
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "v4post" / "jax_cache"
    ),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 * 2**30),
}
for name, value in COMPILATION_CACHE_ENV.items():
    os.environ.setdefault(name, value)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)


# The quick tier (scripts/test.sh --quick): modules of unit tests of pure functions and single layers
# on abstract or tiny inputs, a few minutes in all on 2 cores. A module joins by its name here, and
# the list fails the run when a module in it is gone, so a rename cannot silently shrink the tier.
QUICK_MODULES = frozenset(
    {
        "test_array_writer.py",
        "test_attention_blocks.py",
        "test_batch_spread.py",
        "test_data_bad_input.py",
        "test_data_pipeline.py",
        "test_data_sample.py",
        "test_data_template.py",
        "test_devices.py",
        "test_embedding.py",
        "test_full_size_sharding.py",
        "test_grouped_mlp.py",
        "test_hf_mapping.py",
        "test_hlo_collectives.py",
        "test_indexer.py",
        "test_io_priority.py",
        "test_mesh_cli.py",
        "test_mesh_cost.py",
        "test_mesh_layout.py",
        "test_mesh_matmul.py",
        "test_mesh_sharding.py",
        "test_mesh_topology.py",
        "test_model_args.py",
        "test_model_summary.py",
        "test_objectives.py",
        "test_optimizer.py",
        "test_plan_search.py",
        "test_rewards.py",
        "test_rollouts.py",
        "test_validate_config.py",
        "test_vocab_head.py",
    }
)


# Modules that take minutes, longest first with the slow tests in (CI runs them): they start first, so
# that when scripts/test.sh runs the files over several workers (pytest-xdist, a file at a time) the
# workers end together.
LONG_MODULES = (
    "test_multihost.py",
    "test_train_main.py",
    "test_train_step.py",
    "test_full_size_end_to_end.py",
    "test_plan.py",
    "test_dry_run.py",
    "test_objective_steps.py",
)
_missing = sorted(name for name in QUICK_MODULES | set(LONG_MODULES) if not (Path(__file__).parent / name).exists())
if _missing:
    raise RuntimeError(f"tests/conftest.py QUICK_MODULES or LONG_MODULES name modules that do not exist: {_missing}")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Marks the tests of QUICK_MODULES `quick`, before `-m` selects; puts LONG_MODULES first."""
    for item in items:
        if item.path.name in QUICK_MODULES:
            item.add_marker(pytest.mark.quick)
    first = {name: rank for rank, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


def pytest_report_header(config):
    return (
        f"jax {jax.__version__}: {jax.device_count()} {jax.default_backend()} devices; "
        f"compilation cache {jax.config.jax_compilation_cache_dir}"
    )
