"""The run config the planner compiles on XLA:CPU: every "bfloat16" field as "float16", the same width.

XLA:CPU has no bfloat16 kernels: its float-normalization pass runs each bf16 instruction but `convert`
in float32, converting whole operands. A scanned layer stack's saved inputs, written and read one slice
per step, so become a float32 copy of the whole stack that later passes hoist out of the backward loop:
V4-Pro's cm384 step held f32[29,1,4096,4,7168] (12.69 GiB per die) for a bf16 stack of half that, a
buffer a device with bf16 arithmetic (the 910C's cube and vector units) never makes. XLA:CPU computes
float16 natively, so compiling the bf16 fields as float16 keeps every 2-byte buffer at 2 bytes and
leaves shapes, shardings, collectives and matmul FLOPs as they are. Numerics do not enter: the planner
compiles for abstract inputs and runs nothing. Start with `as_compiled_here`.

The same holds for matmuls: left to itself, XLA:CPU computes a float16 dot on float32 copies of both
operands and makes a float32 result it then narrows (V4-Pro: a layer's gathered weights and query
projections, ~4 GiB per die at the peak). With oneDNN (`COMPILER_OPTIONS`) a dot with a 16-bit
result runs on its 16-bit operands, as the 910C's cube unit does. And XLA:CPU's default scheduler
orders for thread concurrency, running work (zero-filled gradient stacks, their loop copies) long
before it is needed; a device whose HBM is the limit is scheduled for memory, so the planner asks
XLA:CPU's memory-optimised scheduler for the same.
"""

import copy

import ml_collections

DEVICE_DTYPE = "bfloat16"
CPU_STAND_IN = "float16"
COMPILER_OPTIONS = {  # every planner compile on XLA:CPU (planner/program.py)
    "xla_cpu_use_onednn": True,
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
}


def _replace_in(node: ml_collections.ConfigDict) -> list:
    replaced = []
    for name, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            replaced += [f"{name}.{field}" for field in _replace_in(value)]
        elif isinstance(value, str) and value == DEVICE_DTYPE:
            node[name] = CPU_STAND_IN
            replaced.append(name)
    return replaced


def as_compiled_here(config: ml_collections.ConfigDict) -> tuple:
    """-> (a copy of `config` with every "bfloat16" value "float16", the dotted names of those fields)."""
    compiled = copy.deepcopy(config)
    with compiled.unlocked():
        replaced = _replace_in(compiled)
    return compiled, tuple(replaced)
