"""DeepSeek-V4-Flash (284B total, 13B activated): the released config.json values, as a complete run config.

`--config=configs/v4_flash.py` lays it out on one CloudMatrix384; `--config=configs/v4_flash.py:scaled`
is its twin for 8 emulated CPU devices: the same structure (sliding-window opening, CSA/HCA
alternation, hash layers, MTP, 8 heads per output group, routed scale 1.5, YaRN, padded dispatch,
full remat, bf16 compute, Muon, experts over expert with the data axis replicating them) with small
widths and depth. The tokenizer comes from the release: `--config.release_dir=<DeepSeek-V4-Flash>`
(or `--config.data.tokenizer_path`).
"""

from configs import parallelism
from configs.v4_model import compress_ratios, model_config, run_config, scaled_run_config

NUM_LAYERS = 43
SEQ_LEN = 4096

FULL = dict(
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

VARIANTS = ("full", "scaled")


def get_config(variant="full"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/v4_flash.py: unknown variant {variant!r}; valid: {VARIANTS}")
    if variant == "scaled":
        mesh = parallelism.get_config("cm384-8", data=2, fsdp=1, expert=4, tensor=1)
        return scaled_run_config(mesh, first=0, num_routed_experts=16, routed_scaling_factor=1.5)
    # 4096 = 2^12 has no factor 3, so the factor 3 of the 768 dies goes to data (replicas).
    mesh = parallelism.get_config("cm384", data=3, fsdp=1, expert=256, tensor=1)
    return run_config(model_config(**FULL), mesh, batch_size=768, seq_len=SEQ_LEN, tokenizer_path=None)
