"""DeepSeek-V4-Pro (1.6T total, 49B activated): the released config.json values."""
from configs import parallelism
from configs.v4_model import compress_ratios, model_config, run_config

NUM_LAYERS = 61


def get_config():
    model = model_config(
        hidden_size=7168,
        num_layers=NUM_LAYERS,
        num_heads=128,
        q_lora_rank=1536,
        o_groups=16,
        o_lora_rank=1024,
        compress_ratios=compress_ratios(NUM_LAYERS, first=128),
        index_topk=1024,
        num_routed_experts=384,
        moe_intermediate_size=3072,
        routed_scaling_factor=2.5,
    )
    # 7168 = 2^10 x 7 has no factor 3, so the factor 3 of the 768 dies goes to data (replicas).
    mesh = parallelism.get_config("cm384", data=3, fsdp=2, expert=128, tensor=1)
    return run_config(model, mesh, batch_size=768, seq_len=4096)
