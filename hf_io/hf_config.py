"""The Hugging Face `config.json` of a model config, and the check that a checkpoint's `config.json`
describes the model the caller's config builds.

Written in the release's own field names (`compress_ratios`, `rope_scaling`, `num_hash_layers`,
...), which `transformers` reads as legacy names; read back in either naming. `transformers` names a
layer's kind from its ratio only for the release's ratios (0, 4, 128); a schedule with other ratios
also gets `layer_types` and `compress_rates`, which `transformers` reads first.
"""

from model.args import ATTENTION_KIND_BY_RATIO, CSA, HCA, SLIDING, ModelArgs

FP8_QUANTIZATION = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
}
TRANSFORMERS_LAYER_TYPES = {
    SLIDING: "sliding_attention",
    CSA: "compressed_sparse_attention",
    HCA: "heavily_compressed_attention",
}
RELEASE_RATES = {TRANSFORMERS_LAYER_TYPES[kind]: ratio for ratio, kind in ATTENTION_KIND_BY_RATIO.items() if ratio}


def layer_types(args: ModelArgs) -> list:
    """`transformers`' `layer_types` of `args`: one per main layer (it builds no MTP layer)."""
    return [TRANSFORMERS_LAYER_TYPES[args.attention_kind(layer)] for layer in range(args.num_layers)]


def compress_rates(args: ModelArgs) -> dict:
    """`transformers`' `compress_rates` of `args`: the ratio of each compressed kind, the release's where the
    schedule has no layer of a kind."""
    ratios = {TRANSFORMERS_LAYER_TYPES[kind]: ratio for kind, ratio in args.kind_ratios().items() if kind != SLIDING}
    return {**RELEASE_RATES, **ratios}


def _ratios_name_kinds(args: ModelArgs) -> bool:
    """Whether the release's ratio -> kind rule gives every layer its kind."""
    return all(
        ATTENTION_KIND_BY_RATIO.get(ratio) == args.attention_kind(layer)
        for layer, ratio in enumerate(args.compress_ratios)
    )


def config_json(args: ModelArgs, quantized: bool) -> dict:
    """`config.json` for a checkpoint of `args`; `quantized` adds the release's FP8/FP4 fields."""
    config = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": 1,
        "head_dim": args.head_dim,
        "qk_rope_head_dim": args.rope_head_dim,
        "q_lora_rank": args.q_lora_rank,
        "o_groups": args.o_groups,
        "o_lora_rank": args.o_lora_rank,
        "sliding_window": args.sliding_window,
        "compress_ratios": list(args.compress_ratios),
        "index_n_heads": args.index_n_heads,
        "index_head_dim": args.index_head_dim,
        "index_topk": args.index_topk,
        "hc_mult": args.hc_mult,
        "hc_sinkhorn_iters": args.hc_sinkhorn_iters,
        "hc_eps": args.hc_eps,
        "n_routed_experts": args.num_routed_experts,
        "n_shared_experts": args.num_shared_experts,
        "num_experts_per_tok": args.num_experts_per_tok,
        "moe_intermediate_size": args.moe_intermediate_size,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": args.routed_scaling_factor,
        "num_hash_layers": args.num_hash_layers,
        "swiglu_limit": args.swiglu_limit,
        "num_nextn_predict_layers": args.num_mtp_layers,
        "rope_theta": args.rope_theta,
        "compress_rope_theta": args.compress_rope_theta,
        "rope_scaling": {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": args.rope_scaling.factor,
            "original_max_position_embeddings": args.rope_scaling.original_max_position_embeddings,
            "beta_fast": args.rope_scaling.beta_fast,
            "beta_slow": args.rope_scaling.beta_slow,
        },
        "max_position_embeddings": int(args.rope_scaling.factor * args.rope_scaling.original_max_position_embeddings),
        "rms_norm_eps": args.rms_norm_eps,
        "initializer_range": args.initializer_range,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }
    if not _ratios_name_kinds(args):
        config["layer_types"], config["compress_rates"] = layer_types(args), compress_rates(args)
    if quantized:
        config["expert_dtype"] = "fp4"
        config["quantization_config"] = dict(FP8_QUANTIZATION)
    return config


def _schedule(config: dict):
    """The per-layer attention schedule as transformers layer-type names, from either naming (`layer_types`
    first, as `transformers` reads it); a ratio the release does not use stays a number."""
    if "layer_types" in config:
        return config["layer_types"]
    if "compress_ratios" in config:
        kinds = [
            ATTENTION_KIND_BY_RATIO.get(r, r) for r in config["compress_ratios"][: config.get("num_hidden_layers")]
        ]
        return [TRANSFORMERS_LAYER_TYPES.get(kind, kind) for kind in kinds]
    return None


def _ratios(config: dict):
    """The per-layer compression ratios (0: sliding window), from either naming."""
    if "compress_ratios" in config:
        return config["compress_ratios"][: config.get("num_hidden_layers")]
    if "layer_types" in config:
        rates = {**RELEASE_RATES, **config.get("compress_rates", {})}
        return [rates.get(layer_type, 0) for layer_type in config["layer_types"]]
    return None


def _hash_layers(config: dict):
    if "num_hash_layers" in config:
        return config["num_hash_layers"]
    if "mlp_layer_types" in config:
        return config["mlp_layer_types"].count("hash_moe")
    return None


def _rope_head_dim(config: dict):
    if "qk_rope_head_dim" in config:
        return config["qk_rope_head_dim"]
    if "partial_rotary_factor" in config and "head_dim" in config:
        return int(config["head_dim"] * config["partial_rotary_factor"])
    return None


def mismatches(config: dict, args: ModelArgs) -> list:
    """Fields of a checkpoint's `config.json` that contradict `args`, as readable lines (fields the
    file does not state are not judged)."""
    ours = config_json(args, quantized=False)
    checked = [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "head_dim",
        "q_lora_rank",
        "o_groups",
        "o_lora_rank",
        "index_n_heads",
        "index_head_dim",
        "hc_mult",
        "n_routed_experts",
        "n_shared_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "num_nextn_predict_layers",
    ]
    found = [
        (field, config[field], ours[field]) for field in checked if field in config and config[field] != ours[field]
    ]
    derived = [
        ("attention schedule", _schedule(config), _schedule(ours)),
        ("compression ratios", _ratios(config), _ratios(ours)),
        ("hash-routed layers", _hash_layers(config), args.num_hash_layers),
        ("RoPE head dim", _rope_head_dim(config), args.rope_head_dim),
    ]
    found += [
        (what, theirs, expected) for what, theirs, expected in derived if theirs is not None and theirs != expected
    ]
    return [f"{field}: checkpoint has {theirs}, the config has {expected}" for field, theirs, expected in found]
