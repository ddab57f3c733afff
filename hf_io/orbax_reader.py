"""Reads the weights of one Checkpointer step, slice by slice: a training checkpoint (OCDBT, with
optimizer state that is never touched) or a converted one. Array names, shapes and dtypes come from
Orbax's own metadata; the bytes are read with TensorStore, one layer or expert at a time."""

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from configs.checkpoint_layout import CHECKPOINT_DIR, CONFIG, STATE
from configs.release import ConfigError

OCDBT_CACHE_BYTES = 64 << 20


class WeightsReader:
    def __init__(self, workdir: str, step: int | None = None):
        root = epath.Path(workdir) / CHECKPOINT_DIR
        if not root.exists():
            raise ConfigError(
                f"{workdir}: no {CHECKPOINT_DIR}/ directory; expected a train.py workdir or a converted checkpoint"
            )
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        manager = ocp.CheckpointManager(
            root,
            options=options,
            item_handlers={STATE: ocp.PyTreeCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()},
        )
        steps = manager.all_steps()
        if step is None:
            step = manager.latest_step()
        if step is None or step not in steps:
            raise ConfigError(
                f"{root}: no complete checkpoint"
                + (f" for step {step}; complete ones: {steps}" if step is not None else "")
            )
        self.step = step
        self.state_dir = root / str(step) / STATE
        tree = manager.item_metadata(step)[STATE]
        manager.close()
        self.arrays = {meta.name: meta for meta in ocp.tree.to_flat_dict(tree.tree).values()}
        self._use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self.state_dir)
        self._use_zarr3 = bool(tree.use_zarr3)
        self._open = {}
        # Orbax's read specs name a shared cache for OCDBT's index nodes; data chunks are not cached.
        self._context = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": OCDBT_CACHE_BYTES}})

    def shape(self, name: str) -> tuple:
        return tuple(self.arrays[name].shape)

    def read(self, name: str, index: tuple) -> np.ndarray:
        """`name[index]` as a NumPy array of its stored dtype."""
        if name not in self._open:
            info = ocp.type_handlers.ParamInfo(name=name, parent_dir=self.state_dir, use_zarr3=self._use_zarr3)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
            self._open[name] = ts.open(spec, open=True, read=True, context=self._context).result()
        return np.asarray(self._open[name][index].read().result())
