"""How often to save and log, what to keep, and whether saves run in the background.

`get_config(keep=5, keep_best_metric="eval_loss")` returns the defaults with overrides; an unknown
field or a bad value raises a ValueError that names the field and the allowed values. A run config
holds this section as `config.checkpoint`, so `--config.checkpoint.save_every=100` works.
"""

import ml_collections

BEST_MODES = ("min", "max")


def get_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            save_every=200,  # steps between checkpoints; the last step and a preemption always save
            keep=3,  # most recent complete checkpoints kept on disk
            # e.g. "eval_loss": also keep the best checkpoint by this metric. A typed reference, because a
            # ConfigDict field set to None would refuse a string from the command line.
            keep_best_metric=ml_collections.FieldReference(None, field_type=str),
            keep_best_mode="min",  # "min" or "max": which end of keep_best_metric is best
            async_save=True,  # write in a background thread; the step loop only waits for the host copy
            # Split the writing of replicated arrays among their replicas (Orbax's array handler): each
            # distinct shape costs a compiled slice on the first save (15 s of blocking for a 10 MiB test
            # state on CPU). Off: each process writes its shards merged into blocks (trainer/array_writer.py).
            replica_parallel=False,
            # Nice value (0..19) of the threads that write async saves: at 19 they use the CPU time the
            # step leaves, at 0 they compete with it (trainer/io_priority.py).
            writer_nice=19,
            log_every=10,  # steps between progress lines / metrics.jsonl records / TensorBoard points
        )
    )
    for name, value in overrides.items():
        if name not in config:
            raise ValueError(f"checkpoint config has no field {name!r}; fields: {sorted(config.keys())}")
        config[name] = value
    validate(config)
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the values a command line may have overridden; each error names its field."""
    if not isinstance(config.writer_nice, int) or not 0 <= config.writer_nice <= 19:
        raise ValueError(f"checkpoint.writer_nice must be an integer in 0..19, got {config.writer_nice!r}")
    for name in ("save_every", "keep", "log_every"):
        value = config[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"checkpoint.{name} must be a positive integer, got {value!r}")
    if config.keep_best_mode not in BEST_MODES:
        raise ValueError(f"checkpoint.keep_best_mode must be one of {BEST_MODES}, got {config.keep_best_mode!r}")
