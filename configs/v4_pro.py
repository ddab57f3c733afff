"""DeepSeek-V4-Pro (1.6T total, 49B activated): the released config.json values.

`--config=configs/v4_pro.py` lays it out on one CloudMatrix384; `--config=configs/v4_pro.py:<layout>`
picks another layout of LAYOUTS (topology, mesh, global batch).
"""
from configs import parallelism
from configs.v4_model import compress_ratios, model_config, run_config

NUM_LAYERS = 61

LAYOUTS = {
    # One CloudMatrix384, 768 dies. 7168 = 2^10 x 7 has no factor 3, so the factor 3 goes to data,
    # which replicates the dense weights but splits the 384 routed experts further (one per die):
    # data and expert both sit on the supernode's unified bus.
    "cm384": dict(topology="cm384", axes=dict(data=3, fsdp=2, expert=128, tensor=1), experts_over_data=True,
                  batch_size=768),
    # About the published run: 1,024 910C chips = 2,048 dies, as 4 supernodes of 32 servers. data
    # crosses RoCE, so the routed experts stay inside a supernode (expert=128: 3 per die) and are
    # replicated over data; one 4096-token sequence per die per step.
    "cm384:4x32": dict(topology="cm384:4x32", axes=dict(data=4, fsdp=4, expert=128, tensor=1),
                       experts_over_data=False, batch_size=2048),
}


def get_config(layout="cm384"):
    if layout not in LAYOUTS:
        raise ValueError(f"configs/v4_pro.py: unknown layout {layout!r}; valid: {sorted(LAYOUTS)}")
    where = LAYOUTS[layout]
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
    mesh = parallelism.get_config(where["topology"], experts_over_data=where["experts_over_data"], **where["axes"])
    return run_config(model, mesh, batch_size=where["batch_size"], seq_len=4096)
