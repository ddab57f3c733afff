"""Weight mapping between Hugging Face `transformers` DeepSeek-V4 tensors and this model's parameters.

Our layout differs on purpose: matrices are [in, out] for einsum, heads and groups are explicit axes,
routed experts are separate w1/w3/w2 stacks, and layers of one kind are stacked per scan group. Every
rule below has an exact inverse, so export is lossless. The MTP module is not part of `transformers`.
"""

from typing import Mapping

import numpy as np
from flax import nnx

from model.args import ModelArgs, layer_groups

HF_PREFIX = "model."


def _t(w, args):
    return np.ascontiguousarray(w.T)


def _hc_fn_to_ours(w, args):  # [m, n*d] -> [n, d, m]
    return np.ascontiguousarray(w.T.reshape(args.hc_mult, args.hidden_size, w.shape[0]))


def _hc_fn_to_hf(w, args):
    return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)


def _heads_to_ours(head_dim_attr: str, heads_attr: str):
    def convert(w, args):  # [heads*dim, rank] -> [rank, heads, dim]
        return np.ascontiguousarray(w.T.reshape(w.shape[1], getattr(args, heads_attr), getattr(args, head_dim_attr)))

    return convert


def _heads_to_hf(w, args):
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


def _o_a_to_ours(w, args):  # [g*dg, (h/g)*c] -> [h, c, dg]
    g, dg = args.o_groups, args.o_lora_rank
    w = w.reshape(g, dg, args.num_heads // g, args.head_dim).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(w.reshape(args.num_heads, args.head_dim, dg))


def _o_a_to_hf(w, args):
    g, dg = args.o_groups, args.o_lora_rank
    w = w.reshape(g, args.num_heads // g, args.head_dim, dg).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(w.reshape(g * dg, -1))


def _o_b_to_ours(w, args):  # [d, g*dg] -> [g, dg, d]
    return np.ascontiguousarray(w.T.reshape(args.o_groups, args.o_lora_rank, args.hidden_size))


def _o_b_to_hf(w, args):
    return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)


def _experts_t(w, args):  # [e, out, in] <-> [e, in, out]
    return np.ascontiguousarray(w.transpose(0, 2, 1))


def _copy(w, args):
    return np.asarray(w)


def _compressor_rules(hf: str, ours: str) -> list:
    return [
        (f"{hf}.kv_proj.weight", f"{ours}.wkv", _t, _t),
        (f"{hf}.gate_proj.weight", f"{ours}.wgate", _t, _t),
        (f"{hf}.position_bias", f"{ours}.ape", _copy, _copy),
        (f"{hf}.kv_norm.weight", f"{ours}.norm.weight", _copy, _copy),
    ]


def _hc_rules(hf: str, ours: str) -> list:
    return [
        (f"{hf}.fn", f"{ours}.fn", _hc_fn_to_ours, _hc_fn_to_hf),
        (f"{hf}.base", f"{ours}.base", _copy, _copy),
        (f"{hf}.scale", f"{ours}.scale", _copy, _copy),
    ]


def layer_rules(args: ModelArgs, layer: int) -> list:
    """Rules (hf suffix under `model.layers.{layer}.`, our block path, to_ours, to_hf) for one layer."""
    kind = args.attention_kind(layer)
    rules = (
        _hc_rules("attn_hc", "attn_hc")
        + _hc_rules("ffn_hc", "ffn_hc")
        + [
            ("input_layernorm.weight", "attn_norm.weight", _copy, _copy),
            ("post_attention_layernorm.weight", "ffn_norm.weight", _copy, _copy),
            ("self_attn.q_a_proj.weight", "attn.wq_a", _t, _t),
            ("self_attn.q_a_norm.weight", "attn.q_norm.weight", _copy, _copy),
            ("self_attn.q_b_proj.weight", "attn.wq_b", _heads_to_ours("head_dim", "num_heads"), _heads_to_hf),
            ("self_attn.kv_proj.weight", "attn.wkv", _t, _t),
            ("self_attn.kv_norm.weight", "attn.kv_norm.weight", _copy, _copy),
            ("self_attn.o_a_proj.weight", "attn.wo_a", _o_a_to_ours, _o_a_to_hf),
            ("self_attn.o_b_proj.weight", "attn.wo_b", _o_b_to_ours, _o_b_to_hf),
            ("self_attn.sinks", "attn.attn_sink", _copy, _copy),
            ("mlp.gate.weight", "moe.router.weight", _t, _t),
            ("mlp.experts.down_proj", "moe.experts.w2", _experts_t, _experts_t),
            ("mlp.shared_experts.gate_proj.weight", "moe.shared.w1", _t, _t),
            ("mlp.shared_experts.up_proj.weight", "moe.shared.w3", _t, _t),
            ("mlp.shared_experts.down_proj.weight", "moe.shared.w2", _t, _t),
        ]
    )
    if args.is_hash_layer(layer):
        rules.append(
            (
                "mlp.gate.tid2eid",
                "moe.router.tid2eid",
                lambda w, a: np.asarray(w, np.int32),
                lambda w, a: np.asarray(w, np.int64),
            )
        )
    else:
        rules.append(("mlp.gate.e_score_correction_bias", "moe.router.bias", _copy, _copy))
    if kind != "sliding":
        rules += _compressor_rules("self_attn.compressor", "attn.compressor")
    if kind == "csa":
        rules += _compressor_rules("self_attn.compressor.indexer", "attn.indexer.compressor") + [
            (
                "self_attn.compressor.indexer.q_b_proj.weight",
                "attn.indexer.wq_b",
                _heads_to_ours("index_head_dim", "index_n_heads"),
                _heads_to_hf,
            ),
            ("self_attn.compressor.indexer.scorer.weights_proj.weight", "attn.indexer.weights_proj", _t, _t),
        ]
    return rules


GATE_UP = "mlp.experts.gate_up_proj"  # [e, 2I, d] = w1 rows then w3 rows


GLOBAL_RULES = [
    ("model.embed_tokens.weight", "embed", _copy, _copy),
    ("lm_head.weight", "head", _t, _t),
    ("model.norm.weight", "norm.weight", _copy, _copy),
    ("model.hc_head.hc_fn", "hc_head.fn", _hc_fn_to_ours, _hc_fn_to_hf),
    ("model.hc_head.hc_base", "hc_head.base", _copy, _copy),
    ("model.hc_head.hc_scale", "hc_head.scale", _copy, _copy),
]


# The MTP module's own tensors are absent from `transformers`; these rules use the release's names
# (under `mtp.{depth}.`). Its block follows `layer_rules(args, args.num_layers + depth)`.
MTP_RULES = [
    ("e_proj.weight", "e_proj", _t, _t),
    ("h_proj.weight", "h_proj", _t, _t),
    ("enorm.weight", "enorm.weight", _copy, _copy),
    ("hnorm.weight", "hnorm.weight", _copy, _copy),
    ("norm.weight", "norm.weight", _copy, _copy),
    ("hc_head_fn", "hc_head.fn", _hc_fn_to_ours, _hc_fn_to_hf),
    ("hc_head_base", "hc_head.base", _copy, _copy),
    ("hc_head_scale", "hc_head.scale", _copy, _copy),
]

# Routed experts one matrix at a time, as the release stores them (`ffn.experts.{e}.w1.weight`,
# [out, in]) -> expert e's slice of our stacked [e, in, out] weights.
RELEASE_EXPERT_RULES = [
    ("w1.weight", "moe.experts.w1", _t, _t),
    ("w3.weight", "moe.experts.w3", _t, _t),
    ("w2.weight", "moe.experts.w2", _t, _t),
]


def layer_slots(args: ModelArgs):
    """Yields (layer, our block prefix, repeat index) for every decoder layer."""
    for group_index, (pattern, repeats, first) in enumerate(layer_groups(args)):
        for r in range(repeats):
            for j in range(len(pattern)):
                yield first + r * len(pattern) + j, f"groups.{group_index}.blocks.{j}", r


class MappingError(ValueError):
    pass


def hf_to_flat(hf: Mapping[str, np.ndarray], args: ModelArgs) -> dict:
    """HF state dict (numpy values) -> {our dotted path: array}, layers stacked per scan group."""
    used, flat, per_layer = set(), {}, {}

    def take(name):
        if name not in hf:
            raise MappingError(f"missing tensor {name!r} in the Hugging Face state")
        used.add(name)
        return np.asarray(hf[name])

    for hf_name, ours, to_ours, _ in GLOBAL_RULES:
        flat[ours] = to_ours(take(hf_name), args)
    for layer, prefix, r in layer_slots(args):
        hf_layer = f"{HF_PREFIX}layers.{layer}."
        for hf_suffix, ours, to_ours, _ in layer_rules(args, layer):
            per_layer.setdefault(f"{prefix}.{ours}", {})[r] = to_ours(take(hf_layer + hf_suffix), args)
        gate_up = take(hf_layer + GATE_UP)
        inter = args.moe_intermediate_size
        per_layer.setdefault(f"{prefix}.moe.experts.w1", {})[r] = _experts_t(gate_up[:, :inter], args)
        per_layer.setdefault(f"{prefix}.moe.experts.w3", {})[r] = _experts_t(gate_up[:, inter:], args)
    for path, by_repeat in per_layer.items():
        flat[path] = np.stack([by_repeat[r] for r in range(len(by_repeat))])
    unexpected = sorted(set(hf) - used)
    if unexpected:
        raise MappingError(
            f"unexpected tensors in the Hugging Face state: {unexpected[:20]}"
            + (f" and {len(unexpected) - 20} more" if len(unexpected) > 20 else "")
        )
    return flat


def flat_to_hf(flat: Mapping[str, np.ndarray], args: ModelArgs) -> dict:
    """Inverse of `hf_to_flat` (MTP parameters, absent from `transformers`, are skipped)."""
    hf = {}
    for hf_name, ours, _, to_hf in GLOBAL_RULES:
        hf[hf_name] = to_hf(np.asarray(flat[ours]), args)
    for layer, prefix, r in layer_slots(args):
        hf_layer = f"{HF_PREFIX}layers.{layer}."
        for hf_suffix, ours, _, to_hf in layer_rules(args, layer):
            hf[hf_layer + hf_suffix] = to_hf(np.asarray(flat[f"{prefix}.{ours}"][r]), args)
        w1, w3 = (np.asarray(flat[f"{prefix}.moe.experts.{w}"][r]) for w in ("w1", "w3"))
        hf[hf_layer + GATE_UP] = np.concatenate([_experts_t(w1, args), _experts_t(w3, args)], axis=1)
    return hf


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def model_flat(model: nnx.Module) -> dict:
    """{dotted path: nnx.Variable} of every variable of the model."""
    return {_dotted(path): var for path, var in nnx.to_flat_state(nnx.state(model))}


def load_flat(model: nnx.Module, flat: Mapping[str, np.ndarray], skip_prefixes: tuple = ()) -> None:
    """Writes arrays into the model's variables; shapes must match; every variable not skipped is set."""
    variables = model_flat(model)
    expected = {p for p in variables if not p.startswith(skip_prefixes)}
    missing, unexpected = sorted(expected - set(flat)), sorted(set(flat) - set(variables))
    if missing or unexpected:
        raise MappingError(f"parameter mismatch: missing {missing[:20]}, unexpected {unexpected[:20]}")
    for path, value in flat.items():
        var = variables[path]
        if tuple(var.shape) != tuple(value.shape):
            raise MappingError(
                f"parameter {path}: shape {tuple(value.shape)} does not match the model's {tuple(var.shape)}"
            )
        var[...] = np.asarray(value).astype(var.dtype)
