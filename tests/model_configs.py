"""Small model configurations for tests: the tiny config with overrides that put every code path to
work on short sequences (windows and top-k smaller than the sequence, several HCA blocks)."""

from configs import tiny
from model.args import from_config


def tiny_args(**overrides):
    config = tiny.get_config().model
    config.update(overrides)
    return from_config(config)


def parity_args(**overrides):
    """6 layers: 2 sliding, then CSA/HCA; 3 hash layers; window 16 and top-8 of up to 75 CSA entries; 32 indexer heads make an all-zero (tied) index score improbable."""
    fields = dict(sliding_window=16, index_topk=8, index_n_heads=32)
    fields.update(overrides)
    return tiny_args(**fields)
