"""Per-device memory of a compiled step, and an analytic breakdown to read it against.

The compiled figure is XLA's own: arguments + outputs - aliased (donated) + temporaries. On CPU,
`peak_memory_in_bytes` leaves the temporaries out, so it is not used.
The breakdown: weights, gradients and optimizer state are exact (their shard shapes); activations are
an estimate from the shapes of what the layers keep for the backward pass (see `analytic_bytes`).
"""

import glob
import math
import os
import re

import jax
import numpy as np

from mesh import axes as mesh_axes
from mesh import hlo_collectives
from model.args import OFFLOAD, ModelArgs
from model.expert_dispatch import capacity


def compiled_bytes(compiled) -> dict:
    stats = compiled.memory_analysis()
    total = (
        stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
    )
    return {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
        "total": total,
    }


# Debug options that make XLA write its buffer live ranges (and nothing slow: no per-fusion LLVM IR).
LIVE_RANGE_DUMP = {
    "xla_dump_hlo_pass_re": "^$",
    "xla_dump_emitter_re": "^$",
    "xla_dump_buffer_assignment_analysis": True,
}
_LIVE_AT_PEAK = re.compile(r"^\s+Live ranges at \d+ \(peak\):")
_LIVE = re.compile(r"^\s+(?P<name>[\w.\-]+)(?:\{(?P<index>[0-9,]*)\})?: (?P<bytes>\d+) bytes")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<shape>\([^=]*?\)|\S+) ")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?(?P<name>[\w.\-]+) .*\{$")
_CALLS = re.compile(r"calls=%?(?P<name>[\w.\-]+)")
_OP_NAME = re.compile(r'op_name="(?P<op>[^"]*)"')
_ALLOCATION = re.compile(r"^allocation (?P<index>\d+): size \d+")
_VALUE = re.compile(
    r"^\s*value: <\d+ (?P<name>[\w.\-]+)(?:\{(?P<index>[0-9,]*)\})?(?: \(phi\))? @\d+> "
    r"\(size=(?P<size>\d+),offset=(?P<offset>\d+)\)"
)


TOKEN_AXES = (mesh_axes.DATA, mesh_axes.FSDP, mesh_axes.EXPERT)  # act_batch: the mesh axes that split the tokens


def token_shards(mesh_shape: dict) -> int:
    """How many ways a step's tokens are split (the batch axes' sizes multiplied)."""
    return math.prod(mesh_shape.get(axis, 1) for axis in TOKEN_AXES)


def tokens_per_device(tokens: int, mesh_shape: dict) -> int:
    """A step's `tokens` split over the batch axes: the tokens each device holds and dispatches."""
    return tokens // token_shards(mesh_shape)


def _readable(op_name: str) -> str:
    """A JAX op path with the wrappers every step has taken out: jit(step)/while/body/closed_call/x ->
    loop/x."""
    name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    return (
        name.replace("closed_call/", "")
        .replace("while/body/", "loop/")
        .replace("checkpoint/rematted_computation/", "remat/")
    )


def _tuple_element(shape: str, index: str | None) -> str:
    """The shape of element `index` ("2" or "1,0") of an HLO (tuple) shape; the shape itself if none."""
    for position in (int(i) for i in (index or "").split(",") if i):
        if not shape.startswith("("):
            break
        elements, depth, start = [], 0, 1
        for at, char in enumerate(shape[1:-1], 1):
            depth += char in "([{"
            depth -= char in ")]}"
            if char == "," and depth == 0:
                elements.append(shape[start:at].strip())
                start = at + 1
        elements.append(shape[start:-1].strip())
        shape = elements[position]
    return re.sub(r"\{[^}]*\}$", "", shape)


def peak_buffers(live_range_text: str, hlo_text: str, assignment_text: str, top: int) -> dict:
    """{"bytes": live at the peak, "buffers": [{"what", "shape", "bytes"}] the `top` largest}, from
    XLA's live-range dump, its buffer assignment and the optimised HLO they describe: each buffer
    alive when the program's memory peaks, with its shape and the JAX op that produced it (for a
    fusion, the op its fused computation ends with; XLA's own instruction name where there is none,
    e.g. a copy it added). The live-range dump counts values, and the values that share one buffer
    (a loop's state: its operand, the body's parameter and the loop's result) all at once: here a
    buffer (an allocation's byte range) counts once, named by the first of its values that an op made."""
    lines = live_range_text.splitlines()
    start = next((index for index, line in enumerate(lines) if _LIVE_AT_PEAK.match(line)), None)
    if start is None:
        raise ValueError("no 'Live ranges at ... (peak)' in the live-range dump")
    instructions, root_ops, computation = {}, {}, None
    for line in hlo_text.splitlines():
        line = hlo_collectives.INDEX_COMMENT.sub("", line)
        header = _COMPUTATION.match(line)
        if header:
            computation = header["name"]
            continue
        found = _INSTRUCTION.match(line)
        if found:
            op = _OP_NAME.search(line)
            calls = _CALLS.search(line)
            instructions[found["name"]] = (found["shape"], op["op"] if op else None, calls and calls["name"])
            if line.lstrip().startswith("ROOT ") and op:
                root_ops[computation] = op["op"]
    slices = _value_slices(assignment_text)
    by_slice, by_op = {}, set()  # by_op: the buffers named by a value that an op made
    for line in lines[start + 1 :]:
        live = _LIVE.match(line)
        if not live:
            break
        name, index = live["name"], live["index"] or ""
        shape, op, calls = instructions.get(name, ("?", None, None))
        op = op or root_ops.get(calls)  # a fusion named by the op its fused computation ends with
        where = slices.get((name, index), ((name, index), 0, int(live["bytes"])))  # not found: a buffer of its own
        if where not in by_slice or (op and where not in by_op):
            what = _readable(op) if op else name
            by_slice[where] = {"what": what, "shape": _tuple_element(shape, index), "bytes": where[2]}
        if op:
            by_op.add(where)
    buffers = sorted(by_slice.values(), key=lambda b: -b["bytes"])
    return {"bytes": _covered_bytes(list(by_slice)), "buffers": buffers[:top]}


def _value_slices(assignment_text: str) -> dict:
    """{(value name, tuple index): (allocation, offset, size)} from XLA's buffer-assignment dump."""
    slices, allocation = {}, None
    for line in assignment_text.splitlines():
        header = _ALLOCATION.match(line)
        if header:
            allocation = int(header["index"])
            continue
        value = _VALUE.match(line)
        if value:
            size, offset = int(value["size"]), int(value["offset"])
            slices[(value["name"], value["index"] or "")] = (allocation, offset, size)
    return slices


def _covered_bytes(slices: list) -> int:
    """Bytes covered by (allocation, offset, size) slices, overlaps counted once."""
    covered, end_of = 0, {}
    for allocation, offset, size in sorted(slices, key=lambda s: (str(s[0]), s[1])):
        end = end_of.get(allocation, 0)
        covered += max(0, offset + size - max(offset, end))
        end_of[allocation] = max(end, offset + size)
    return covered


def _dump_file(dump_dir: str, suffix: str) -> str:
    """The text of the one jit_step module's dump file ending in `suffix` in `dump_dir`."""
    files = glob.glob(os.path.join(dump_dir, f"*jit_step*{suffix}"))
    if len(files) != 1:
        raise ValueError(f"expected one jit_step *{suffix} dump in {dump_dir}, found {files}")
    with open(files[0]) as f:
        return f.read()


def live_range_text(dump_dir: str) -> str:
    """The live-range dump of the one jit_step module compiled into `dump_dir`."""
    return _dump_file(dump_dir, "after_optimizations-live-range.txt")


def buffer_assignment_text(dump_dir: str) -> str:
    """The buffer assignment of the one jit_step module compiled into `dump_dir`."""
    return _dump_file(dump_dir, "after_optimizations-buffer-assignment.txt")


def optimized_hlo_text(dump_dir: str) -> str:
    """The optimised HLO of the one jit_step module compiled into `dump_dir`."""
    return _dump_file(dump_dir, "after_optimizations.txt")


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _compressed_entries(args: ModelArgs, seq_len: int) -> int:
    """Compressed KV entries of a sequence in the layers that have the most (0 without compression)."""
    ratios = [r for r in args.compress_ratios if r]
    return seq_len // min(ratios) if ratios else 0


def _score_bytes_per_query(args: ModelArgs, seq_len: int, tensor: int) -> float:
    """Attention scores and probabilities of one query (window span + compressed entries + sink,
    float32), the largest per-query intermediates."""
    span = args.sliding_window + args.window_block + _compressed_entries(args, seq_len) + 1
    return 2 * max(args.num_heads // tensor, 1) * span * 4


def _layer_bytes_per_token(args: ModelArgs, seq_len: int, tensor: int) -> float:
    """What one layer keeps per token for its backward pass when nothing is recomputed: residual
    streams, attention projections, scores and probabilities unless they are computed in query
    chunks (`_score_bytes_per_query`), the indexer's per-head scores, the routed rows' gate/up/h
    (float32) and the shared expert's."""
    act = np.dtype(args.compute_dtype).itemsize
    heads = max(args.num_heads // tensor, 1)
    entries = _compressed_entries(args, seq_len)
    streams = 3 * args.hc_mult * args.hidden_size * act + 2 * args.hidden_size * act
    attention = (3 * heads * args.head_dim + args.head_dim + args.q_lora_rank) * act
    if not args.query_chunk:
        attention += _score_bytes_per_query(args, seq_len, tensor)
    indexer = 2 * max(args.index_n_heads // tensor, 1) * entries * 4
    inter = args.moe_intermediate_size // tensor
    moe = (
        args.num_experts_per_tok * (args.hidden_size * act + 3 * inter * 4)
        + 3 * inter * 4 * args.num_shared_experts
        + 3 * args.num_routed_experts * 4
    )
    return streams + attention + indexer + moe


def layer_input_bytes(args: ModelArgs, batch_size: int, seq_len: int, mesh_shape: dict) -> float:
    """The input streams [tokens, hc, d] every layer keeps for its recomputation under remat, per
    device, all layers: what remat_policy="offload" moves to host memory and back each step."""
    tokens = tokens_per_device(batch_size * seq_len, mesh_shape)
    layers = args.num_layers + args.num_mtp_layers
    return layers * tokens * args.hc_mult * args.hidden_size * np.dtype(args.compute_dtype).itemsize


def activation_bytes(args: ModelArgs, batch_size: int, seq_len: int, mesh_shape: dict) -> float:
    """Activations per device for a [batch_size, seq_len] batch: without remat every layer keeps its
    intermediates (`_layer_bytes_per_token`); with remat a layer keeps only its input streams and one
    layer's intermediates are live at a time (and not even the inputs with "offload"). On top, one query chunk's attention scores (when they
    are chunked) and the largest transient: the MoE dispatch buffers or one vocabulary tile's logits."""
    tensor = mesh_shape.get("tensor", 1)
    tokens = tokens_per_device(batch_size * seq_len, mesh_shape)
    act = np.dtype(args.compute_dtype).itemsize
    layers = args.num_layers + args.num_mtp_layers
    per_layer = _layer_bytes_per_token(args, seq_len, tensor) * tokens
    if args.query_chunk:  # recomputed chunk by chunk: one chunk of every local row is alive
        chunk_scores = (
            _score_bytes_per_query(args, seq_len, tensor) * tokens // seq_len * min(args.query_chunk, seq_len)
        )
    else:
        chunk_scores = 0
    if args.remat_policy == "none":
        kept = layers * per_layer
    elif args.remat_policy == OFFLOAD:
        kept = per_layer
    else:
        kept = layer_input_bytes(args, batch_size, seq_len, mesh_shape) + per_layer
    experts = args.num_routed_experts
    cap = capacity(tokens, args.num_experts_per_tok, experts, args.capacity_factor or None)
    moe = experts * cap * args.hidden_size * (act + 4) * 2  # rows out (x.dtype) and back (f32), both ways
    logits = tokens * (args.vocab_tile or args.vocab_size) // tensor * 4 * 2  # one vocabulary tile
    return kept + chunk_scores + max(moe, logits)


def analytic_bytes(args: ModelArgs, state, batch_size: int, seq_len: int, mesh_shape: dict) -> dict:
    """Breakdown per device for the abstract TrainState `state` and a [batch_size, seq_len] batch."""
    weights = shard_bytes(state.params) + shard_bytes(state.routing)
    gradients = shard_bytes(state.params)
    optimizer = shard_bytes(state.opt_state)
    activations = activation_bytes(args, batch_size, seq_len, mesh_shape)
    return {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "total": weights + gradients + optimizer + activations,
    }
