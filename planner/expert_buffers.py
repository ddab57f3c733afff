"""The routed experts' dispatch buffers on one device, and the check that refuses a run whose worst
case alone cannot fit.

Static shapes size the dispatch's buffers (model/expert_dispatch.py) for the worst case its capacity
allows: dropless (`config.model.capacity_factor=0`) means C = every local token per expert, so at
V4-Pro widths one MoE layer's buffers outgrow a 910C die before anything else is counted. A capacity
factor bounds them to C = ceil(cf * t * k / E) rows per expert; the assignments past C are dropped and
counted (`dropped_assignments`, logged every step). `dispatch_buffers` lists the buffers of one layer
(alive from its forward to its backward; one layer at a time under remat); `check_dispatch_fits`
raises a ConfigError naming the field, the largest buffer and the bytes when their sum exceeds the
HBM. The planner (plan.py, train.py --dry_run) and train.py's real runs call it before compiling anything.
"""

import dataclasses
import math

import ml_collections
import numpy as np

from configs import parallelism
from configs.release import ConfigError
from mesh import axes as mesh_axes
from mesh.layout import plan_layout
from mesh.presets import get_topology
from model.args import ModelArgs, from_config
from model.expert_dispatch import capacity
from planner.memory import tokens_per_device

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Buffer:
    what: str
    shape: tuple
    dtype: str

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def __str__(self) -> str:
        return f"{self.what} [{', '.join(str(n) for n in self.shape)}] {self.dtype} {self.bytes / GIB:,.1f} GiB"


def dispatch_buffers(args: ModelArgs, tokens: int, expert_shards: int, tensor: int) -> list:
    """The largest buffers of one MoE layer's dispatch on a device that routes `tokens` tokens, with the
    routed experts split over `expert_shards` devices and their intermediate width over `tensor`."""
    experts, k, d = args.num_routed_experts, args.num_experts_per_tok, args.hidden_size
    width = args.moe_intermediate_size // tensor
    act = np.dtype(args.compute_dtype).name
    local = experts // expert_shards
    if args.moe_dispatch == "dense":
        return [Buffer(f"{name} projections", (tokens, local, width), "float32") for name in ("gate", "up")]
    if args.moe_dispatch == "ragged":
        rows = expert_shards * tokens * k  # every source may send all its assignments to one device
        return [Buffer("received rows", (rows, d), act), Buffer("expert outputs", (rows, d), "float32")] + [
            Buffer(f"{name} projections", (rows, width), "float32") for name in ("gate", "up")
        ]
    cap = capacity(tokens, k, experts, args.capacity_factor or None)
    projections = [
        Buffer(f"{name} projections", (local, expert_shards * cap, width), "float32") for name in ("gate", "up")
    ]
    return [
        Buffer("sent rows", (experts, cap, d), act),
        Buffer("returned rows", (experts, cap, d), "float32"),
    ] + projections


def run_dispatch_buffers(config: ml_collections.ConfigDict, mesh_shape: dict) -> list:
    """`dispatch_buffers` of a run config on a resolved mesh shape (one micro-batch's tokens)."""
    args = from_config(config.model)
    rows = config.data.global_batch_size // config.train.microbatches
    tokens = tokens_per_device(rows * config.data.seq_len, mesh_shape)
    expert_shards = math.prod(mesh_shape[a] for a in parallelism.expert_mesh_axes(config.mesh.rules))
    return dispatch_buffers(args, tokens, expert_shards, mesh_shape.get(mesh_axes.TENSOR, 1))


def check_dispatch_fits(config: ml_collections.ConfigDict, hbm_bytes: float | None = None) -> None:
    """Raises ConfigError when one MoE layer's dispatch buffers alone exceed the HBM per device
    (`hbm_bytes`, else the topology's; no check when neither is known)."""
    topology = get_topology(config.mesh.topology)
    hbm = hbm_bytes if hbm_bytes is not None else topology.hbm_bytes
    if not hbm or config.model.num_routed_experts == 0:
        return
    shape = plan_layout(topology, dict(config.mesh.axes), dict(config.mesh.pins)).shape
    buffers = run_dispatch_buffers(config, shape)
    total = sum(b.bytes for b in buffers)
    if total <= hbm:
        return
    model = config.model
    largest = max(buffers, key=lambda b: b.bytes)
    if model.moe_dispatch == "padded":
        field = f"config.model.capacity_factor={model.capacity_factor}"
        remedy = "set a capacity factor that bounds them (--config.model.capacity_factor=1.25)"
    else:
        field = f"config.model.moe_dispatch={model.moe_dispatch!r}"
        remedy = "use moe_dispatch='padded' with a capacity factor (--config.model.capacity_factor=1.25)"
    raise ConfigError(
        f"{field}: one MoE layer's dispatch buffers alone need {total / GIB:,.1f} GiB per device of the "
        f"{hbm / GIB:,.1f} GiB HBM on {topology.name}, the largest the {largest}; {remedy} or spread the "
        f"tokens over more devices"
    )
