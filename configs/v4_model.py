"""The DeepSeek-V4 model fields shared by every size; each config file supplies the numbers.

Constants here are the same in V4-Flash and V4-Pro (see ../shared/design/deepseek_v4_architecture.md
section 1.1): mHC with 4 streams and 20 Sinkhorn iterations, SwiGLU clamp 10, RoPE bases 10000 /
160000 with YaRN x16 from 65536, RMSNorm eps 1e-6, 6 routed experts per token, 1 shared expert.
"""

import ml_collections

from configs import checkpoint, data, objectives, optimizer


def compress_ratios(num_layers: int, first: int, num_mtp_layers: int = 1) -> tuple:
    """The released schedule: layers 0-1 use `first` (0 = sliding only, 128 = HCA), then even layers
    CSA (4) and odd layers HCA (128); MTP layers are sliding-window only."""
    body = [first, first] + [4 if layer % 2 == 0 else 128 for layer in range(2, num_layers)]
    return tuple(body[:num_layers]) + (0,) * num_mtp_layers


def model_config(**numbers) -> ml_collections.ConfigDict:
    fields = dict(
        head_dim=512,
        rope_head_dim=64,
        hc_mult=4,
        hc_sinkhorn_iters=20,
        hc_eps=1e-6,
        num_shared_experts=1,
        num_experts_per_tok=6,
        num_hash_layers=3,
        swiglu_limit=10.0,
        num_mtp_layers=1,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        rope_scaling=dict(factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0, beta_slow=1.0),
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        dtype="bfloat16",
        param_dtype="float32",
        remat_policy="full",
        moe_dispatch="padded",  # sorted expert-parallel dispatch; "dense" is the all-experts reference
        # Each expert takes at most 1.25 x its mean load from each source; the rest are dropped and
        # counted (dropped_assignments). Dropless (0) sizes the dispatch buffers for the worst case:
        # ~99 GiB per die and MoE layer at V4-Pro widths (planner/expert_buffers.py).
        capacity_factor=1.25,
        expert_tile=128,  # expert MLP rows per tile: only tiles holding routed tokens are computed
        vocab_tile=8080,  # head columns per loss tile: 129280 = 16 x 8080 (model/vocab_head.py)
        vocab_size=129280,
        sliding_window=128,
        window_block=32,  # queries per window block: W + 32 keys scored per query instead of 2W
        query_chunk=512,  # queries whose attention scores are alive at once (0: the whole sequence)
        index_n_heads=64,
        index_head_dim=128,
    )
    fields.update(numbers)
    return ml_collections.ConfigDict(fields)


def scaled_numbers(*, first: int, num_routed_experts: int, routed_scaling_factor: float) -> dict:
    """Model numbers of a full-size config's scaled twin (8 emulated CPU devices, the shipped sample
    tokenizer): what `model_config` fixes is kept (hash layers, MTP, 6 experts per token, YaRN, mHC,
    bf16 compute, full remat, padded dispatch), the widths and depth shrink, and the ratios stay: 8
    heads per output group, top-k below the compressed entries of a sequence, a window below it."""
    num_layers = 7  # the opening pair, the hash CSA layer, then two (HCA, CSA) pairs: the full-size groups
    return dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=num_layers,
        num_heads=16,
        head_dim=32,
        rope_head_dim=16,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=32,
        sliding_window=32,
        window_block=8,
        query_chunk=64,
        compress_ratios=compress_ratios(num_layers, first=first),
        index_n_heads=4,
        index_head_dim=32,
        index_topk=16,
        num_routed_experts=num_routed_experts,
        moe_intermediate_size=32,
        routed_scaling_factor=routed_scaling_factor,
        expert_tile=16,
        vocab_tile=128,
    )


def scaled_run_config(mesh: ml_collections.ConfigDict, **numbers) -> ml_collections.ConfigDict:
    """The run config of a full-size config's scaled twin: `scaled_numbers(**numbers)` on `mesh` (8
    emulated devices), 8 x 256 tokens per step, 20 steps of the same optimizer with 2 warmup steps."""
    return run_config(
        model_config(**scaled_numbers(**numbers)),
        mesh,
        batch_size=8,
        seq_len=256,
        steps=20,
        optimizer_config=optimizer.get_config(warmup_steps=2),
    )


def eval_config(
    num_examples: int = 64, max_new_tokens: int = 12, max_prompt_len: int = 48, batch_rows: int = 32
) -> ml_collections.ConfigDict:
    """Held-out exact match before and after training (greedy decoding); num_examples=0 skips it."""
    return ml_collections.ConfigDict(
        dict(
            num_examples=num_examples,
            max_new_tokens=max_new_tokens,
            max_prompt_len=max_prompt_len,
            batch_rows=batch_rows,
        )
    )


def run_config(
    model: ml_collections.ConfigDict,
    mesh: ml_collections.ConfigDict,
    *,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    steps: int = 10_000,
    optimizer_config: ml_collections.ConfigDict | None = None,
    checkpoint_config: ml_collections.ConfigDict | None = None,
    mtp_weight_after_decay: float | None = 0.1,
    **data_fields,
) -> ml_collections.ConfigDict:
    """The complete config every entry point reads: model, mesh, data, checkpoint, eval, optimizer,
    objective and train settings. The batch shape lives in `config.data` alone (global_batch_size,
    seq_len), and `config.data.vocab_size` is a reference to `config.model.vocab_size`: overriding
    either changes both. `config.release_dir` (a Hugging Face release directory, set on the command
    line) supplies the tokenizer (configs/release.py). The optimizer's schedule length is
    `config.train.steps`; the MTP weight drops to `mtp_weight_after_decay` where its learning-rate
    decay starts (None: constant)."""
    config = ml_collections.ConfigDict()
    config.model = model
    config.mesh = mesh
    config.seed = seed
    # The release directory whose tokenizer.json the data pipeline reads when data.tokenizer_path is
    # unset (full-size configs; `--config.release_dir=DeepSeek-V4-Flash`).
    config.release_dir = ml_collections.FieldReference(None, field_type=str)
    config.data = data.get_config(seq_len=seq_len, global_batch_size=batch_size, **data_fields)
    config.data.vocab_size = config.model.get_ref("vocab_size")
    # Objective terms and step mechanics (spec section 5.3: MTP weight 0.3, balance 1e-4, bias 1e-3).
    config.train = ml_collections.ConfigDict(
        dict(
            steps=steps,
            mtp_weight=0.3,
            # From the optimizer update at which the learning-rate decay starts (V4: 0.1); None: constant.
            mtp_weight_after_decay=ml_collections.FieldReference(mtp_weight_after_decay, field_type=float),
            balance_weight=1e-4,
            # The lightning indexer's own loss (KL to the main attention over its selected entries, on
            # detached inputs; trainer/step.py). 0: not computed, and the optimizer leaves the indexer as it is.
            indexer_weight=0.0,
            bias_update_rate=1e-3,
            microbatches=1,
            # A step whose loss, gradient norm or update norm is NaN/Inf is never applied; then "stop" ends
            # the run (nothing saved for that step) or "skip" goes on with the next batch, the step counted
            # in the `nonfinite_steps` metric (trainer/nonfinite.py has the details).
            nonfinite="stop",
        )
    )
    config.optimizer = optimizer_config or optimizer.get_config()
    config.optimizer.total_steps = config.train.get_ref("steps")
    config.checkpoint = checkpoint_config or checkpoint.get_config()
    # Decoding rows are split over the batch's shards like the training rows.
    config.eval = eval_config(batch_rows=max(32, batch_size))
    config.objective = "sft"  # sft | dpo | grpo | distill; settings in config.dpo / .grpo / .distill
    config.update(objectives.get_config())
    return config
