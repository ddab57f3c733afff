"""Checks a whole run config, after the command line has overridden it and before anything starts.

Every section's fields that a run reads as counts, choices or weights are checked here, so that a
bad override (`--config.checkpoint.keep=0`, `--config.data.num_packing_bins=0`, a negative mixture
weight) is one `ConfigError` naming `config.<section>.<field>`, the value and the allowed range,
instead of a division by zero or a failure deep in grain. train.py and score_preferences.py call
`validate_run_config` first; the checkpoint section's own checks live in configs/checkpoint.py.
"""

import math

import ml_collections

from configs import checkpoint
from configs.objectives import NAMES as OBJECTIVES
from configs.release import ConfigError
from data.encode import LOSS_MASK_MODES
from data.packing import OVERLONG_POLICIES
from model.args import from_config
from trainer.nonfinite import POLICIES as NONFINITE_POLICIES

SOURCE_FIELDS = ("sft_sources", "eval_sources", "preference_sources", "prompt_sources")


def _at_least(config: ml_collections.ConfigDict, section: str, field: str, low: int) -> None:
    value = config[section][field]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"config.{section}.{field} must be an integer >= {low}, got {value!r}")


def _one_of(config: ml_collections.ConfigDict, section: str | None, field: str, allowed: tuple) -> None:
    value = config[field] if section is None else config[section][field]
    if value not in allowed:
        name = field if section is None else f"{section}.{field}"
        raise ConfigError(f"config.{name} must be one of {allowed}, got {value!r}")


def _weight(config: ml_collections.ConfigDict, section: str, field: str) -> None:
    value = config[section][field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"config.{section}.{field} must be a finite number >= 0, got {value!r}")


def _mtp_weights(config: ml_collections.ConfigDict) -> None:
    """The MTP weight and the one after the learning-rate decay starts (None: constant); a change of
    weight needs a decay to start."""
    _weight(config, "train", "mtp_weight")
    after = config.train.mtp_weight_after_decay
    if after is None:
        return
    _weight(config, "train", "mtp_weight_after_decay")
    if after != config.train.mtp_weight and config.optimizer.decay == "constant":
        raise ConfigError(
            f"config.train.mtp_weight_after_decay={after!r} applies from the learning-rate decay, but "
            f"config.optimizer.decay is 'constant'; set it to config.train.mtp_weight "
            f"({config.train.mtp_weight!r}) for a constant MTP weight"
        )


def _mixture(config: ml_collections.ConfigDict, field: str) -> None:
    sources = config.data[field]
    for index, source in enumerate(sources):
        if not isinstance(source, (tuple, list)) or len(source) != 2:
            raise ConfigError(f"config.data.{field}[{index}] must be a (glob pattern, weight) pair, got {source!r}")
        weight = source[1]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(
                f"config.data.{field}[{index}] ({source[0]!r}) has weight {weight!r}: a mixture weight "
                "must be a finite number >= 0"
            )
    if sources and not sum(weight for _, weight in sources) > 0:
        raise ConfigError(f"config.data.{field}: the mixture weights sum to 0; at least one must be > 0")


def validate_run_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first field out of its range (see the module docstring)."""
    _one_of(config, None, "objective", OBJECTIVES)
    try:
        from_config(config.model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for field, low in (("steps", 1), ("microbatches", 1)):
        _at_least(config, "train", field, low)
    _one_of(config, "train", "nonfinite", NONFINITE_POLICIES)
    _mtp_weights(config)
    _weight(config, "train", "indexer_weight")
    for field, low in (
        ("global_batch_size", 1),
        ("seq_len", 2),
        ("num_packing_bins", 1),
        ("streams", 0),
        ("prefetch", 0),
        ("read_threads", 0),
        ("read_buffer", 1),
    ):
        _at_least(config, "data", field, low)
    _one_of(config, "data", "overlong", OVERLONG_POLICIES)
    _one_of(config, "data", "loss_mask", LOSS_MASK_MODES)
    for field in SOURCE_FIELDS:
        _mixture(config, field)
    rows, microbatches = config.data.global_batch_size, config.train.microbatches
    if rows % microbatches:
        raise ConfigError(f"config.train.microbatches={microbatches} must divide config.data.global_batch_size={rows}")
    for field, low in (("num_examples", 0), ("max_new_tokens", 1), ("max_prompt_len", 1), ("batch_rows", 1)):
        _at_least(config, "eval", field, low)
    try:
        checkpoint.validate(config.checkpoint)
    except ValueError as error:
        raise ConfigError(f"config.{error}") from None
