"""Device meshes laid out on Ascend topologies, emulated on CPU.

- axes: mesh axis names and logical axis names (the project's vocabulary).
- topology, presets: link levels with cited bandwidths; `get_topology("cm384:4")`.
- layout: `plan_layout(topology, sizes, pins)` -> Layout (device order, per-axis levels, Mesh).
- cost: per-axis all-reduce / all-gather / reduce-scatter / all-to-all time estimates.
- emulate: give a CPU host the topology's device count before JAX starts.
- processes: small JSON values gathered from every process of a job.
- sharding: logical names -> PartitionSpecs and NamedShardings (`param_shardings`, `constrain`).
- report, __main__: `python -m mesh --topology=cm384 --mesh=expert=64,fsdp=12`.
"""
