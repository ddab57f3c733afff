"""Builds the `transformers` DeepSeek-V4 reference for a given ModelArgs, with every tensor randomised
(weights at scales that make attention peaky, routing decisive and the SwiGLU clamp active), and
moves its weights into our model."""

import numpy as np
import torch
from flax import nnx
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from hf_io.hf_config import compress_rates, layer_types
from model import hf_mapping
from model.args import ModelArgs
from model.transformer import DeepSeekV4


def hf_config(args: ModelArgs) -> DeepseekV4Config:
    return DeepseekV4Config(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=1,
        head_dim=args.head_dim,
        qk_rope_head_dim=args.rope_head_dim,
        q_lora_rank=args.q_lora_rank,
        o_groups=args.o_groups,
        o_lora_rank=args.o_lora_rank,
        sliding_window=args.sliding_window,
        layer_types=layer_types(args),
        compress_rates=compress_rates(args),
        index_n_heads=args.index_n_heads,
        index_head_dim=args.index_head_dim,
        index_topk=args.index_topk,
        hc_mult=args.hc_mult,
        hc_sinkhorn_iters=args.hc_sinkhorn_iters,
        hc_eps=args.hc_eps,
        n_routed_experts=args.num_routed_experts,
        n_shared_experts=args.num_shared_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        moe_intermediate_size=args.moe_intermediate_size,
        routed_scaling_factor=args.routed_scaling_factor,
        num_hash_layers=args.num_hash_layers,
        swiglu_limit=args.swiglu_limit,
        rope_theta=args.rope_theta,
        compress_rope_theta=args.compress_rope_theta,
        rope_parameters=dict(
            rope_type="yarn",
            factor=args.rope_scaling.factor,
            original_max_position_embeddings=args.rope_scaling.original_max_position_embeddings,
            beta_fast=args.rope_scaling.beta_fast,
            beta_slow=args.rope_scaling.beta_slow,
        ),
        max_position_embeddings=1048576,
        rms_norm_eps=args.rms_norm_eps,
        initializer_range=args.initializer_range,
        num_nextn_predict_layers=args.num_mtp_layers,
    )


def _random_value(name: str, shape, dtype, rng: np.random.Generator, num_experts: int) -> np.ndarray:
    if name.endswith("tid2eid"):
        return np.stack([rng.permutation(num_experts)[: shape[1]] for _ in range(shape[0])]).astype(np.int64)
    if "norm" in name or name.endswith(".scale") or name.endswith("hc_scale"):
        return 1.0 + 0.2 * rng.standard_normal(shape)
    if "gate_up_proj" in name or "shared_experts.gate_proj" in name or "shared_experts.up_proj" in name:
        return 0.8 * rng.standard_normal(shape)  # pre-activations of a few units past the clamp
    if name.endswith(("sinks", "position_bias", ".base", "hc_base")):
        return rng.standard_normal(shape)
    if name.endswith("e_score_correction_bias"):
        return 0.1 * rng.standard_normal(shape)
    return 0.15 * rng.standard_normal(shape)


def random_reference(args: ModelArgs, seed: int = 0) -> DeepseekV4ForCausalLM:
    torch.manual_seed(seed)
    reference = DeepseekV4ForCausalLM(hf_config(args)).eval()
    rng = np.random.default_rng(seed)
    state = reference.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            value = _random_value(name, tuple(tensor.shape), tensor.dtype, rng, args.num_routed_experts)
            tensor.copy_(torch.from_numpy(np.asarray(value)).to(tensor.dtype))
    return reference


def reference_numpy_state(reference: DeepseekV4ForCausalLM) -> dict:
    return {name: t.detach().cpu().numpy() for name, t in reference.state_dict().items()}


def matching_model(args: ModelArgs, reference: DeepseekV4ForCausalLM, seed: int = 0) -> DeepSeekV4:
    """Our model holding the reference's weights (MTP, absent from the reference, keeps its init)."""
    model = DeepSeekV4(args, nnx.Rngs(seed))
    flat = hf_mapping.hf_to_flat(reference_numpy_state(reference), args)
    hf_mapping.load_flat(model, flat, skip_prefixes=("mtp.",))
    return model
