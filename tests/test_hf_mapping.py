"""The Hugging Face weight mapping is lossless in both directions and refuses incomplete or foreign
state loudly, naming the offending tensor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import hf_mapping
from model.transformer import DeepSeekV4
from tests.hf_reference import random_reference, reference_numpy_state
from tests.model_configs import parity_args


@pytest.fixture(scope="module")
def args():
    return parity_args()


@pytest.fixture(scope="module")
def hf_state(args):
    return reference_numpy_state(random_reference(args))


@pytest.fixture(scope="module")
def flat(hf_state, args):
    return hf_mapping.hf_to_flat(hf_state, args)


def zero_model(args) -> DeepSeekV4:
    """A real DeepSeekV4 holding zeros: built from the abstract tree, skipping ~15 s of eager random init;
    zeros also ensure every value read back after a load was written by the load."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


def test_round_trip_is_bit_exact(hf_state, flat, args):
    """Export after import must give back the checkpoint unchanged, tensor by tensor."""
    back = hf_mapping.flat_to_hf(flat, args)
    assert sorted(back) == sorted(hf_state)
    for name, original in hf_state.items():
        assert np.can_cast(back[name].dtype, original.dtype), name
        assert back[name].shape == original.shape, name
        assert np.array_equal(back[name], original), name


def test_missing_tensor_is_named(hf_state, args):
    """A truncated checkpoint must fail at load time, saying what is missing."""
    name = "model.layers.3.self_attn.compressor.kv_proj.weight"
    partial = {k: v for k, v in hf_state.items() if k != name}
    with pytest.raises(hf_mapping.MappingError, match=f"missing tensor '{name}'"):
        hf_mapping.hf_to_flat(partial, args)


def test_unexpected_tensor_is_named(hf_state, args):
    """A tensor no rule consumes (e.g. a checkpoint of another layout) must not be silently dropped."""
    name = "model.layers.0.self_attn.compressor.kv_proj.weight"  # layer 0 is sliding: no compressor
    extra = dict(hf_state, **{name: hf_state["model.layers.3.self_attn.compressor.kv_proj.weight"]})
    with pytest.raises(hf_mapping.MappingError, match="unexpected tensors") as error:
        hf_mapping.hf_to_flat(extra, args)
    assert name in str(error.value)


def test_load_flat_reports_shape_mismatch(flat, args):
    """A wrongly shaped array names the parameter and both shapes instead of broadcasting or crashing later."""
    path = "groups.0.blocks.0.attn.wq_a"
    wrong = np.swapaxes(flat[path], 1, 2)
    assert wrong.shape != flat[path].shape
    with pytest.raises(hf_mapping.MappingError) as error:
        hf_mapping.load_flat(zero_model(args), dict(flat, **{path: wrong}), skip_prefixes=("mtp.",))
    message = str(error.value)
    assert path in message and str(tuple(wrong.shape)) in message and str(tuple(flat[path].shape)) in message


def test_load_flat_then_model_flat_gives_back_the_arrays(flat, args):
    """Loading writes every mapped array into the model exactly; only the MTP module is left untouched."""
    model = zero_model(args)
    hf_mapping.load_flat(model, flat, skip_prefixes=("mtp.",))
    variables = hf_mapping.model_flat(model)
    assert {p for p in variables if not p.startswith("mtp.")} == set(flat)
    for path, value in flat.items():
        assert np.array_equal(np.asarray(variables[path][...]), value), path
