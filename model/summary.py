"""Parameter counts of a config, from the abstract parameter tree (nothing is allocated).

`python -m model.summary --config=configs/v4_pro.py [--json]`

Counts follow DeepSeek's convention: the headline total excludes the MTP module, and activated
parameters per token exclude the input embedding and MTP, count the output head, and count
`num_experts_per_tok / num_routed_experts` of the routed experts. The frozen hash-routing tables are
integer lookups, not parameters, and are left out.
"""

import json
import math

import jax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from model import params
from model.args import ModelArgs, from_config
from model.transformer import DeepSeekV4

COMPONENTS = (
    "embedding",
    "head",
    "attention",
    "compressor",
    "indexer",
    "routed_experts",
    "shared_expert",
    "router",
    "hyper_connections",
    "norms",
    "final_head",
    "mtp",
)


def component_of(path: tuple) -> str:
    keys = [str(p) for p in path]
    if keys[0] == "mtp":
        return "mtp"
    if keys[0] == "embed":
        return "embedding"
    if keys[0] == "head":
        return "head"
    if keys[0] in ("norm", "hc_head"):
        return "final_head"
    if "indexer" in keys:
        return "indexer"
    if "compressor" in keys:
        return "compressor"
    if "attn" in keys:
        return "attention"
    for key, name in (("experts", "routed_experts"), ("shared", "shared_expert"), ("router", "router")):
        if key in keys:
            return name
    if "attn_hc" in keys or "ffn_hc" in keys:
        return "hyper_connections"
    return "norms"


def abstract_model(args: ModelArgs) -> DeepSeekV4:
    return nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0)))


def count_parameters(args: ModelArgs) -> dict:
    model = abstract_model(args)
    counts = dict.fromkeys(COMPONENTS, 0)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if isinstance(var, params.HashTable):
            continue
        counts[component_of(path)] += math.prod(var.shape)
    total = sum(counts.values())
    without_mtp = total - counts["mtp"]
    inactive_experts = counts["routed_experts"] * (1 - args.num_experts_per_tok / args.num_routed_experts)
    return {
        "total_params": total,
        "total_params_without_mtp": without_mtp,
        "mtp_params": counts["mtp"],
        "active_params": round(without_mtp - counts["embedding"] - inactive_experts),
        "components": counts,
    }


def format_table(summary: dict) -> str:
    lines = [f"{'component':<20}{'parameters':>20}{'share':>9}"]
    total = summary["total_params"]
    for name, count in summary["components"].items():
        lines.append(f"{name:<20}{count:>20,}{count / total:>9.2%}")
    for key in ("total_params", "total_params_without_mtp", "mtp_params", "active_params"):
        lines.append(f"{key:<20}{summary[key]:>20,}{summary[key] / 1e9:>8.2f}B")
    return "\n".join(lines)


def main(argv):
    del argv
    jax.config.update("jax_platforms", "cpu")
    summary = count_parameters(from_config(flags.FLAGS.config.model))
    print(json.dumps(summary) if flags.FLAGS.json else format_table(summary))


if __name__ == "__main__":  # flags only for the command line: importers (train.py) define their own
    from trainer.cli import exits_on_bad_input, parse_flags

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/v4_pro.py.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
    flags.mark_flags_as_required(["config"])
    app.run(exits_on_bad_input(main), flags_parser=parse_flags)
