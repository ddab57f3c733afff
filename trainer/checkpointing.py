"""Orbax checkpoints of the whole run: train state, data-iterator position and config in one step.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}` (+ `metrics` when a best-by-metric policy is
on). Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when every item is
written, so a process killed mid-save leaves only the tmp directory, which `CheckpointManager` never
lists; `latest_step()` and `restore()` therefore only ever see complete checkpoints.

The train state is stored as a nested dict of plain arrays keyed by the pytree path of each leaf
(`params/embed/value`, `opt_state/0/mu/...`). That keeps the files readable without this code's
classes (nnx.State, optax NamedTuples), and a restore rebuilds the exact TrainState structure from
the abstract target the caller passes: its tree structure gives the containers, its leaves'
shardings say where every shard goes, so a checkpoint loads onto any mesh without first gathering
onto one device.
"""

import base64
import functools
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from configs.checkpoint_layout import CHECKPOINT_DIR, CONFIG, DATA, STATE, config_to_json
from configs.release import ConfigError
from mesh.sharding import activate, param_shardings
from model.args import ModelArgs
from model.params import split_variables
from model.transformer import DeepSeekV4
from trainer.array_writer import BlockArrayHandler
from trainer.io_priority import BackgroundWriter
from trainer.state import TrainState, optimizer_shardings, replicated

TMP_SUFFIX = ".orbax-checkpoint-tmp"
# How the data-iterator state is wrapped so JSON can carry either a dict or grain's bytes.
DATA_JSON, DATA_BYTES = "json", "bytes"


def _key_name(key) -> str:
    """One pytree path entry as a dict key (dict keys, list indices and attribute names alike)."""
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    raise TypeError(f"unsupported pytree path entry {key!r}")


def _to_nested_dict(tree, what: str) -> dict:
    """A pytree -> nested dict of its leaves keyed by path; raises if two paths share a name."""
    nested: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [_key_name(key) for key in path]
        node = nested
        for name in names[:-1]:
            node = node.setdefault(name, {})
        if names[-1] in node:
            raise ValueError(f"{what}: two leaves map to the checkpoint key {'/'.join(names)}")
        node[names[-1]] = leaf
    return nested


def _from_nested_dict(nested: dict, like) -> Any:
    """Inverse of `_to_nested_dict`: the leaves of `nested`, in the order and containers of `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = nested
        for key in path:
            node = node[_key_name(key)]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _encode_data_state(data_state) -> dict:
    """A grain iterator's state (a JSON-able dict, or bytes from the older iterators) as a JSON dict."""
    if isinstance(data_state, bytes):
        return {"kind": DATA_BYTES, "value": base64.b64encode(data_state).decode("ascii")}
    return {"kind": DATA_JSON, "value": data_state}


def _decode_data_state(stored: dict):
    if stored["kind"] == DATA_BYTES:
        return base64.b64decode(stored["value"])
    return stored["value"]


def abstract_train_state(args: ModelArgs, mesh, rules, tx: optax.GradientTransformation) -> TrainState:
    """The TrainState of `create_train_state` as ShapeDtypeStructs with that function's shardings on
    `mesh`, built without allocating or compiling the model: the restore target for a resume,
    possibly on another mesh than the one that saved. Nothing is compiled."""
    with activate(mesh, rules):
        _, abstract = nnx.split(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))))
        shardings = param_shardings(abstract, mesh, rules)
    model_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params, routing = split_variables(model_state)
    scalar = replicated(mesh)
    param_shardings_only, _ = split_variables(shardings)
    opt_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(tx.init, params),
        optimizer_shardings(tx, params, param_shardings_only, mesh, rules),
    )
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return TrainState(
        step=jax.ShapeDtypeStruct((), np.int32, sharding=scalar),
        params=params,
        opt_state=opt_state,
        routing=routing,
        rng=jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=scalar),
        nonfinite_steps=jax.ShapeDtypeStruct((), np.int32, sharding=scalar),
    )


def abstract_like(state, shardings) -> Any:
    """ShapeDtypeStructs of `state`'s leaves with `shardings` (same structure): a restore target from
    a state that already exists, e.g. a freshly initialised one."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


# Weights an initial checkpoint may lack and that then start fresh without being named: the MTP
# module, absent from `transformers` saves (and so from their conversions).
FRESH_WITHOUT_ASKING = ("params/mtp/", "routing/mtp/")


def check_missing(directory: str, missing: list[str], allowed_prefixes=()) -> None:
    """Refuses an initial checkpoint that lacks weights other than the MTP module's and those under
    `allowed_prefixes` (--init_allow_missing), naming them."""
    unexpected = [path for path in missing if not path.startswith(FRESH_WITHOUT_ASKING + tuple(allowed_prefixes))]
    if unexpected:
        raise ConfigError(
            f"--init_checkpoint={directory} lacks {len(unexpected)} weights besides the MTP module's: "
            f"{', '.join(unexpected[:6])}{', ...' if len(unexpected) > 6 else ''}; pass "
            f"--init_allow_missing=<path prefixes, e.g. {unexpected[0].rsplit('/', 1)[0]}/> to start "
            "them from fresh initialisation"
        )


class Checkpointer:
    """Saves and restores (train state, data-iterator state, config) with an Orbax CheckpointManager.

    Keeps the `keep` most recent steps; with `keep_best_metric`, also the step whose saved metrics
    are best by `keep_best_mode`, so a long run cannot rotate its best evaluation away. `save` only
    writes every `save_every` steps unless forced (the final step, a preemption).
    """

    def __init__(
        self,
        workdir,
        config: ml_collections.ConfigDict,
        *,
        keep: int,
        save_every: int,
        keep_best_metric: str | None = None,
        keep_best_mode: str = "min",
        async_save: bool = True,
        replica_parallel: bool = False,
        writer_nice: int = 0,
    ):
        self.directory = epath.Path(workdir) / CHECKPOINT_DIR
        self.config = config
        self.save_every = save_every
        self.keep_best_metric = keep_best_metric
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        best_fn = None
        if keep_best_metric is not None:
            best_fn = lambda metrics: metrics[keep_best_metric]
            # BestN keeps the last n after sorting; for "min" sorting descending puts the best last.
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn, reverse=keep_best_mode == "min", n=1, keep_checkpoints_without_metrics=False
                )
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            best_fn=best_fn,
            best_mode=keep_best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        )
        # Replica-parallel saving splits each replicated array among its replicas with one sliced
        # copy per distinct shape, each compiled on first use: measured here, the first save of the
        # 10 MiB test state blocked the loop 15 s with it and 0.5 s without. Without it, each
        # process's shards are written as merged blocks (trainer/array_writer.py). A registry of
        # this manager's own (rather than the global one) keeps the choice local.
        array_handler = (
            ocp.type_handlers.ArrayHandler(use_replica_parallel=True) if replica_parallel else BlockArrayHandler()
        )
        registry = ocp.type_handlers.create_type_handler_registry(
            (jax.Array, array_handler),
            (np.ndarray, ocp.type_handlers.NumpyHandler()),
            (np.number, ocp.type_handlers.ScalarHandler()),
        )
        handlers = {
            STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
            DATA: ocp.JsonCheckpointHandler(),
            CONFIG: ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._writer = BackgroundWriter(writer_nice if async_save else 0)
        incomplete = sorted(p.name for p in self.directory.iterdir() if p.name.endswith(TMP_SUFFIX))
        if incomplete:
            logging.warning(
                "%s: ignoring incomplete saves %s (a process died while writing them)", self.directory, incomplete
            )

    @classmethod
    def from_config(cls, workdir, config: ml_collections.ConfigDict, checkpoint_config: ml_collections.ConfigDict):
        """`checkpoint_config` as made by `configs.checkpoint.get_config`; `config` is saved with each step."""
        return cls(
            workdir,
            config,
            keep=checkpoint_config.keep,
            save_every=checkpoint_config.save_every,
            keep_best_metric=checkpoint_config.keep_best_metric,
            keep_best_mode=checkpoint_config.keep_best_mode,
            async_save=checkpoint_config.async_save,
            replica_parallel=checkpoint_config.replica_parallel,
            writer_nice=checkpoint_config.writer_nice,
        )

    def save(self, step: int, state, data_state, metrics: dict | None = None, force: bool = False) -> bool:
        """Starts saving `step` if it is on the `save_every` grid or `force`d; -> whether it saves.

        With async saves this returns once the arrays are copied to host memory, so `state` may be
        donated to the next step right away; the files are written in the background. A step that is
        already saved (e.g. the final step right after a periodic save) is skipped. `metrics` (scalars)
        rank the step for keep-best. Nothing here checks for NaN: the train step never produces a
        non-finite state (`trainer.nonfinite`), and a NaN checkpoint would be kept like any other.
        """
        if not self.due(step, force):
            return False
        if metrics is not None:
            metrics = {name: float(value) for name, value in metrics.items()}
        if self.keep_best_metric is not None and metrics is not None and self.keep_best_metric not in metrics:
            raise KeyError(
                f"{self.directory}: step {step}: metrics lack keep_best_metric "
                f"{self.keep_best_metric!r}; got {sorted(metrics)}"
            )
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.PyTreeSave(_to_nested_dict(state, f"step {step}")),
                DATA: ocp.args.JsonSave(_encode_data_state(data_state)),
                CONFIG: ocp.args.JsonSave(config_to_json(self.config)),
            }
        )
        started = time.perf_counter()
        saved = self._writer.run(self._manager.save, step, args=args, metrics=metrics, force=True)
        logging.info("%s: step %d save started, blocked %.3f s", self.directory, step, time.perf_counter() - started)
        return saved

    def due(self, step: int, force: bool = False) -> bool:
        """Whether `save(step, ..., force)` would save: lets the caller gather the data position (a
        collective on multi-process runs) only for the steps that are saved."""
        return (force or step % self.save_every == 0) and step not in self._manager.all_steps()

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None when there is none)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best `keep_best_metric` (the latest step without a metric policy)."""
        return self._manager.best_step()

    def restore(self, step: int | None, abstract_state):
        """-> (state, data_state) of `step` (None: the latest complete one).

        `abstract_state` is a pytree of ShapeDtypeStructs with the target shardings, in the
        structure of the saved state (see `abstract_train_state`); each device reads only its shards.
        """
        step = self._complete_step(step)
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            if getattr(leaf, "sharding", None) is None:
                raise ValueError(
                    f"{self.directory}: restore target {jax.tree_util.keystr(path)} has no "
                    "sharding; pass ShapeDtypeStructs with the target shardings"
                )
        target = _to_nested_dict(abstract_state, f"restore target of step {step}")
        started = time.perf_counter()
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.PyTreeRestore(
                        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
                    ),
                    DATA: ocp.args.JsonRestore(),
                }
            ),
        )
        logging.info("%s: restored step %d in %.3f s", self.directory, step, time.perf_counter() - started)
        return _from_nested_dict(restored[STATE], abstract_state), _decode_data_state(restored[DATA])

    def restore_weights(self, step: int | None, abstract_weights: dict, fallback: dict | None = None):
        """-> (weights, missing): `{'params': ..., 'routing': ...}` of `step` (None: the latest complete
        one) in the structure and shardings of `abstract_weights`.

        Reads a training checkpoint (its optimizer state, data position and RNG stay unread) as well
        as a converted one, which holds only these two. Leaves the checkpoint lacks (the MTP module of
        weights converted from `transformers`, which has none) come from `fallback`, same structure,
        and their paths are returned in `missing`; without a fallback they are an error.
        """
        step = self._complete_step(step)
        saved = self._manager.item_metadata(step)[STATE]
        saved_paths = {
            tuple(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(saved.tree)[0]
        }
        flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_weights)
        names = [tuple(_key_name(k) for k in path) for path, _ in flat]
        missing = ["/".join(n) for n in names if n not in saved_paths]
        if missing and fallback is None:
            raise KeyError(f"{self.directory}: step {step} lacks {len(missing)} weights, e.g. {missing[:5]}")
        # None leaves vanish from the nested dict: the target asks only for what was saved.
        target = _to_nested_dict(
            jax.tree_util.tree_unflatten(
                treedef, [leaf if n in saved_paths else None for n, (_, leaf) in zip(names, flat)]
            ),
            f"weights of step {step}",
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.PyTreeRestore(
                        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
                    )
                }
            ),
        )[STATE]
        own = jax.tree_util.tree_leaves(fallback) if missing else [None] * len(flat)
        weights = [
            functools.reduce(lambda node, key: node[key], n, restored) if n in saved_paths else fresh
            for n, fresh in zip(names, own)
        ]
        logging.info("%s: restored the weights of step %d (%d absent)", self.directory, step, len(missing))
        return jax.tree_util.tree_unflatten(treedef, weights), missing

    def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
        """The config saved with `step` (None: the latest complete one), e.g. to check a resume's."""
        step = self._complete_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
        return ml_collections.ConfigDict(restored[CONFIG])

    def _complete_step(self, step: int | None) -> int:
        """`step`, or the latest one for None, after checking it was completely written."""
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"{self.directory}: no complete checkpoint for step {step}; complete ones: {self.all_steps()}"
            )
        return step

    def saving(self) -> bool:
        """Whether a background save is still writing."""
        return self._manager.is_saving_in_progress()

    def wait(self):
        """Blocks until a background save has finished writing (and old steps are pruned)."""
        self._manager.wait_until_finished()

    def close(self):
        """Finishes any background save and releases the manager's threads."""
        self._manager.close()
        self._writer.close()
