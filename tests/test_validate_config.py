"""A run config is checked whole after the command line overrides it: each field out of range is one
ConfigError naming config.<section>.<field>, the value and the range, before anything starts."""

import pytest

from configs import tiny, v4_flash, v4_pro
from configs.release import ConfigError
from trainer.validate_config import validate_run_config

BAD = [
    ("checkpoint", "keep", 0, r"^config.checkpoint.keep must be a positive integer, got 0$"),
    ("checkpoint", "save_every", 0, r"^config.checkpoint.save_every must be a positive integer, got 0$"),
    ("checkpoint", "log_every", 0, r"^config.checkpoint.log_every must be a positive integer, got 0$"),
    ("data", "num_packing_bins", 0, r"^config.data.num_packing_bins must be an integer >= 1, got 0$"),
    ("data", "global_batch_size", 0, r"^config.data.global_batch_size must be an integer >= 1, got 0$"),
    ("data", "overlong", "cut", r"^config.data.overlong must be one of \('truncate', 'drop'\), got 'cut'$"),
    (
        "data",
        "sft_sources",
        (("a.jsonl", -1.0),),
        r"^config.data.sft_sources\[0\] \('a.jsonl'\) has weight -1.0: "
        r"a mixture weight must be a finite number >= 0$",
    ),
    (
        "data",
        "prompt_sources",
        (("a.jsonl", 0.0), ("b.jsonl", 0.0)),
        r"^config.data.prompt_sources: the mixture "
        r"weights sum to 0",
    ),
    ("train", "steps", 0, r"^config.train.steps must be an integer >= 1, got 0$"),
    ("train", "microbatches", 3, r"^config.train.microbatches=3 must divide config.data.global_batch_size=8$"),
    ("train", "nonfinite", "ignore", r"^config.train.nonfinite must be one of \('stop', 'skip'\), got 'ignore'$"),
    ("train", "mtp_weight", -0.3, r"^config.train.mtp_weight must be a finite number >= 0, got -0.3$"),
    (
        "train",
        "mtp_weight_after_decay",
        -0.1,
        r"^config.train.mtp_weight_after_decay must be a finite number >= 0, "
        r"got -0.1$",
    ),
    ("train", "indexer_weight", -1.0, r"^config.train.indexer_weight must be a finite number >= 0, got -1.0$"),
    ("eval", "batch_rows", 0, r"^config.eval.batch_rows must be an integer >= 1, got 0$"),
    (
        "model",
        "vocab_tile",
        100,
        r"^config.model.vocab_tile: 100 must divide vocab_size=512 \(or be 0: the whole "
        r"vocabulary\)$",
    ),
    ("model", "capacity_factor", -1.0, r"^config.model.capacity_factor: -1.0 must be >= 0 \(0 = dropless\)$"),
]


@pytest.mark.parametrize("section,field,value,message", BAD, ids=[f"{s}.{f}" for s, f, _, _ in BAD])
def test_each_field_out_of_range_is_named(section, field, value, message):
    config = tiny.get_config()
    config[section][field] = value
    with pytest.raises(ConfigError, match=message):
        validate_run_config(config)


def test_a_bad_objective_is_named():
    config = tiny.get_config()
    config.objective = "ppo"
    with pytest.raises(ConfigError, match=r"^config.objective must be one of \('sft', 'dpo', 'grpo', 'distill'\)"):
        validate_run_config(config)


def test_an_mtp_weight_change_without_a_learning_rate_decay_is_named():
    config = tiny.get_config()
    config.train.mtp_weight_after_decay = 0.1
    config.optimizer.decay = "constant"
    with pytest.raises(
        ConfigError,
        match=r"^config.train.mtp_weight_after_decay=0.1 applies from the learning-rate "
        r"decay, but config.optimizer.decay is 'constant'",
    ):
        validate_run_config(config)
    config.train.mtp_weight_after_decay = config.train.mtp_weight
    validate_run_config(config)


@pytest.mark.parametrize(
    "config",
    [
        tiny.get_config(),
        v4_pro.get_config(),
        v4_pro.get_config("scaled"),
        v4_flash.get_config(),
        v4_flash.get_config("scaled"),
    ],
)
def test_the_shipped_configs_pass(config):
    validate_run_config(config)
