"""The released checkpoint's tensors for a model config: release name, how the release may encode
it, its shape, and where it lives in our parameters (flat path, position in the stack, layout rule).

Names and shapes follow the spec's tensor table (deepseek_v4_architecture.md 3.1); the layout rules
are `model.hf_mapping`'s, found through the `transformers` name of each release tensor, so the two
directions cannot drift apart. `transformers`' `save_pretrained` writes a third naming (release
names under `model.`, except a few it leaves renamed); `canonical_name` folds it into the release's.
"""

import dataclasses
import re
from typing import Callable

from model import hf_mapping
from model.args import CSA, SLIDING, ModelArgs

# How the release may store a tensor: PLAIN floats; FP8 = e4m3 with 128x128 tile scales (or plain);
# FP4 = routed experts, MXFP4 (or FP8 tiles in the Base checkpoints, or plain); INDEX = integers.
PLAIN, FP8, FP4, INDEX = "plain", "fp8", "fp4", "index"
BF16, F32, I64 = "BF16", "F32", "I64"
MTP_PREFIX = "mtp."


@dataclasses.dataclass(frozen=True)
class ReleaseTensor:
    name: str  # e.g. "layers.3.attn.wq_a.weight"
    storage: str  # PLAIN / FP8 / FP4 / INDEX
    dtype: str  # the release's dtype when not quantised (BF16, F32, I64)
    shape: tuple  # [out, in] for matrices
    leaf: str  # our flat parameter path, e.g. "groups.1.blocks.0.attn.wq_a"
    index: tuple  # where in the leaf: (repeat,), (repeat, expert), (expert,) or ()
    to_ours: Callable
    to_release: Callable

    @property
    def scale_name(self) -> str:
        """The companion scale tensor of a quantised weight (`<module>.scale`)."""
        return re.sub(r"\.weight$", ".scale", self.name)


def _layer_table(args: ModelArgs, layer: int) -> dict:
    """release suffix -> (transformers suffix, storage, dtype, shape) for one decoder layer."""
    d, dc, c, heads = args.hidden_size, args.q_lora_rank, args.head_dim, args.num_heads
    g, dg, e, inter = args.o_groups, args.o_lora_rank, args.num_routed_experts, args.moe_intermediate_size
    mix, hc = (2 + args.hc_mult) * args.hc_mult, args.hc_mult
    table = {
        "attn_norm.weight": ("input_layernorm.weight", PLAIN, BF16, (d,)),
        "ffn_norm.weight": ("post_attention_layernorm.weight", PLAIN, BF16, (d,)),
        "attn.wq_a.weight": ("self_attn.q_a_proj.weight", FP8, BF16, (dc, d)),
        "attn.q_norm.weight": ("self_attn.q_a_norm.weight", PLAIN, BF16, (dc,)),
        "attn.wq_b.weight": ("self_attn.q_b_proj.weight", FP8, BF16, (heads * c, dc)),
        "attn.wkv.weight": ("self_attn.kv_proj.weight", FP8, BF16, (c, d)),
        "attn.kv_norm.weight": ("self_attn.kv_norm.weight", PLAIN, BF16, (c,)),
        "attn.wo_a.weight": ("self_attn.o_a_proj.weight", FP8, BF16, (g * dg, heads * c // g)),
        "attn.wo_b.weight": ("self_attn.o_b_proj.weight", FP8, BF16, (d, g * dg)),
        "attn.attn_sink": ("self_attn.sinks", PLAIN, F32, (heads,)),
        "ffn.gate.weight": ("mlp.gate.weight", PLAIN, BF16, (e, d)),
        "ffn.shared_experts.w1.weight": ("mlp.shared_experts.gate_proj.weight", FP8, BF16, (inter, d)),
        "ffn.shared_experts.w3.weight": ("mlp.shared_experts.up_proj.weight", FP8, BF16, (inter, d)),
        "ffn.shared_experts.w2.weight": ("mlp.shared_experts.down_proj.weight", FP8, BF16, (d, inter)),
    }
    for site in ("attn", "ffn"):
        table[f"hc_{site}_fn"] = (f"{site}_hc.fn", PLAIN, F32, (mix, hc * d))
        table[f"hc_{site}_base"] = (f"{site}_hc.base", PLAIN, F32, (mix,))
        table[f"hc_{site}_scale"] = (f"{site}_hc.scale", PLAIN, F32, (3,))
    if args.is_hash_layer(layer):
        table["ffn.gate.tid2eid"] = ("mlp.gate.tid2eid", INDEX, I64, (args.vocab_size, args.num_experts_per_tok))
    else:
        table["ffn.gate.bias"] = ("mlp.gate.e_score_correction_bias", PLAIN, F32, (e,))
    kind = args.attention_kind(layer)
    if kind != SLIDING:
        ratio = args.compress_ratio(layer)
        width = 2 * c if kind == CSA else c  # CSA's overlapping windows pool two halves
        table.update(_compressor_table("attn.compressor", "self_attn.compressor", d, width, c, ratio))
    if kind == CSA:
        ci, ni = args.index_head_dim, args.index_n_heads
        table.update(
            _compressor_table(
                "attn.indexer.compressor", "self_attn.compressor.indexer", d, 2 * ci, ci, args.compress_ratio(layer)
            )
        )
        table["attn.indexer.wq_b.weight"] = ("self_attn.compressor.indexer.q_b_proj.weight", FP8, BF16, (ni * ci, dc))
        table["attn.indexer.weights_proj.weight"] = (
            "self_attn.compressor.indexer.scorer.weights_proj.weight",
            PLAIN,
            BF16,
            (ni, d),
        )
    return table


def _compressor_table(release: str, hf: str, d: int, width: int, norm_width: int, ratio: int) -> dict:
    return {
        f"{release}.wkv.weight": (f"{hf}.kv_proj.weight", PLAIN, BF16, (width, d)),
        f"{release}.wgate.weight": (f"{hf}.gate_proj.weight", PLAIN, BF16, (width, d)),
        f"{release}.ape": (f"{hf}.position_bias", PLAIN, F32, (ratio, width)),
        f"{release}.norm.weight": (f"{hf}.kv_norm.weight", PLAIN, BF16, (norm_width,)),
    }


GLOBAL_TABLE = {  # release name -> (transformers name, storage, dtype); shapes in _global_shapes
    "embed.weight": ("model.embed_tokens.weight", PLAIN, BF16),
    "head.weight": ("lm_head.weight", PLAIN, BF16),
    "norm.weight": ("model.norm.weight", PLAIN, BF16),
    "hc_head_fn": ("model.hc_head.hc_fn", PLAIN, F32),
    "hc_head_base": ("model.hc_head.hc_base", PLAIN, F32),
    "hc_head_scale": ("model.hc_head.hc_scale", PLAIN, F32),
}


def _head_shapes(args: ModelArgs) -> dict:
    """Shapes of the hyper-head and final norm, shared by the main model and each MTP depth."""
    d, hc = args.hidden_size, args.hc_mult
    return {"norm.weight": (d,), "hc_head_fn": (hc, hc * d), "hc_head_base": (hc,), "hc_head_scale": (1,)}


def _global_shapes(args: ModelArgs) -> dict:
    v, d = args.vocab_size, args.hidden_size
    return dict(_head_shapes(args), **{"embed.weight": (v, d), "head.weight": (v, d)})


def _mtp_table(args: ModelArgs) -> dict:
    """release suffix under `mtp.{depth}.` -> (storage, dtype, shape) of the MTP module's own tensors."""
    d = args.hidden_size
    table = {
        "e_proj.weight": (FP8, BF16, (d, d)),
        "h_proj.weight": (FP8, BF16, (d, d)),
        "enorm.weight": (PLAIN, BF16, (d,)),
        "hnorm.weight": (PLAIN, BF16, (d,)),
    }
    for name, shape in _head_shapes(args).items():
        table[name] = (PLAIN, F32 if name.startswith("hc_") else BF16, shape)
    return table


def _block_tensors(args: ModelArgs, layer: int, release_prefix: str, ours_prefix: str, repeat: tuple) -> list:
    """The release tensors of one block (decoder layer or MTP block), routed experts included."""
    rules = {hf: (ours, to_ours, to_hf) for hf, ours, to_ours, to_hf in hf_mapping.layer_rules(args, layer)}
    tensors = []
    for suffix, (hf_suffix, storage, dtype, shape) in _layer_table(args, layer).items():
        ours, to_ours, to_hf = rules[hf_suffix]
        tensors.append(
            ReleaseTensor(
                release_prefix + suffix, storage, dtype, shape, f"{ours_prefix}.{ours}", repeat, to_ours, to_hf
            )
        )
    d, inter = args.hidden_size, args.moe_intermediate_size
    shapes = {"w1.weight": (inter, d), "w3.weight": (inter, d), "w2.weight": (d, inter)}
    for expert in range(args.num_routed_experts):
        for suffix, ours, to_ours, to_hf in hf_mapping.RELEASE_EXPERT_RULES:
            tensors.append(
                ReleaseTensor(
                    f"{release_prefix}ffn.experts.{expert}.{suffix}",
                    FP4,
                    BF16,
                    shapes[suffix],
                    f"{ours_prefix}.{ours}",
                    repeat + (expert,),
                    to_ours,
                    to_hf,
                )
            )
    return tensors


def release_tensors(args: ModelArgs, with_mtp: bool = True) -> list:
    """Every tensor of the release for `args`, in release order (embedding, layers, head, MTP)."""
    global_rules = {hf: (ours, to_ours, to_hf) for hf, ours, to_ours, to_hf in hf_mapping.GLOBAL_RULES}
    shapes = _global_shapes(args)

    def global_tensor(name):
        hf_name, storage, dtype = GLOBAL_TABLE[name]
        ours, to_ours, to_hf = global_rules[hf_name]
        return ReleaseTensor(name, storage, dtype, shapes[name], ours, (), to_ours, to_hf)

    tensors = [global_tensor("embed.weight")]
    for layer, prefix, repeat in hf_mapping.layer_slots(args):
        tensors += _block_tensors(args, layer, f"layers.{layer}.", prefix, (repeat,))
    tensors += [
        global_tensor(name) for name in ("norm.weight", "head.weight", "hc_head_fn", "hc_head_base", "hc_head_scale")
    ]
    if with_mtp:
        mtp_table = _mtp_table(args)
        for depth in range(args.num_mtp_layers):
            release_prefix, ours_prefix = f"{MTP_PREFIX}{depth}.", f"mtp.{depth}"
            for suffix, ours, to_ours, to_hf in hf_mapping.MTP_RULES:
                storage, dtype, shape = mtp_table[suffix]
                tensors.append(
                    ReleaseTensor(
                        release_prefix + suffix, storage, dtype, shape, f"{ours_prefix}.{ours}", (), to_ours, to_hf
                    )
                )
            tensors += _block_tensors(args, args.num_layers + depth, release_prefix, f"{ours_prefix}.block", ())
    return tensors


# `save_pretrained` naming -> release naming: it prefixes `model.` and leaves these renamed.
_SAVED_BY_TRANSFORMERS = [
    (re.compile(r"^model\.embed_tokens\.weight$"), "embed.weight"),
    (re.compile(r"^lm_head\.weight$"), "head.weight"),
    (re.compile(r"^model\.hc_head\.hc_(fn|base|scale)$"), r"hc_head_\1"),
    (re.compile(r"^model\.layers\.(\d+)\.attn\.norm\.weight$"), r"layers.\1.attn.kv_norm.weight"),
    (re.compile(r"^model\."), ""),
]


def saved_by_transformers(names) -> bool:
    """Whether a checkpoint's names are `transformers`' `save_pretrained` naming (`model.` prefix)."""
    return any(name.startswith("model.") for name in names)


def canonical_name(name: str) -> str:
    """A `save_pretrained` name -> the release name of the same tensor (release names unchanged)."""
    for pattern, replacement in _SAVED_BY_TRANSFORMERS:
        renamed, count = pattern.subn(replacement, name)
        if count:
            return renamed
    return name
