"""Score preference pairs with the DPO reference model, once, so DPO can train without running it.

    python score_preferences.py --config=configs/tiny.py [--init_checkpoint=DIR] --output=FILE
    python train.py --config=configs/tiny.py --config.objective=dpo --config.dpo.reference=data \
        --config.data.preference_sources="(('FILE', 1.0),)" ...

Writes the pairs of `config.data.preference_sources` with `ref_chosen_logps` / `ref_rejected_logps`
from the reference (the weights of --init_checkpoint, or the seed's initialisation), computed on the
configured (emulated) mesh: see dpo_reference.py. An existing output is replaced only with
--overwrite, and never when it is one of the input files.
"""

from absl import app, flags
from ml_collections import config_flags

from trainer.cli import exits_on_bad_input, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.")
_INIT = flags.DEFINE_string(
    "init_checkpoint", None, "Workdir of the reference weights (an Orbax checkpoint); default: the seed's init."
)
_OUTPUT = flags.DEFINE_string("output", None, "The scored JSONL to write.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output (never one of the input files).")
_EMULATE = flags.DEFINE_bool("emulate", True, "On a CPU host, emulate the topology's devices.")


@exits_on_bad_input
def main(argv):
    del argv
    import jax

    from configs.release import resolve_tokenizer
    from data.pipeline import build_encoder
    from mesh.emulate import emulate
    from mesh.presets import get_topology
    from model.args import from_config
    from dpo_reference import check_output, score_pairs
    from trainer.host_check import check_host
    from trainer.validate_config import validate_run_config

    config = _CONFIG.value
    validate_run_config(config)
    check_output(_OUTPUT.value, config, _OVERWRITE.value)
    resolve_tokenizer(config)
    build_encoder(config.data)  # tokenizer, chat template and vocabulary checked before any device work
    topology = get_topology(config.mesh.topology)
    args = from_config(config.model)
    if _EMULATE.value:
        check_host(args, topology, emulated=True)
        jax.config.update("jax_platforms", "cpu")
        emulate(topology)
    else:
        check_host(args, topology, emulated=False)
    score_pairs(config, _INIT.value, _OUTPUT.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "output"])
    app.run(main, flags_parser=parse_flags)
