"""The frozen reference a run compares against, recorded in its workdir at the first start and held to on
resume.

DPO and GRPO compare against the run's initial weights (`--init_checkpoint`, or the seed's initialisation),
distillation against its teacher (`config.distill.teacher`), DPO with `config.dpo.reference=data` against the
log-probabilities stored with the pairs. A start without a checkpoint writes `<workdir>/reference.json`
(atomically) naming that reference: a checkpoint workdir (real path) and its newest step then, the seed, or
the sha256 of each stored-pairs file. A resume takes the reference from the record: the recorded step of the
recorded checkpoint, when `--init_checkpoint` is omitted and when that workdir has saved newer steps since.
A command naming another reference, or a recorded step that is gone, is bad input (`ConfigError`, one line
naming both). A resume of a workdir without a record (its checkpoints predate records, or another objective
wrote them) records the reference its command names.
"""

import glob
import hashlib
import json
import os

from configs.checkpoint_layout import CHECKPOINT_DIR
from configs.release import ConfigError
from trainer.checkpointing import Checkpointer

RECORD = "reference.json"
INIT_CHECKPOINT, TEACHER, SEED, DATA = "init_checkpoint", "teacher", "seed", "data"
FLAGS = {INIT_CHECKPOINT: "--init_checkpoint", TEACHER: "config.distill.teacher"}


def named_reference(config, objective, init_checkpoint: str | None) -> dict | None:
    """The reference this command names (a checkpoint without its step), None for an objective without one."""
    if config.objective == "distill":
        if not config.distill.teacher:
            raise ConfigError("config.distill.teacher: distillation needs the teacher's checkpoint workdir")
        return {"kind": TEACHER, "path": os.path.realpath(config.distill.teacher)}
    if objective.uses_frozen:
        if init_checkpoint:
            return {"kind": INIT_CHECKPOINT, "path": os.path.realpath(init_checkpoint)}
        return {"kind": SEED, "seed": config.seed}
    if config.objective == "dpo" and config.dpo.reference == "data":
        return {
            "kind": DATA,
            "sha256": {
                os.path.realpath(path): _sha256(path)
                for pattern, _ in config.data.preference_sources
                for path in sorted(glob.glob(pattern))
            },
        }
    return None


def describe(reference: dict) -> str:
    """The reference in words, e.g. `--init_checkpoint=/runs/sft step 600`."""
    kind = reference["kind"]
    if kind == SEED:
        return f"the initialisation of seed {reference['seed']} (no --init_checkpoint)"
    if kind == DATA:
        return "the log-probs stored in " + ", ".join(
            f"{path} (sha256 {digest[:12]})" for path, digest in reference["sha256"].items()
        )
    return f"{FLAGS[kind]}={reference['path']}" + (f" step {reference['step']}" if "step" in reference else "")


def pin_reference(
    workdir: str, config, objective, init_checkpoint: str | None, resuming: bool, write: bool, log=print
) -> dict | None:
    """The reference the run holds to (module docstring): on a resume the recorded one, checked against what
    the command names; else the named one at its checkpoint's newest step, recorded when `write` (process 0)."""
    named = named_reference(config, objective, init_checkpoint)
    if named is None:
        return None
    path = os.path.join(workdir, RECORD)
    if resuming and os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        if _names_another(recorded, named):
            raise ConfigError(
                f"{path} records the reference {describe(recorded)}, this command names "
                f"{describe(named)}: a resume keeps its reference (train another one in a new workdir)"
            )
        if recorded["kind"] in FLAGS:
            _check_kept(recorded, path, config)
        log(f"reference: {describe(recorded)} (recorded in {path})")
        return recorded
    reference = _with_step(named, config)
    if write:
        _write(path, reference)
    log(f"reference: {describe(reference)}, recorded in {path}" + (" (the workdir had none)" if resuming else ""))
    return reference


def initial_checkpoint(
    reference: dict | None, init_checkpoint: str | None, resuming: bool
) -> tuple[str, int | None] | None:
    """(checkpoint workdir, step; None: its newest) whose weights start the run, or None (the seed's
    initialisation, or a resume, which restores its own). When they are the reference, the recorded ones,
    read on a resume too: the reference is a copy of them."""
    if reference is not None and reference["kind"] == INIT_CHECKPOINT:
        return reference["path"], reference["step"]
    if init_checkpoint and not resuming:
        return init_checkpoint, None
    return None


def _names_another(recorded: dict, named: dict) -> bool:
    """Whether the command names another reference than the recorded one; no --init_checkpoint names none
    when a checkpoint is recorded."""
    if named["kind"] == SEED and recorded["kind"] == INIT_CHECKPOINT:
        return False
    return any(recorded.get(key) != value for key, value in named.items())


def _check_kept(recorded: dict, path: str, config) -> None:
    """ConfigError when the recorded checkpoint step is no longer there."""
    steps = _complete_steps(recorded["path"], config)
    if recorded["step"] not in steps:
        raise ConfigError(
            f"{path} records the reference {describe(recorded)}, which is gone ({recorded['path']} "
            f"holds complete steps {steps or 'none'})"
        )


def _with_step(named: dict, config) -> dict:
    """`named`, a checkpoint with its newest complete step; ConfigError when it has none."""
    if named["kind"] not in FLAGS:
        return named
    steps = _complete_steps(named["path"], config)
    if not steps:
        raise ConfigError(f"{describe(named)} holds no complete checkpoint")
    return dict(named, step=max(steps))


def _complete_steps(workdir: str, config) -> list[int]:
    """The complete checkpoint steps in `workdir` ([] without a checkpoints directory, which is not created)."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        return []
    checkpointer = Checkpointer(workdir, config, keep=1, save_every=1)
    try:
        return checkpointer.all_steps()
    finally:
        checkpointer.close()


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write(path: str, reference: dict) -> None:
    """Writes the record whole or not at all: a partial file, synced, then renamed over `path`."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
