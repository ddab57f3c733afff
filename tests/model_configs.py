"""Small model configurations for tests: the tiny config with overrides that put every code path to
work on short sequences (windows and top-k smaller than the sequence, several HCA blocks)."""

import jax
import numpy as np
from flax import nnx

from configs import tiny
from model.args import from_config
from model.params import split_variables
from model.transformer import DeepSeekV4
from trainer.state import TrainState


def tiny_args(**overrides):
    config = tiny.get_config().model
    config.update(overrides)
    return from_config(config)


def parity_args(**overrides):
    """6 layers: 2 sliding, then CSA/HCA; 3 hash layers; window 16 and top-8 of up to 75 CSA entries; 32 indexer heads make an all-zero (tied) index score improbable."""
    fields = dict(sliding_window=16, index_topk=8, index_n_heads=32)
    fields.update(overrides)
    return tiny_args(**fields)


def fresh_model(args):
    """-> (graphdef, params, routing) of a DeepSeekV4(args) initialised with seed 0, on one device."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))))
    params, routing = split_variables(jax.jit(lambda: nnx.split(DeepSeekV4(args, nnx.Rngs(0)))[1])())
    return graphdef, params, routing


def initial_train_state(params, routing, tx) -> TrainState:
    """The TrainState before the first step: step 0, `tx`'s initial state, key 0, no refused steps."""
    return TrainState(
        step=np.int32(0),
        params=params,
        opt_state=tx.init(params),
        routing=routing,
        rng=jax.random.key_data(jax.random.key(0)),
        nonfinite_steps=np.int32(0),
    )
