"""`plan.py --search`: the meshes a topology allows for a config, ranked by estimated step time among
those whose memory fits, from an analytic model (only the best few are compiled, by plan.py, to confirm).

A candidate is (data, fsdp, expert, tensor) sizes multiplying to the device count, tensor a power of two
up to `max_tensor`, with the routed experts over `expert` or over (data, expert). It is rejected, with
the reason, when a sharding is impossible or the batch does not split. Weights, gradients and optimizer
state per device are exact (planner.memory); compute and communication are estimates that rank
candidates and do not replace their compile. The cost model in full: docs/planning.md.
"""

import dataclasses
import math
import statistics

import jax
import numpy as np
import optax
from flax import nnx

from configs import parallelism
from mesh import axes as mesh_axes
from mesh import cost
from mesh.axes import mesh_axes_of
from mesh.layout import plan_layout
from mesh.sharding import resolve_spec
from model.args import ModelArgs
from model.expert_dispatch import capacity
from model.flops import train_flops_per_step
from model.params import split_variables
from model.remat import forward_passes
from model.summary import abstract_model, component_of
from planner import memory
from planner.estimate import placement
from trainer.state import state_axes, state_spec

PARTIAL_SUMS_PER_LAYER = 3  # attention output, shared expert, routed experts: psum over tensor


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One parameter (or routing variable) as the search needs it."""

    path: str
    names: tuple  # logical axis names
    shape: tuple
    itemsize: int
    optimizer_bytes: int  # bytes of the optimizer state tied to it, unsharded
    matmul_share: float  # multiply-adds per token it takes part in (0: lookups, vectors)


class _Owner:
    """An optimizer-state leaf tagged with the parameter it belongs to (a pytree leaf)."""

    def __init__(self, path, nbytes):
        self.path, self.nbytes = path, nbytes


@dataclasses.dataclass(frozen=True)
class Table:
    params: tuple  # Tensors
    routing: tuple  # Tensors: selection biases, hash tables
    replicated_optimizer: int  # bytes of optimizer state tied to no parameter (step counts)


def tensors(args: ModelArgs, tx: optax.GradientTransformation) -> Table:
    """The parameters and routing variables of `args` as Tensors, with the optimizer bytes of each."""
    _, state = nnx.split(abstract_model(args))
    params, routing = split_variables(state)
    keys = jax.tree_util.tree_map_with_path(
        lambda path, v: v.replace("/".join(str(getattr(k, "key", k)) for k in path)),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    owners = optax.tree_map_params(
        tx,
        lambda leaf, path: (
            leaf if isinstance(leaf, optax.MaskedNode) else _Owner(path, leaf.size * leaf.dtype.itemsize)
        ),
        jax.eval_shape(tx.init, params),
        keys,
        transform_non_params=lambda leaf: _Owner(None, leaf.size * leaf.dtype.itemsize),
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    optimizer_bytes = {}  # parameter path -> bytes; None -> the replicated rest (step counts)
    for owner in jax.tree.leaves(owners, is_leaf=lambda x: isinstance(x, _Owner)):
        if isinstance(owner, _Owner):
            optimizer_bytes[owner.path] = optimizer_bytes.get(owner.path, 0) + owner.nbytes
    routed_share = args.num_experts_per_tok / args.num_routed_experts

    def table(tree, trainable):
        out = []
        for path, var in nnx.to_flat_state(tree):
            key = "/".join(str(p) for p in path)
            value = var.get_value()
            names = tuple(var.get_metadata()["out_sharding"])
            component = component_of(path)
            share = 0.0
            if trainable and value.ndim - (names[0] == "layers") >= 2 and component != "embedding":
                share = math.prod(value.shape) * (routed_share if "expert" in names else 1.0)
            out.append(
                Tensor(
                    key,
                    names,
                    tuple(value.shape),
                    np.dtype(value.dtype).itemsize,
                    optimizer_bytes.get(key, 0) if trainable else 0,
                    share,
                )
            )
        return tuple(out)

    return Table(table(params, True), table(routing, False), optimizer_bytes.get(None, 0))


@dataclasses.dataclass
class Candidate:
    axes: dict
    experts_over_data: bool
    memory: dict = None
    fits: bool = None
    compute_s: float = None
    comm_s: dict = None
    step_time_s: float = None
    mfu: float = None
    rejected: str = None

    @property
    def name(self) -> str:
        shape = ",".join(f"{k}={v}" for k, v in self.axes.items())
        return shape + (" experts over data" if self.experts_over_data else "")


def mesh_shapes(devices: int, max_tensor: int) -> list:
    """Every {data, fsdp, expert, tensor} multiplying to `devices`, tensor a power of two <= max_tensor."""
    divisors = [d for d in range(1, devices + 1) if devices % d == 0]
    shapes = []
    for tensor in (t for t in divisors if t <= max_tensor and t & (t - 1) == 0):
        for expert in (e for e in divisors if (devices // tensor) % e == 0):
            rest = devices // tensor // expert
            for fsdp in (f for f in divisors if rest % f == 0):
                shapes.append(
                    {
                        mesh_axes.DATA: rest // fsdp,
                        mesh_axes.FSDP: fsdp,
                        mesh_axes.EXPERT: expert,
                        mesh_axes.TENSOR: tensor,
                    }
                )
    return shapes


def _gathered(names, spec) -> tuple:
    """Mesh axes a weight is all-gathered over before use: those sharding it, minus the ones that split
    its computation (tensor, and the expert axes on a routed expert dim)."""
    axes = []
    for name, entry in zip(names, spec):
        for axis in mesh_axes_of(entry):
            if axis != mesh_axes.TENSOR and name != "expert":
                axes.append(axis)
    return tuple(axes)


def evaluate(
    candidate: Candidate, args: ModelArgs, config, topology, table: Table, hbm_bytes, model_flops: float | None = None
) -> Candidate:
    """Fills in `candidate`'s memory, fit, time estimate, or the reason it is rejected; `model_flops`
    of the step (`model.flops.train_flops_per_step`) may be given to spare recounting them."""
    params, routing = table.params, table.routing
    shape = dict(candidate.axes)
    rules = parallelism.rules(candidate.experts_over_data)
    shards = memory.token_shards(shape)
    if config.data.global_batch_size % shards:
        candidate.rejected = f"batch {config.data.global_batch_size} does not split over {shards} token shards"
        return candidate
    try:
        layout = plan_layout(topology, shape, dict(config.mesh.pins))
        specs = [resolve_spec(t.path, t.names, t.shape, shape, rules) for t in params + routing]
    except ValueError as error:
        candidate.rejected = str(error).split(";")[0]
        return candidate
    act = np.dtype(args.compute_dtype).itemsize
    passes = 1 + statistics.fmean(forward_passes(args))  # per layer: its forward passes and the backward
    seconds = {"all-gather": 0.0, "reduce-scatter": 0.0, "all-reduce": 0.0, "all-to-all": 0.0}
    weights = gradients = 0
    optimizer = table.replicated_optimizer
    flops_weight = flops_total = 0.0
    spec_axes = [tuple(a for entry in spec for a in mesh_axes_of(entry)) for spec in specs]
    zero = state_axes(rules)
    for t, used in zip(routing, spec_axes[len(params) :]):
        weights += math.prod(t.shape) // math.prod(shape[a] for a in used) * t.itemsize
    for t, spec, used in zip(params, specs, spec_axes):
        split = math.prod(shape[a] for a in used)
        numel = math.prod(t.shape)
        weights += numel // split * t.itemsize
        gradients += numel // split * t.itemsize
        state_used = [a for entry in state_spec(spec, t.shape, shape, zero) for a in mesh_axes_of(entry)]
        state_split = math.prod(shape[a] for a in state_used)
        optimizer += t.optimizer_bytes // state_split
        tensor_split = shape[mesh_axes.TENSOR] if mesh_axes.TENSOR in used else 1
        flops_total += t.matmul_share
        flops_weight += t.matmul_share * shape[mesh_axes.TENSOR] / tensor_split
        gathered = _gathered(t.names, spec)
        layers = t.shape[0] if t.names[0] == "layers" else 1
        if gathered:
            where = placement(layout, gathered)
            full = numel // layers // (split // where.size)
            seconds["all-gather"] += passes * layers * cost.all_gather_seconds(where, full * act)
            seconds["reduce-scatter"] += layers * cost.reduce_scatter_seconds(where, full * t.itemsize)
        replicating = tuple(a for a in memory.TOKEN_AXES if a not in used and shape[a] > 1)
        if replicating:
            seconds["all-reduce"] += cost.all_reduce_seconds(
                placement(layout, replicating), numel // split * t.itemsize
            )
    tokens = memory.tokens_per_device(config.data.global_batch_size * config.data.seq_len, shape)
    moe_layers = args.num_layers + args.num_mtp_layers
    expert_axes = parallelism.expert_mesh_axes(rules)
    if math.prod(shape[a] for a in expert_axes) > 1:
        rows = args.num_routed_experts * capacity(
            tokens, args.num_experts_per_tok, args.num_routed_experts, args.capacity_factor or None
        )
        where = placement(layout, expert_axes)
        per_call = cost.all_to_all_seconds(where, rows * args.hidden_size * act)
        back = cost.all_to_all_seconds(where, rows * args.hidden_size * 4)
        seconds["all-to-all"] = passes * moe_layers * (per_call + back)
    if shape[mesh_axes.TENSOR] > 1:
        where = placement(layout, (mesh_axes.TENSOR,))
        seconds["all-reduce"] += (
            passes * moe_layers * PARTIAL_SUMS_PER_LAYER * cost.all_reduce_seconds(where, tokens * args.hidden_size * 4)
        )
    candidate.memory = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": memory.activation_bytes(args, config.data.global_batch_size, config.data.seq_len, shape),
    }
    candidate.memory["total"] = sum(candidate.memory.values())
    candidate.fits = hbm_bytes is None or candidate.memory["total"] <= hbm_bytes
    if model_flops is None:
        model_flops = train_flops_per_step(args, config.data.global_batch_size, config.data.seq_len)
    devices = topology.num_devices
    if topology.peak_flops:
        candidate.compute_s = model_flops / devices / topology.peak_flops * flops_weight / max(flops_total, 1.0)
        candidate.comm_s = seconds
        candidate.step_time_s = candidate.compute_s + sum(seconds.values())
        candidate.mfu = model_flops / (candidate.step_time_s * topology.peak_flops * devices)
    return candidate


def search(args: ModelArgs, config, topology, table: Table, hbm_bytes, max_tensor: int = 8) -> list:
    """Every candidate mesh for `config` on `topology`, evaluated with `table` (`tensors(args, tx)`):
    fitting ones first, by estimated step time (then by memory), then the ones that do not fit, then
    the rejected ones."""
    candidates, model_flops = [], train_flops_per_step(args, config.data.global_batch_size, config.data.seq_len)
    for shape in mesh_shapes(topology.num_devices, max_tensor):
        for over_data in (False, True) if shape[mesh_axes.DATA] > 1 else (False,):
            candidates.append(
                evaluate(Candidate(shape, over_data), args, config, topology, table, hbm_bytes, model_flops)
            )

    def order(c):
        if c.rejected:
            return (2, 0.0, 0.0)
        return (0 if c.fits else 1, c.step_time_s or 0.0, c.memory["total"])

    return sorted(candidates, key=order)


def smallest_topology(args: ModelArgs, config, topologies: list, table: Table, hbm_bytes, max_tensor: int = 8):
    """(topology, its fastest fitting candidate) for the first of `topologies` (smallest first) on
    which a mesh fits by the analytic estimate; None when none does. A topology whose devices cannot
    hold the weights, gradients and optimizer state even split evenly is skipped unsearched."""
    state_bytes = table.replicated_optimizer + sum(
        2 * math.prod(t.shape) * t.itemsize + t.optimizer_bytes for t in table.params
    )
    for topology in topologies:
        if hbm_bytes is not None and state_bytes > hbm_bytes * topology.num_devices:
            continue
        fitting = [c for c in search(args, config, topology, table, hbm_bytes, max_tensor) if not c.rejected and c.fits]
        if fitting:
            return topology, fitting[0]
    return None


def apply(config, candidate: Candidate, topology: str | None = None):
    """A copy of `config` laid out as `candidate`, on `topology` (a spec; None: config's own)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        mesh = parallelism.get_config(
            topology or config.mesh.topology,
            dict(config.mesh.pins),
            experts_over_data=candidate.experts_over_data,
            **candidate.axes,
        )
        config.mesh = mesh
    return config


def as_dict(candidate: Candidate) -> dict:
    return {
        "mesh": dict(candidate.axes),
        "experts_over_data": candidate.experts_over_data,
        "fits": candidate.fits,
        "memory": candidate.memory,
        "compute_s": candidate.compute_s,
        "comm_s": candidate.comm_s,
        "step_time_s": candidate.step_time_s,
        "mfu": candidate.mfu,
        "rejected": candidate.rejected,
    }


def rejection_counts(candidates: list) -> dict:
    """How many candidates each reason rejected (reasons without the tensor's numbers)."""
    counts = {}
    for c in candidates:
        if c.rejected:
            reason = c.rejected.split(":", 1)[-1].strip() if ":" in c.rejected else c.rejected
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def format_table(candidates: list, top: int) -> str:
    gib = 2**30
    viable = [c for c in candidates if not c.rejected]
    lines = [
        f"search: {len(candidates)} candidate meshes, {len(viable)} shardable, "
        f"{sum(1 for c in viable if c.fits)} fit; the best {min(top, len(viable))} (analytic):",
        f"{'#':>3} {'mesh':<52}{'GiB/device':>11}{'fits':>6}{'compute s':>11}{'comm s':>9}{'step s':>9}{'MFU':>7}",
    ]
    for rank, c in enumerate(viable[:top], 1):
        timed = c.step_time_s is not None
        lines.append(
            f"{rank:>3} {c.name:<52}{c.memory['total'] / gib:>11.2f}{'yes' if c.fits else 'no':>6}"
            + (f"{c.compute_s:>11.3g}{sum(c.comm_s.values()):>9.3g}{c.step_time_s:>9.3g}{c.mfu:>7.1%}" if timed else "")
        )
    for reason, count in sorted(rejection_counts(candidates).items(), key=lambda kv: -kv[1]):
        lines.append(f"    rejected {count}: {reason}")
    return "\n".join(lines)
