"""DeepSeek-V4-Flash (284B total, 13B activated): the released config.json values."""
from configs import parallelism
from configs.v4_model import compress_ratios, model_config, run_config

NUM_LAYERS = 43


def get_config():
    model = model_config(
        hidden_size=4096,
        num_layers=NUM_LAYERS,
        num_heads=64,
        q_lora_rank=1024,
        o_groups=8,
        o_lora_rank=1024,
        compress_ratios=compress_ratios(NUM_LAYERS, first=0),
        index_topk=512,
        num_routed_experts=256,
        moe_intermediate_size=2048,
        routed_scaling_factor=1.5,
    )
    # 4096 = 2^12 has no factor 3, so the factor 3 of the 768 dies goes to data (replicas).
    mesh = parallelism.get_config("cm384", data=3, fsdp=1, expert=256, tensor=1)
    return run_config(model, mesh, batch_size=768, seq_len=4096)
