"""DeepSeek-V4-Pro (1.6T total, 49B activated): the released config.json values, as a complete run config.

`--config=configs/v4_pro.py` lays it out on one CloudMatrix384; `--config=configs/v4_pro.py:<layout>`
picks another layout of LAYOUTS (topology, mesh, global batch). `configs/v4_pro.py:scaled` is its
twin for 8 emulated CPU devices: the same structure (HCA opening, CSA/HCA alternation, hash layers,
MTP, 8 heads per output group, routed scale 2.5, YaRN, padded dispatch, full remat, bf16 compute,
Muon, experts over data x expert) with small widths and depth. The tokenizer comes from the release:
`--config.release_dir=<DeepSeek-V4-Pro>` (or `--config.data.tokenizer_path`).
"""

from configs import optimizer, parallelism
from configs.v4_model import compress_ratios, model_config, run_config, scaled_run_config

NUM_LAYERS = 61
SEQ_LEN = 4096

LAYOUTS = {
    # One CloudMatrix384, 768 dies. 7168 = 2^10 x 7 has no factor 3, so the factor 3 goes to data,
    # which replicates the dense weights but splits the 384 routed experts further (one per die):
    # data and expert both sit on the supernode's unified bus.
    "cm384": dict(
        topology="cm384", axes=dict(data=3, fsdp=2, expert=128, tensor=1), experts_over_data=True, batch_size=768
    ),
    # About the published run: 1,024 910C chips = 2,048 dies, as 4 supernodes of 32 servers. data
    # crosses RoCE, so the routed experts stay inside a supernode (expert=128: 3 per die) and are
    # replicated over data; one 4096-token sequence per die per step.
    "cm384:4x32": dict(
        topology="cm384:4x32", axes=dict(data=4, fsdp=4, expert=128, tensor=1), experts_over_data=False, batch_size=2048
    ),
    # The scaled twin's layout: the cm384 layout's shape (data x fsdp x expert, experts over data x
    # expert) on 8 emulated devices.
    "scaled": dict(topology="cm384-8", axes=dict(data=2, fsdp=2, expert=2, tensor=1), experts_over_data=True),
}

FULL = dict(
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


def get_config(layout="cm384"):
    if layout not in LAYOUTS:
        raise ValueError(f"configs/v4_pro.py: unknown layout {layout!r}; valid: {sorted(LAYOUTS)}")
    where = LAYOUTS[layout]
    mesh = parallelism.get_config(where["topology"], experts_over_data=where["experts_over_data"], **where["axes"])
    if layout == "scaled":
        return scaled_run_config(mesh, first=128, num_routed_experts=24, routed_scaling_factor=2.5)
    # Muon momentum stored in bf16 (updates still in float32), as DeepSeek-V3 stored its AdamW moments:
    # the routed experts' momentum is 8.2 GiB per die on cm384 in float32 (docs/benchmarks.md).
    return run_config(
        model_config(**FULL),
        mesh,
        batch_size=where["batch_size"],
        seq_len=SEQ_LEN,
        tokenizer_path=None,
        optimizer_config=optimizer.get_config(momentum_dtype="bfloat16"),
    )
