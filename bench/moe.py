"""Routed-expert dispatch on 8 emulated CPU devices: dense all-experts reference vs sorted dispatch.

    python bench/moe.py [--steps=3] [--meshes=none;fsdp=8;data=2,expert=4;fsdp=2,expert=2,tensor=2]

Prints one JSON object. Per mesh: milliseconds per forward+backward (gradients w.r.t. x, routing weights
and w1/w3/w2; median of --steps after a compile run) of the dense reference (the einsums of
`RoutedExperts.__call__`), of the padded dispatch dropless and with --capacity_factor, and of the ragged
dispatch (or why it cannot run here); and the ratio of XLA-counted FLOPs (per-device cost analysis
times devices) to the analytic 2*3*t*k*d*I forward (x3 for forward+backward). Routing is random top-k,
so loads are near balanced. Timings on this shared 2-core machine are noisy (2-4x between runs).
"""

import contextlib
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 3, "Timed forward+backward runs per variant (after one compile run).")
_MESHES = flags.DEFINE_string(
    "meshes",
    "none;fsdp=8;data=2,expert=4;fsdp=2,expert=2,tensor=2",
    "Semicolon-separated meshes, each axis=size pairs; 'none' = no mesh.",
)
_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens t in the batch.")
_WIDTH = flags.DEFINE_integer("width", 256, "Model width d.")
_HIDDEN = flags.DEFINE_integer("hidden", 128, "Expert hidden width I.")
_EXPERTS = flags.DEFINE_integer("experts", 8, "Routed experts E.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token k.")
_CAPACITY = flags.DEFINE_float("capacity_factor", 1.25, "Capacity factor of the capped padded variant.")
_DEVICES = 8
_LIMIT = 7.0  # swiglu_limit of the V4 configs
_MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Forward + backward = forward + 2x forward (gradients w.r.t. the activations and the weights).
_TRAIN_FLOPS_PER_FORWARD = 3


def main(argv):
    del argv
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding

    from configs.parallelism import RULES
    from mesh.sharding import activate, constrain, resolve_spec
    from model.expert_dispatch import TOKEN_NAMES, W2_NAMES, W13_NAMES, routed_experts
    from model.moe import Routing, clamped_swiglu

    t, d, i, e, k = _TOKENS.value, _WIDTH.value, _HIDDEN.value, _EXPERTS.value, _TOP_K.value
    rng = np.random.default_rng(0)
    host = {
        "x": rng.normal(size=(t, d)).astype(np.float32),
        "experts": np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int32),
        "weights": rng.uniform(0.1, 1.0, (t, k)).astype(np.float32),
        "w1": (rng.normal(size=(e, d, i)) / math.sqrt(d)).astype(np.float32),
        "w3": (rng.normal(size=(e, d, i)) / math.sqrt(d)).astype(np.float32),
        "w2": (rng.normal(size=(e, i, d)) / math.sqrt(i)).astype(np.float32),
        "cotangent": rng.normal(size=(t, d)).astype(np.float32),
    }
    names = {
        "x": TOKEN_NAMES,
        "experts": TOKEN_NAMES,
        "weights": TOKEN_NAMES,
        "w1": W13_NAMES,
        "w3": W13_NAMES,
        "w2": W2_NAMES,
        "cotangent": TOKEN_NAMES,
    }

    def dense(x, experts, weights, w1, w3, w2):
        """RoutedExperts.__call__: every expert on every token, a combine matrix keeps the chosen ones."""
        combine = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], experts].add(weights)
        gate = jnp.einsum("td,edi->tei", x, w1, preferred_element_type=jnp.float32)
        up = jnp.einsum("td,edi->tei", x, w3, preferred_element_type=jnp.float32)
        h = constrain(clamped_swiglu(gate, up, _LIMIT) * combine[..., None], ("act_batch", "act_expert", "act_mlp"))
        return jnp.einsum("tei,eid->td", h, w2, preferred_element_type=jnp.float32)

    def dispatch(backend, capacity_factor=None):
        def forward(x, experts, weights, w1, w3, w2):
            return routed_experts(
                x,
                Routing(experts, weights, None),
                w1,
                w3,
                w2,
                limit=_LIMIT,
                backend=backend,
                capacity_factor=capacity_factor,
            )[0]

        return forward

    variants = {
        "dense": dense,
        "padded": dispatch("padded"),
        f"padded_cf{_CAPACITY.value:g}": dispatch("padded", _CAPACITY.value),
        "ragged": dispatch("ragged"),
    }
    order = ("cotangent", "x", "experts", "weights", "w1", "w3", "w2")
    useful = 2 * 3 * t * k * d * i

    def train(forward):
        """Forward+backward: gradients w.r.t. x, routing weights, w1, w3, w2 of sum(y * cotangent). A random
        cotangent, since with sum(y) XLA folds the ones into w2 and skips the dh matmul."""
        return jax.grad(lambda cotangent, *args: jnp.sum(forward(*args) * cotangent), argnums=(1, 3, 4, 5, 6))

    results = []
    for text in _MESHES.value.split(";"):
        if text == "none":
            mesh = None
            args = tuple(jnp.asarray(host[name]) for name in order)
        else:
            sizes = dict.fromkeys(_MESH_AXES, 1)
            sizes.update({axis: int(n) for axis, n in (pair.split("=") for pair in text.split(","))})
            mesh = jax.sharding.Mesh(
                np.array(jax.devices()).reshape([sizes[a] for a in _MESH_AXES]),
                _MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(_MESH_AXES),
            )
            args = tuple(
                jax.device_put(
                    host[name], NamedSharding(mesh, resolve_spec(name, names[name], host[name].shape, sizes, RULES))
                )
                for name in order
            )
        entry = {
            "mesh": text,
            "ms_per_forward_backward": {},
            "flops_ratio_forward": {},
            "flops_ratio_forward_backward": {},
        }
        for label, forward in variants.items():
            with activate(mesh, RULES) if mesh is not None else contextlib.nullcontext():
                try:
                    step = jax.jit(train(forward)).lower(*args).compile()
                    fwd = jax.jit(forward).lower(*args[1:]).compile()
                except NotImplementedError as error:
                    entry["ms_per_forward_backward"][label] = f"unavailable: {error}"
                    continue
            devices = 1 if mesh is None else mesh.size
            entry["flops_ratio_forward"][label] = round(fwd.cost_analysis()["flops"] * devices / useful, 3)
            entry["flops_ratio_forward_backward"][label] = round(
                step.cost_analysis()["flops"] * devices / (_TRAIN_FLOPS_PER_FORWARD * useful), 3
            )
            jax.block_until_ready(step(*args))
            times = []
            for _ in range(_STEPS.value):
                start = time.perf_counter()
                jax.block_until_ready(step(*args))
                times.append(time.perf_counter() - start)
            entry["ms_per_forward_backward"][label] = round(1e3 * statistics.median(times), 1)
        results.append(entry)
    print(
        json.dumps(
            {
                "tokens": t,
                "width": d,
                "hidden": i,
                "experts": e,
                "top_k": k,
                "devices": _DEVICES,
                "steps": _STEPS.value,
                "meshes": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    app.run(main)
