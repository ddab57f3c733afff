"""A tiny DeepSeek-V4 with the full structure (every layer kind, hash and score routing, MTP) that
post-trains on the shipped sample tasks on 2 CPU cores; the numbers are small, nothing else differs
from V4-Flash."""

from configs import checkpoint, optimizer, parallelism
from configs.v4_model import compress_ratios, model_config, run_config

NUM_LAYERS = 6
SEQ_LEN = 256
BATCH = 8
STEPS = 300


def get_config():
    model = model_config(
        vocab_size=512,
        hidden_size=64,
        num_layers=NUM_LAYERS,
        num_heads=4,
        head_dim=32,
        rope_head_dim=16,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=32,
        sliding_window=32,
        window_block=8,
        query_chunk=64,
        compress_ratios=compress_ratios(NUM_LAYERS, first=0),
        index_n_heads=4,
        index_head_dim=32,
        index_topk=16,
        num_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        routed_scaling_factor=1.5,
        dtype="float32",
        remat_policy="none",
        capacity_factor=0.0,  # dropless: its buffers are small, and nothing is dropped to explain
        expert_tile=16,
        vocab_tile=128,
    )
    mesh = parallelism.get_config("cm384-8", expert=2, fsdp=-1, tensor=1)
    return run_config(
        model,
        mesh,
        batch_size=BATCH,
        seq_len=SEQ_LEN,
        steps=STEPS,
        optimizer_config=optimizer.get_config("muon", learning_rate=3e-3, warmup_steps=20, adam_eps=1e-8),
        checkpoint_config=checkpoint.get_config(save_every=100, log_every=20),
        mtp_weight_after_decay=None,
    )
