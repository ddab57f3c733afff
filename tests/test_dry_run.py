"""train.py --dry_run compiles the run its command line describes (objective, frozen model,
micro-batches, evaluation) for abstract inputs, prints the planner's report and exits 1 when it
does not fit; the batch it compiles for is the one the batch sources produce."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from data.encode import REFERENCE_LOGPS
from mesh.presets import get_topology
from model.args import from_config
from objectives import build_objective
from planner.program import lower_step
from planner.report import dry_run
from trainer.batch_source import batch_fields, build_batch_source
from trainer.optimizer import run_optimizer
from trainer.sharded_init import build_mesh
from trainer.step import batch_sharding_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_the_compiled_batch_is_the_sources_batch(objective):
    config = tiny.get_config()
    config.objective = objective
    mesh = build_mesh(config.mesh)
    source = build_batch_source(config, batch_sharding_of(mesh, config.mesh.rules), graphdef=None)
    expected = {key: (struct.shape[1:], np.dtype(struct.dtype)) for key, struct in source.abstract().items()}
    fields = batch_fields(build_objective(config).batch_keys, from_config(config.model), config.data.seq_len)
    assert {key: (dims, np.dtype(dtype)) for key, (dims, dtype) in fields.items()} == expected


def test_grpo_replay_batch_fields_are_what_rollouts_make():
    """GRPO with routing replay reads [B, S, layers, k] experts, as data/rollouts.make_batch lays them out."""
    config = tiny.get_config()
    config.objective, config.grpo.routing_replay = "grpo", True
    args = from_config(config.model)
    fields = batch_fields(build_objective(config).batch_keys, args, 16)
    assert fields["routed_experts"] == ((16, args.num_layers, args.num_experts_per_tok), np.int32)
    assert fields["sampling_logprobs"] == fields["advantages"] == ((16,), np.float32)


@pytest.mark.parametrize("reference,arguments", [("model", 3), ("data", 2)])
def test_a_dpo_step_is_lowered_with_its_frozen_model_and_batch(reference, arguments):
    """What the dry run compiles for DPO: the frozen reference as a third argument when it runs in
    the step, and the stored reference log-probabilities in the batch when it does not."""
    config = tiny.get_config()
    config.objective, config.dpo.reference = "dpo", reference
    args = from_config(config.model)
    mesh = build_mesh(config.mesh)
    lowered, state = lower_step(args, config, mesh, *run_optimizer(config, args))
    positional, _ = lowered.args_info
    assert len(positional) == arguments
    batch = {key: (info.shape, np.dtype(info.dtype)) for key, info in positional[1].items()}
    expected = {
        key: ((8, *dims), np.dtype(dtype))
        for key, (dims, dtype) in batch_fields(build_objective(config).batch_keys, args, 256).items()
    }
    assert batch == expected and (REFERENCE_LOGPS in batch) == (reference == "data")
    if arguments == 3:
        frozen = jax.tree.map(lambda info: info.shape, positional[2])
        assert frozen == jax.tree.map(lambda leaf: leaf.shape, {"params": state.params, "routing": state.routing})


def test_dry_run_of_a_micro_batched_command_reports_and_refuses(capsys):
    """The tiny config in 2 micro-batches with its evaluation, checked against an HBM of 4 MiB (its
    expert dispatch buffers, about 2 MiB, pass the planner's first check): the report names each,
    and the status is 1."""
    config = tiny.get_config()
    config.data.global_batch_size, config.train.microbatches = 16, 2  # 8 rows per micro-batch, one per device
    topology = dataclasses.replace(get_topology(config.mesh.topology), hbm_bytes=float(4 << 20))
    assert dry_run(config, topology) == 1
    printed = capsys.readouterr().out
    assert "4,096 tokens per step (16 x 256 in 2 micro-batches), objective sft" in printed
    assert "of 0.00 GiB HBM -> DOES NOT FIT" in printed
    assert "evaluation (greedy decoding): " in printed
    assert "estimated step: compute " in printed and "dry run of sft on cm384-8: " in printed


@pytest.mark.full_size
def test_dry_run_of_the_shipped_v4_flash_config(tmp_path):
    """The README's full-size command as a user runs it: the shipped V4-Flash config prints the
    report, exits 0 when it says FITS and 1 when it says DOES NOT FIT; nothing is written. Its
    compiles take tens of minutes here, so CI leaves it out (scripts/test.sh --full_size)."""
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/v4_flash.py", f"--workdir={workdir}", "--dry_run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=5400,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    assert "topology cm384: 768 devices, mesh {'data': 3, 'fsdp': 1, 'expert': 256, 'tensor': 1}" in result.stdout
    assert "3,145,728 tokens per step (768 x 4096), objective sft" in result.stdout
    verdict = "HBM -> FITS" if result.returncode == 0 else "HBM -> DOES NOT FIT"
    assert verdict in result.stdout and "evaluation (greedy decoding): " in result.stdout
    assert "estimated step: compute " in result.stdout and not workdir.exists()
