"""Converts DeepSeek-V4 checkpoints between the Hugging Face layout and this project's Orbax layout.

    python convert.py --direction=import --config=configs/v4_flash.py --input=HF_DIR --output=OUT [--dry_run]
    python convert.py --direction=export --config=configs/v4_flash.py --input=WORKDIR --output=HF_DIR [--format=fp8]

Invariants: both directions check every tensor against the config before writing, stream one tensor at
a time, and create OUT only once it is complete. An import may be shared by N processes (hf_io/team.py);
an export runs in one process. Start at `main`; the work is in hf_io/importer.py and hf_io/exporter.py.
Flags, formats and multi-process imports: docs/conversion.md.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from configs.release import ConfigError
from trainer import distributed
from trainer.cli import exits_on_bad_input, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model + mesh config, e.g. configs/v4_flash.py.")
_DIRECTION = flags.DEFINE_enum("direction", None, ["import", "export"], "import: HF -> Orbax; export: Orbax -> HF.")
_INPUT = flags.DEFINE_string("input", None, "Import: HF checkpoint directory. Export: train.py workdir.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to create (must not exist).")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "bfloat16",
    ["bfloat16", "float32"],
    "Import: storage dtype of weights held in bf16 or quantised (F32 tensors stay F32).",
)
_FORMAT = flags.DEFINE_enum(
    "format", "bf16", ["bf16", "fp8"], "Export: bf16, or fp8 = the release's FP8 tiles with MXFP4 routed experts."
)
_STEP = flags.DEFINE_integer("step", None, "Export: checkpoint step (default: the latest complete one).")
_SHARD_GIB = flags.DEFINE_float("shard_gib", 5.0, "Export: maximum safetensors shard size in GiB.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Only validate the input against the config; write nothing.")
_WAIT = flags.DEFINE_integer(
    "team_wait_s",
    3600,
    "Import in several processes: how long one that finished its share waits for the others before failing.",
)


def _team():
    """This process's place in the conversion; joins the other processes if there are several."""
    from hf_io.team import Team

    processes = distributed.from_flags()
    if processes.count == 1:
        return Team(wait_s=_WAIT.value)
    if _DIRECTION.value == "export":
        raise ConfigError(f"--direction=export runs in one process; got {processes.count} processes")
    # Only the coordination service and one default device per process are needed: no emulation.
    distributed.initialize(processes, None, emulate_devices=False)
    import jax

    if not distributed.is_primary():
        logging.set_verbosity(logging.WARNING)
    return Team(jax.process_index(), jax.process_count(), _WAIT.value)


@exits_on_bad_input
def main(argv):
    del argv
    from hf_io.exporter import export_checkpoint
    from hf_io.importer import import_checkpoint

    config = _CONFIG.value
    team = _team()
    if _DIRECTION.value == "import":
        summary = import_checkpoint(
            _INPUT.value, _OUTPUT.value, config, dtype=_DTYPE.value, dry_run=_DRY_RUN.value, team=team
        )
        if not team.is_lead:
            return
        print(
            f"{'validated' if _DRY_RUN.value else 'imported'} {summary.tensors} tensors "
            f"({summary.input_bytes / 2**30:.2f} GiB) from {_INPUT.value}"
            + ("" if _DRY_RUN.value else f" into {_OUTPUT.value}")
            + (" (no MTP weights in the input)" if summary.without_mtp else ""),
            flush=True,
        )
    else:
        plan = export_checkpoint(
            _INPUT.value,
            _OUTPUT.value,
            config,
            fmt=_FORMAT.value,
            step=_STEP.value,
            max_shard_bytes=int(_SHARD_GIB.value * 2**30),
            dry_run=_DRY_RUN.value,
        )
        print(
            f"{'validated' if _DRY_RUN.value else 'exported'} {len(plan)} tensors "
            f"({sum(p.nbytes for p in plan) / 2**30:.2f} GiB, format {_FORMAT.value}) from {_INPUT.value}"
            + ("" if _DRY_RUN.value else f" into {_OUTPUT.value}"),
            flush=True,
        )


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "direction", "input", "output"])
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=parse_flags)
