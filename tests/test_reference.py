"""The frozen reference of a run is recorded in its workdir at the first start and held to on resume
(trainer/reference.py): a resume without --init_checkpoint reads the recorded checkpoint at the recorded
step, also after that checkpoint's workdir saved newer steps; a command naming another reference, or a
recorded step that is gone, is one line of bad input naming both (train.py: exit status 2).

The reference checkpoints are weights-only saves of random values on the tiny config's mesh (as
convert.py writes them), so nothing is compiled; one test runs train.py, which refuses before compiling.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from configs import tiny
from configs.release import ConfigError
from mesh.sharding import activate
from model.args import from_config
from objectives import build_objective
from trainer.checkpointing import Checkpointer, abstract_train_state
from trainer.optimizer import build_optimizer
from trainer.reference import RECORD, initial_checkpoint, pin_reference
from trainer.sharded_init import build_mesh
from trainer.state import abstract_params

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 600  # a bound for a loaded 2-core machine, never reached when things work


def _config(objective="dpo", **overrides):
    config = tiny.get_config()
    config.objective = objective
    for dotted, value in overrides.items():
        section, field = dotted.split("__")
        config[section][field] = value
    return config


def _random_weights(abstract, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: jax.device_put(rng.standard_normal(leaf.shape).astype(leaf.dtype), leaf.sharding), abstract
    )


def _save(workdir: Path, step: int, weights) -> None:
    """A weights-only checkpoint of `step` in `workdir`, as convert.py's import writes one."""
    checkpointer = Checkpointer(workdir, _config(), keep=5, save_every=1, async_save=False)
    checkpointer.save(step, weights, {}, force=True)
    checkpointer.close()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """-> (abstract {"params", "routing"} on the tiny mesh, weights of checkpoint A, of checkpoint B, dir of A,
    dir of B); A and B hold one step, 1."""
    config = _config()
    args = from_config(config.model)
    mesh, rules = build_mesh(config.mesh), config.mesh.rules
    with activate(mesh, rules):
        abstract = abstract_train_state(args, mesh, rules, build_optimizer(config.optimizer, abstract_params(args)))
    abstract = {"params": abstract.params, "routing": abstract.routing}
    a, b = _random_weights(abstract, 1), _random_weights(abstract, 2)
    root = tmp_path_factory.mktemp("references")
    _save(root / "a", 1, a)
    _save(root / "b", 1, b)
    return abstract, a, b, root / "a", root / "b"


def _pin(workdir: Path, init_checkpoint, resuming: bool, config=None, log=None):
    """train.py's start in `workdir` (made first), as far as the reference goes."""
    config = config or _config()
    workdir.mkdir(exist_ok=True)
    return pin_reference(
        str(workdir),
        config,
        build_objective(config),
        init_checkpoint and str(init_checkpoint),
        resuming,
        write=True,
        log=log or (lambda _: None),
    )


def _reference_weights(reference, abstract):
    """What train.py makes the DPO reference: the weights of the initial checkpoint the record names."""
    path, step = initial_checkpoint(reference, None, resuming=True)
    checkpointer = Checkpointer(path, _config(), keep=1, save_every=1)
    try:
        return checkpointer.restore_weights(step, abstract)[0]
    finally:
        checkpointer.close()


def _assert_same(ours, theirs):
    chex.assert_trees_all_equal(ours, theirs)


def test_the_first_start_records_the_reference(weights, tmp_path):
    _, _, _, a, _ = weights
    lines = []
    reference = _pin(tmp_path, a, resuming=False, log=lines.append)
    assert reference == {"kind": "init_checkpoint", "path": os.path.realpath(a), "step": 1}
    assert json.loads((tmp_path / RECORD).read_text()) == reference
    assert os.listdir(tmp_path) == [RECORD]
    assert lines == [f"reference: --init_checkpoint={os.path.realpath(a)} step 1, recorded in {tmp_path / RECORD}"]


def test_a_resume_without_the_flag_reads_the_recorded_reference(weights, tmp_path):
    abstract, a_weights, _, a, _ = weights
    recorded = _pin(tmp_path, a, resuming=False)
    reference = _pin(tmp_path, None, resuming=True)
    assert reference == recorded
    _assert_same(_reference_weights(reference, abstract), a_weights)


def _recorded_copy(tmp_path, checkpoint, name):
    """A copy of `checkpoint` at tmp_path/name, recorded by a first start in tmp_path/run -> (copy, workdir)."""
    copy = tmp_path / name
    shutil.copytree(checkpoint, copy)
    workdir = tmp_path / "run"
    _pin(workdir, copy, resuming=False)
    return copy, workdir


def test_a_reference_that_saved_newer_steps_is_read_at_the_recorded_step(weights, tmp_path):
    abstract, a_weights, b_weights, a, _ = weights
    moving, workdir = _recorded_copy(tmp_path, a, "moving")
    _save(moving, 2, b_weights)
    reference = _pin(workdir, moving, resuming=True)
    assert reference["step"] == 1
    _assert_same(_reference_weights(reference, abstract), a_weights)
    assert _pin(tmp_path / "new_run", moving, resuming=False)["step"] == 2


def test_a_resume_naming_another_checkpoint_exits_2_naming_both(weights, tmp_path):
    """train.py resuming a DPO run (its checkpoint: a copy of A) with --init_checkpoint=B refuses before
    compiling anything, and leaves the record as it was."""
    _, _, _, a, b = weights
    workdir = tmp_path / "run"
    _pin(workdir, a, resuming=False)
    shutil.copytree(a / "checkpoints", workdir / "checkpoints")
    record = (workdir / RECORD).read_text()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/tiny.py",
            f"--workdir={workdir}",
            "--config.objective=dpo",
            f"--init_checkpoint={b}",
            "--config.eval.num_examples=0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [
        f"error: {workdir / RECORD} records the reference --init_checkpoint={os.path.realpath(a)} "
        f"step 1, this command names --init_checkpoint={os.path.realpath(b)}: a resume keeps its "
        "reference (train another one in a new workdir)"
    ], result.stderr[-3000:]
    assert (workdir / RECORD).read_text() == record


@pytest.mark.parametrize(
    "first, then, recorded, named",
    [
        ({}, {"init": "a"}, "the initialisation of seed 0 (no --init_checkpoint)", "--init_checkpoint={a}"),
        (
            {},
            {"seed": 1},
            "the initialisation of seed 0 (no --init_checkpoint)",
            "the initialisation of seed 1 (no --init_checkpoint)",
        ),
        ({"teacher": "a"}, {"teacher": "b"}, "config.distill.teacher={a} step 1", "config.distill.teacher={b}"),
    ],
    ids=["a-checkpoint-where-the-seed-was", "another-seed", "another-teacher"],
)
def test_another_reference_on_resume_is_refused(weights, tmp_path, first, then, recorded, named):
    """The seed's initialisation is a reference too, and so is distillation's teacher."""
    _, _, _, a, b = weights
    paths = {"a": os.path.realpath(a), "b": os.path.realpath(b)}

    def start(resuming, init=None, seed=0, teacher=None):
        objective = "distill" if teacher else "dpo"
        config = _config(objective, distill__teacher=paths[teacher] if teacher else "")
        config.seed = seed
        return _pin(tmp_path, init and paths[init], resuming, config)

    start(False, **first)
    with pytest.raises(ConfigError) as error:
        start(True, **then)
    assert str(error.value) == (
        f"{tmp_path / RECORD} records the reference {recorded.format(**paths)}, this command "
        f"names {named.format(**paths)}: a resume keeps its reference (train another one in "
        "a new workdir)"
    )


def test_a_recorded_step_that_is_gone_is_named(weights, tmp_path):
    _, a_weights, _, a, _ = weights
    gone, workdir = _recorded_copy(tmp_path, a, "gone")
    _save(gone, 2, a_weights)
    shutil.rmtree(gone / "checkpoints" / "1")
    with pytest.raises(
        ConfigError,
        match=rf"^{workdir / RECORD} records the reference --init_checkpoint=\S+gone "
        r"step 1, which is gone \(\S+gone holds complete steps \[2\]\)$",
    ):
        _pin(workdir, None, resuming=True)
    shutil.rmtree(gone)
    with pytest.raises(ConfigError, match=r"which is gone \(\S+gone holds complete steps none\)$"):
        _pin(workdir, None, resuming=True)
    assert not gone.exists()


def test_stored_log_probs_are_recorded_by_their_digest(tmp_path):
    pairs = tmp_path / "scored.jsonl"
    pairs.write_text(
        '{"prompt": "p", "chosen": "c", "rejected": "r", "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}\n'
    )
    config = _config(dpo__reference="data", data__preference_sources=((str(pairs), 1.0),))
    workdir = tmp_path / "run"
    recorded = _pin(workdir, None, resuming=False, config=config)
    assert recorded["kind"] == "data" and list(recorded["sha256"]) == [os.path.realpath(pairs)]
    assert _pin(workdir, None, resuming=True, config=config) == recorded
    pairs.write_text(pairs.read_text().replace("-2.0", "-3.0"))
    with pytest.raises(
        ConfigError,
        match=r"records the reference the log-probs stored in \S+scored.jsonl \(sha256 "
        r"(\w{12})\), this command names the log-probs stored in \S+scored.jsonl "
        r"\(sha256 (?!\1)\w{12}\)",
    ):
        _pin(workdir, None, resuming=True, config=config)


def test_a_resume_of_a_workdir_without_a_record_records_the_named_reference(weights, tmp_path):
    _, _, _, a, _ = weights
    lines = []
    reference = _pin(tmp_path, a, resuming=True, log=lines.append)
    assert (
        json.loads((tmp_path / RECORD).read_text())
        == reference
        == {"kind": "init_checkpoint", "path": os.path.realpath(a), "step": 1}
    )
    assert lines[0].endswith("(the workdir had none)")


@pytest.mark.parametrize("objective, overrides", [("sft", {}), ("grpo", {"grpo__kl_coef": 0.0})])
def test_a_run_without_a_reference_records_none(tmp_path, objective, overrides):
    assert _pin(tmp_path, None, resuming=False, config=_config(objective, **overrides)) is None
    assert os.listdir(tmp_path) == []
