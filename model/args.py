"""The model's hyperparameters as a frozen, hashable record.

Configs are ml_collections ConfigDicts (data users edit); modules hold this frozen copy so it can be a
static part of traced programs. Conversion checks every field once, with errors that name the field.
"""

import dataclasses
from typing import Optional

import jax.numpy as jnp

from configs.release import ConfigError

SLIDING, CSA, HCA = "sliding", "csa", "hca"
ATTENTION_KINDS = (SLIDING, CSA, HCA)
ATTENTION_KIND_BY_RATIO = {0: SLIDING, 4: CSA, 128: HCA}  # the release's ratios: the kinds without attention_kinds
OFFLOAD = "offload"  # the remat policy that keeps layer inputs in host memory
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", OFFLOAD)  # model/remat.py POLICIES
MOE_DISPATCHES = ("dense", "padded", "ragged")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Static YaRN for compressed layers; no attention-temperature correction."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple  # one per layer, then one per MTP layer; 0 = sliding window only
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    num_routed_experts: int
    num_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    routed_scaling_factor: float
    num_hash_layers: int
    swiglu_limit: float
    num_mtp_layers: int
    rope_theta: float
    compress_rope_theta: float
    rope_scaling: RopeScaling
    rms_norm_eps: float
    initializer_range: float
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = True  # False unrolls the layer loop (exact XLA cost analysis, slower compiles)
    moe_dispatch: str = "dense"  # dense: every expert sees every token (reference); padded / ragged: sorted
    capacity_factor: float = 0.0  # 0: dropless; else each expert keeps ceil(cf * tokens * k / E) assignments
    expert_tile: int = 0  # padded dispatch: > 0 runs the expert MLP only on occupied tiles of this many rows
    vocab_tile: int = 0  # head columns per tile of the loss (model/vocab_head.py); 0 = the whole vocabulary
    window_block: int = 0  # query rows per sliding-window block, dividing the window (config 0 = the window)
    query_chunk: int = 0  # queries whose attention scores are alive at once, a multiple of window_block; 0 = all
    attention_kinds: Optional[tuple] = None  # per entry of compress_ratios; None: ATTENTION_KIND_BY_RATIO names them

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def nope_head_dim(self):
        return self.head_dim - self.rope_head_dim

    def attention_kind(self, layer: int) -> str:
        """Layer `layer`'s kind: its entry of `attention_kinds`, else the release's kind of its ratio."""
        if self.attention_kinds is None:
            return ATTENTION_KIND_BY_RATIO[self.compress_ratios[layer]]
        return self.attention_kinds[layer]

    def compress_ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def kind_ratios(self) -> dict:
        """{kind: the compression ratio of its layers} for the kinds the schedule uses (one ratio per kind)."""
        return {self.attention_kind(layer): ratio for layer, ratio in enumerate(self.compress_ratios)}

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    @property
    def num_score_routed_layers(self) -> int:
        """MoE layers with a learned router (the balance loss averages over these): every layer after the
        hash-routed ones, and the MTP layers."""
        return self.num_layers - self.num_hash_layers + self.num_mtp_layers

    @property
    def num_indexer_layers(self) -> int:
        """Main layers with a lightning indexer (CSA; the indexer loss averages over these)."""
        return sum(self.attention_kind(layer) == CSA for layer in range(self.num_layers))

    @property
    def mtp_layer_ids(self):
        return tuple(range(self.num_layers, self.num_layers + self.num_mtp_layers))


def _require(condition: bool, field: str, message: str):
    if not condition:
        raise ConfigError(f"config.model.{field}: {message}")


def from_config(model_config) -> ModelArgs:
    """Builds ModelArgs from `config.model` (a ConfigDict or a dict), checking every field."""
    values = dict(model_config)
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(values) - known)
    _require(not unknown, ",".join(unknown), f"unknown field(s); allowed: {sorted(known)}")
    missing = sorted(
        f.name for f in dataclasses.fields(ModelArgs) if f.default is dataclasses.MISSING and f.name not in values
    )
    _require(not missing, ",".join(missing), "missing required field(s)")
    values["compress_ratios"] = tuple(int(r) for r in values["compress_ratios"])
    if values.get("attention_kinds") is not None:
        values["attention_kinds"] = tuple(str(kind) for kind in values["attention_kinds"])
    values["rope_scaling"] = RopeScaling(**dict(values["rope_scaling"]))
    values["window_block"] = values.get("window_block") or values["sliding_window"]
    args = ModelArgs(**values)

    _check_kinds(args)
    _check_ratios(args)
    _require(args.dtype in DTYPES, "dtype", f"{args.dtype!r} not allowed; allowed: {sorted(DTYPES)}")
    _require(args.param_dtype in DTYPES, "param_dtype", f"{args.param_dtype!r} not allowed; allowed: {sorted(DTYPES)}")
    _require(
        args.remat_policy in REMAT_POLICIES,
        "remat_policy",
        f"{args.remat_policy!r} not allowed; allowed: {list(REMAT_POLICIES)}",
    )
    _require(
        args.moe_dispatch in MOE_DISPATCHES,
        "moe_dispatch",
        f"{args.moe_dispatch!r} not allowed; allowed: {list(MOE_DISPATCHES)}",
    )
    _require(args.capacity_factor >= 0, "capacity_factor", f"{args.capacity_factor} must be >= 0 (0 = dropless)")
    _require(args.expert_tile >= 0, "expert_tile", f"{args.expert_tile} must be >= 0 (0 = whole buffers)")
    _require(
        args.vocab_tile >= 0 and (args.vocab_tile == 0 or args.vocab_size % args.vocab_tile == 0),
        "vocab_tile",
        f"{args.vocab_tile} must divide vocab_size={args.vocab_size} (or be 0: the whole vocabulary)",
    )
    _require(
        args.window_block > 0 and args.sliding_window % args.window_block == 0,
        "window_block",
        f"{args.window_block} must divide sliding_window={args.sliding_window}",
    )
    _require(
        args.query_chunk >= 0 and args.query_chunk % args.window_block == 0,
        "query_chunk",
        f"{args.query_chunk} must be 0 (all queries at once) or a multiple of window_block={args.window_block}",
    )
    _require(
        args.num_heads % args.o_groups == 0, "o_groups", f"{args.o_groups} does not divide num_heads={args.num_heads}"
    )
    _require(
        0 < args.rope_head_dim <= args.head_dim and args.rope_head_dim % 2 == 0,
        "rope_head_dim",
        f"{args.rope_head_dim} must be even and at most head_dim={args.head_dim}",
    )
    _require(
        args.index_head_dim >= args.rope_head_dim,
        "index_head_dim",
        f"{args.index_head_dim} must be at least rope_head_dim={args.rope_head_dim}",
    )
    _require(
        args.num_experts_per_tok <= args.num_routed_experts,
        "num_experts_per_tok",
        f"{args.num_experts_per_tok} exceeds num_routed_experts={args.num_routed_experts}",
    )
    _require(
        args.num_hash_layers <= args.num_layers,
        "num_hash_layers",
        f"{args.num_hash_layers} exceeds num_layers={args.num_layers}",
    )
    _require(
        args.num_shared_experts in (0, 1),
        "num_shared_experts",
        f"{args.num_shared_experts} not supported; allowed: 0 or 1",
    )
    return args


def _check_kinds(args: ModelArgs):
    """Every entry of `compress_ratios` has a kind: from `attention_kinds`, else from the release's ratios;
    MTP layers are sliding-window only."""
    n = args.num_layers + args.num_mtp_layers
    _require(
        len(args.compress_ratios) == n,
        "compress_ratios",
        f"has {len(args.compress_ratios)} entries, need num_layers + num_mtp_layers = {n}",
    )
    if args.attention_kinds is None:
        bad = sorted({r for r in args.compress_ratios if r not in ATTENTION_KIND_BY_RATIO})
        _require(
            not bad,
            "compress_ratios",
            f"values {bad} need config.model.attention_kinds (one of "
            f"{list(ATTENTION_KINDS)} per entry); without it only the release's {ATTENTION_KIND_BY_RATIO}",
        )
        field = "compress_ratios"
    else:
        _require(
            len(args.attention_kinds) == n,
            "attention_kinds",
            f"has {len(args.attention_kinds)} entries, need num_layers + num_mtp_layers = {n}",
        )
        bad = sorted(set(args.attention_kinds) - set(ATTENTION_KINDS))
        _require(not bad, "attention_kinds", f"values {bad} not allowed; allowed: {list(ATTENTION_KINDS)}")
        field = "attention_kinds"
    _require(
        all(args.attention_kind(layer) == SLIDING for layer in args.mtp_layer_ids),
        field,
        f"MTP layers (the last entries) must be sliding-window only ({SLIDING!r}, ratio 0)",
    )


def _check_ratios(args: ModelArgs):
    """Sliding-window layers have ratio 0; each compressed kind has one ratio (transformers' `compress_rates`
    holds one per kind), above 1."""
    ratios_of = {kind: set() for kind in ATTENTION_KINDS}
    for layer, ratio in enumerate(args.compress_ratios):
        ratios_of[args.attention_kind(layer)].add(ratio)
    ratios_of = {kind: sorted(ratios) for kind, ratios in ratios_of.items()}
    _require(
        ratios_of[SLIDING] in ([], [0]),
        "compress_ratios",
        f"sliding-window layers have ratios {ratios_of[SLIDING]}; they must be 0",
    )
    for kind in (CSA, HCA):
        _require(
            all(r > 1 for r in ratios_of[kind]),
            "compress_ratios",
            f"{kind} layers have ratios {ratios_of[kind]}; each must be > 1",
        )
        _require(
            len(ratios_of[kind]) <= 1,
            "compress_ratios",
            f"{kind} layers have ratios {ratios_of[kind]}; all layers of a kind share one ratio",
        )


def layer_kind(args: ModelArgs, layer: int) -> tuple:
    """What makes two layers share one stacked parameter structure."""
    return (args.attention_kind(layer), "hash" if args.is_hash_layer(layer) else "score")


def layer_groups(args: ModelArgs) -> tuple:
    """Splits the schedule into groups `(pattern, repeats, first_layer)` run as one scan each.

    A pattern is one layer kind or an alternating pair (CSA/HCA interleave). The split minimises the
    number of distinct layer bodies to compile (dynamic programming over the schedule).
    """
    kinds = [layer_kind(args, i) for i in range(args.num_layers)]
    n = len(kinds)
    best: list[Optional[tuple]] = [None] * (n + 1)
    best[n] = (0, ())
    for start in range(n - 1, -1, -1):
        for period in (1, 2):
            pattern = tuple(kinds[start : start + period])
            if len(pattern) < period:
                continue
            repeats = 0
            while kinds[start + repeats * period : start + (repeats + 1) * period] == list(pattern):
                repeats += 1
                end = start + repeats * period
                cost = period + best[end][0]
                if best[start] is None or cost < best[start][0]:
                    best[start] = (cost, ((pattern, repeats, start),) + best[end][1])
    return best[0][1]
