"""The project's mesh axis names and logical axis names, fixed in one place.

Mesh axes are the named dimensions of the device mesh. Logical axes name tensor dimensions (of
parameters and activations); the rules in `configs/parallelism.py` map each logical name to a mesh
axis, a tuple of mesh axes, or None (replicated). Keeping both vocabularies here lets the model,
the configs and the layout code agree without importing each other.
"""

DATA = "data"  # weights replicated; gradients all-reduced once per step
FSDP = "fsdp"  # weights, gradients and optimizer state sharded (ZeRO-3)
EXPERT = "expert"  # routed experts sharded; tokens travel by all-to-all
TENSOR = "tensor"  # attention heads / hidden of large matmuls split; per-layer collectives
SEQUENCE = "sequence"  # reserved: context parallelism for long sequences
PIPELINE = "pipeline"  # reserved: layer stages

# Always present in a Mesh (size 1 when unused), so every rule can name them; the reserved
# axes appear only when a config gives them a size.
CORE_AXES = (DATA, FSDP, EXPERT, TENSOR)

# Outer -> inner, the order of the dimensions of every Mesh we build (JAX's own convention in
# mesh_utils.create_device_mesh: "ordered by increasing network intensity").
MESH_AXES = (DATA, PIPELINE, FSDP, EXPERT, SEQUENCE, TENSOR)

# Placement priority, hungriest first: the first axis gets the fastest (innermost) links.
# tensor and sequence exchange activations inside every layer and sit on the critical path;
# expert moves every routed token twice per MoE layer; fsdp gathers weights once per layer and can
# be overlapped; pipeline sends only stage-boundary activations; data reduces gradients once per
# step (ascend_topology.md section 4, "Principle", and 5.4).
PLACEMENT_ORDER = (TENSOR, SEQUENCE, EXPERT, FSDP, PIPELINE, DATA)

PARAM_AXES = {
    "layers": "stacked layers of one kind (nnx.vmap / nnx.scan axis)",
    "vocab": "token vocabulary rows of the embedding and output head",
    "embed": "model width d of dense weights (attention, shared expert, head)",
    "hc": "the hyper-connection streams of the residual state",
    "hc_mix": "outputs of an mHC mixing function (24 per block site, 4 at the head)",
    "hc_gate": "the 3 gating scales of an mHC site",
    "q_lora": "query low-rank latent width",
    "heads": "query heads",
    "head_dim": "width of one attention head",
    "o_groups": "groups of the grouped low-rank output projection",
    "o_lora": "per-group intermediate width of the output projection",
    "kv_comp": "KV compressor channels",
    "comp_pos": "compressor positional-bias rows",
    "index_heads": "lightning-indexer heads",
    "index_head_dim": "width of one indexer head",
    "expert": "routed experts of a MoE layer",
    "expert_embed": "model width d inside routed expert weights",
    "expert_mlp": "hidden width of a routed expert",
    "expert_gate": "router output, one score per expert (kept replicated)",
    "optimizer_state": "mesh axes that also split a parameter's optimizer state (ZeRO-1; trainer/state.py)",
    "topk": "experts per token in the hash-routing table",
    "mlp": "hidden width of the shared expert",
    "mtp_proj": "output width of the MTP square projections",
}

ACTIVATION_AXES = {
    "act_batch": "sequences of a micro-batch",
    "act_length": "tokens of a sequence",
    "act_stream_length": "tokens of a sequence in the token-wise parts between tensor-parallel regions "
    "(residual streams, mHC, norms, low-rank projections): sequence parallelism",
    "act_embed": "model width d of activations",
    "act_hc": "hyper-connection streams of the residual state",
    "act_heads": "attention heads of activations",
    "act_head_dim": "width of one head in activations",
    "act_vocab": "vocabulary dimension of logits",
    "act_expert": "expert dimension of dispatched tokens",
    "act_mlp": "hidden width of MLP activations",
    "act_kv_blocks": "compressed KV blocks",
}

LOGICAL_AXES = {**PARAM_AXES, **ACTIVATION_AXES}


def mesh_axes_of(rule):
    """A rule's value or a PartitionSpec entry as a tuple of mesh axes (None -> (), 'fsdp' -> ('fsdp',))."""
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)
