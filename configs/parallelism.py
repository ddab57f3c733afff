"""How to parallelise: topology, mesh axis sizes, pins, and logical axis rules.

`get_config("cm384", expert=384, fsdp=2)` describes a full CloudMatrix384 run; the defaults give a
pure-FSDP mesh on the 8-device emulated topology used by tests.

Rules (logical name -> mesh axis, tuple of mesh axes, or None = replicated):
- Dense weights are sharded along `embed` over fsdp AND expert: outside the MoE the expert ranks
  hold different tokens, so they act as further FSDP ranks for attention and shared weights, as in
  ascend_topology.md 5.4 ("dense/attention weights ... sharded over ('expert','fsdp')") and MaxText.
  Routed expert weights use `expert_embed` -> fsdp only, since their `expert` dim already takes the
  expert axis.
- Megatron-style tensor parallelism: heads, output groups, indexer heads, MLP hidden and vocab
  -> tensor, with the matching activations (act_heads, act_mlp, act_vocab) on tensor too, so the
  big intermediates stay split instead of being gathered.
- Tokens: act_batch -> (data, fsdp, expert), every non-tensor rank holds its own sequences; the
  MoE layer moves them across `expert` itself (all-to-all in shard_map).
- Sequence parallelism (Megatron's, with tensor): between the tensor-parallel regions the residual
  streams and everything token-wise on them (mHC mixing and Sinkhorn, norms, the replicated
  low-rank projections wq_a, wkv, the compressors', MTP's) hold 1/tensor of each sequence
  (`act_stream_length`), instead of every tensor rank computing all of it. The tensor regions
  gather their (narrow) inputs along the sequence and the row-parallel outputs come back reduced
  onto the sequence shards. A sequence the tensor axis does not divide stays whole (the next rule).
- Small vectors (norms, mHC mixing, compressor, router output, hash table) stay replicated.
- The optimizer state (`optimizer_state`, trainer/state.py) is sharded like its parameter and also
  over `data` where the parameter is replicated over it (ZeRO-1): with the routed experts kept off
  `data` (cm384:4x32) their momentum would otherwise sit whole on every data replica.
- A name may have several rules, tried in order; the first whose mesh axes are still free in that
  tensor wins. The low-rank dims (`q_lora`, `o_lora`) take (fsdp, expert) in the weights that have
  no `embed` dim (wq_b, wo_a: about 10B parameters in V4-Pro that would otherwise be replicated
  when tensor=1), and fall back to replicated where `embed` already took those axes.
- Routed experts over `data` too (`experts_over_data=True`): the experts' `expert` dim takes
  (data, expert), so each data replica holds a different slice of the experts instead of a copy and
  the token all-to-all spans data x expert ranks (expert parallelism carved out of the data-parallel
  ranks, as Megatron's expert groups are). Dense weights stay replicated over data. It divides the
  routed experts' weights, gradients and optimizer state (~98% of V4-Pro) by the data size, at the
  price of all-to-alls that cross whatever links `data` sits on: right inside one supernode (the
  factor 3 of a CM384's 768 dies), wrong over RoCE.
Note: a dimension must divide by the product of its mesh axes (mesh.sharding checks it). V4 widths
(7168 = 2^10 x 7, vocab 129280 = 2^8 x 5 x 101) have no factor 3, so on the 768 dies of a CM384
(2^8 x 3) the factor 3 has to sit on an axis that never shards them.
"""

import ml_collections

from configs.release import ConfigError
from mesh import axes
from mesh.axes import mesh_axes_of

DEFAULT_TOPOLOGY = "cm384-8"

PARAM_RULES = (
    ("layers", None),
    ("vocab", axes.TENSOR),
    ("embed", (axes.FSDP, axes.EXPERT)),
    ("embed", None),
    ("hc", None),
    ("hc_mix", None),
    ("hc_gate", None),
    ("q_lora", (axes.FSDP, axes.EXPERT)),
    ("q_lora", None),
    ("heads", axes.TENSOR),
    ("head_dim", None),
    ("o_groups", axes.TENSOR),
    ("o_lora", (axes.FSDP, axes.EXPERT)),
    ("o_lora", None),
    ("kv_comp", None),
    ("comp_pos", None),
    ("index_heads", axes.TENSOR),
    ("index_head_dim", None),
    ("expert", axes.EXPERT),
    ("expert_embed", axes.FSDP),
    ("expert_mlp", axes.TENSOR),
    ("expert_gate", None),
    ("topk", None),
    ("mlp", axes.TENSOR),
    ("mtp_proj", None),
    ("optimizer_state", axes.DATA),
)

ACTIVATION_RULES = (
    ("act_batch", (axes.DATA, axes.FSDP, axes.EXPERT)),
    ("act_length", None),
    ("act_stream_length", axes.TENSOR),
    ("act_stream_length", None),
    ("act_embed", None),
    ("act_hc", None),
    ("act_heads", axes.TENSOR),
    ("act_head_dim", None),
    ("act_vocab", axes.TENSOR),
    ("act_expert", None),
    ("act_mlp", axes.TENSOR),
    ("act_kv_blocks", None),
)

RULES = PARAM_RULES + ACTIVATION_RULES


def rules(experts_over_data: bool = False) -> tuple:
    """RULES, or RULES with the routed experts sharded over (data, expert) (see the module docstring)."""
    if not experts_over_data:
        return RULES
    return tuple((name, (axes.DATA, axes.EXPERT)) if name == "expert" else (name, target) for name, target in RULES)


def expert_mesh_axes(rule_table) -> tuple:
    """The mesh axes the routed experts' `expert` dim is sharded over under `rule_table`."""
    return mesh_axes_of(next(target for name, target in rule_table if name == "expert"))  # the first rule wins


# Pure FSDP unless told otherwise: fsdp takes whatever the other axes leave.
DEFAULT_AXES = {axes.DATA: 1, axes.FSDP: -1, axes.EXPERT: 1, axes.TENSOR: 1}


def get_config(topology=DEFAULT_TOPOLOGY, pins=None, experts_over_data=False, **axis_sizes):
    """Parallelism config; `axis_sizes` override DEFAULT_AXES (sequence/pipeline may be added);
    `experts_over_data` picks the rules that shard the routed experts over data x expert.

    If an override makes another axis -1, fsdp gets size 1 instead of the rest.
    """
    unknown = sorted(set(axis_sizes) - set(axes.MESH_AXES))
    if unknown:
        raise ConfigError(f"unknown mesh axes {unknown}; valid: {axes.MESH_AXES}")
    sizes = dict(DEFAULT_AXES)
    if -1 in axis_sizes.values() and axes.FSDP not in axis_sizes:
        sizes[axes.FSDP] = 1
    sizes.update(axis_sizes)

    config = ml_collections.ConfigDict()
    config.topology = topology
    config.axes = ml_collections.ConfigDict(sizes)
    config.pins = ml_collections.ConfigDict(dict(pins or {}))
    config.rules = rules(experts_over_data)
    return config
