"""Optimizer config: AdamW, or Muon for hidden matrices with AdamW for the rest, as DeepSeek-V4 trained.

Defaults follow the spec (`shared/design/deepseek_v4_architecture.md` 5.1-5.2): AdamW b1 0.9, b2 0.95,
eps 1e-20, weight decay 0.1; Muon momentum 0.95 (Nesterov), weight decay 0.1, hybrid Newton-Schulz
(8 steps of (3.4445, -4.7750, 2.0315) then 2 of (2, -1.5, 0.5)), update RMS rescale 0.18; V4-Flash
peak learning rate 2.7e-4, final/peak 0.1, 2000 warmup steps. The spec gives no clipping norm; 1.0 is
DeepSeek-V3's. Post-training runs will usually lower the learning rate and the run length: override
them. `get_config(name, **overrides)` replaces fields.
"""

import ml_collections

NAMES = ("adamw", "muon")


def get_config(name: str = "muon", **overrides) -> ml_collections.ConfigDict:
    if name not in NAMES:
        raise ValueError(f"optimizer {name!r} unknown; choose one of {NAMES}")
    config = ml_collections.ConfigDict()
    config.name = name  # "muon": Muon for hidden matrices; "adamw": AdamW for all

    # Learning-rate schedule: linear warmup, a constant plateau, then decay to final_lr_ratio * peak.
    config.learning_rate = 2.7e-4  # peak (V4-Flash pre-training; V4-Pro used 2.0e-4)
    config.init_lr_ratio = 0.0  # warmup starts at this fraction of the peak
    config.warmup_steps = 2000
    config.total_steps = 10_000  # optimizer updates in the run; the decay ends here
    config.decay = "cosine"  # "cosine", "linear" or "constant" (no decay)
    config.decay_steps = ml_collections.config_dict.placeholder(int)  # None: everything after warmup
    config.final_lr_ratio = 0.1  # 2.7e-5 / 2.7e-4

    config.clip_grad_norm = 1.0  # global L2 norm over all gradients; 0 disables clipping
    config.accumulation_steps = 1  # >1: one update per this many calls (optax.MultiSteps)
    config.state_dtype = "float32"  # gradients, moments and updates, whatever the params' dtype
    config.momentum_dtype = "float32"  # stored AdamW first moments and Muon momentum ("bfloat16" halves
    # them; updates are still computed in state_dtype)
    config.master_weights = True  # params narrower than state_dtype (bf16) get state_dtype masters
    # in the optimizer state; False rounds param + update each step
    config.decay_vectors = False  # weight-decay norm gains, mHC base/scale, sinks, ape too

    # AdamW: all parameters (name "adamw"), or embedding, head, vectors and tables (name "muon").
    config.adam_b1 = 0.9
    config.adam_b2 = 0.95
    # 1e-20 (spec) keeps AdamW sign-like for tiny gradients, but where |g| < ~1e-19 (noise-level
    # gradients) g^2 leaves float32's normal range, v flushes to 0 and a step can reach |g|/eps ~ 10-50 lr;
    # tests comparing float32 summation orders, and toy runs, use 1e-8.
    config.adam_eps = 1e-20
    config.adam_weight_decay = 0.1

    # Muon for hidden matrices: M <- mu*M + G; O = NS(mu*M + G) * sqrt(max(n, m)) * rms_scale;
    # W <- W * (1 - lr * weight_decay) - lr * O.
    config.muon_momentum = 0.95
    config.muon_nesterov = True
    config.muon_weight_decay = 0.1
    config.muon_rms_scale = 0.18  # makes the update RMS match AdamW's, so one LR serves both
    # Hybrid Newton-Schulz: (iterations, a, b, c) per stage, X <- aX + b(XX^T)X + c(XX^T)^2 X.
    config.muon_ns_stages = ((8, 3.4445, -4.7750, 2.0315), (2, 2.0, -1.5, 0.5))
    config.muon_ns_eps = 1e-7  # added to the Frobenius norm (a zero gradient stays zero)
    config.muon_ns_dtype = "bfloat16"  # matmul inputs of the iteration (V4: stable in BF16); f32 sums

    config.update(overrides)
    return config


def decay_start(config: ml_collections.ConfigDict) -> int:
    """The optimizer update at which the learning-rate decay begins: total_steps - decay_steps, or
    warmup_steps when decay_steps is None (the boundary of trainer/optimizer.learning_rate_schedule)."""
    if config.decay_steps is None:
        return config.warmup_steps
    return config.total_steps - config.decay_steps
