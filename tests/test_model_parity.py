"""Our DeepSeek-V4 against the `transformers` reference, float32, random weights, every layer kind, at
the release's compression ratios and at others.

Tolerances (stated once): per-layer hidden streams and logits agree to 2e-5 of the reference's largest
magnitude (measured: up to 3.4e-6, the logits); gradients to 1e-3 of the largest gradient of the same
tensor (measured: up to 1.9e-4; the mHC scales' gradients sum 800 token terms with cancellation).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from transformers import DeepseekV4Config

from hf_io.hf_config import config_json, mismatches
from model import hf_mapping
from tests.hf_reference import matching_model, random_reference
from tests.model_configs import parity_args

FORWARD_RTOL = 2e-5
GRAD_RTOL = 1e-3
SEQ_LEN = 400  # 25 windows of 16, 3 complete HCA blocks of 128, 100 CSA entries with top-8
# CSA at ratio 8 and HCA at 16, kinds named by attention_kinds: a hash CSA layer, then HCA and CSA.
UNUSUAL_RATIOS = dict(
    num_layers=3, num_hash_layers=1, compress_ratios=(8, 16, 8, 0), attention_kinds=("csa", "hca", "csa", "sliding")
)
UNUSUAL_SEQ_LEN = 100  # 12 CSA entries with top-8 (a 4-token tail dropped), 6 HCA entries


def _relative_error(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-30)


@pytest.fixture(scope="module")
def setup():
    args = parity_args()
    reference = random_reference(args, seed=0)
    model = matching_model(args, reference)
    tokens = np.random.default_rng(1).integers(0, args.vocab_size, (2, SEQ_LEN))
    return args, reference, model, tokens


def test_schedule_covers_every_kind(setup):
    args, reference, _, _ = setup
    kinds = {(args.attention_kind(layer), args.is_hash_layer(layer)) for layer in range(args.num_layers)}
    assert {"sliding", "csa", "hca"} == {k for k, _ in kinds}
    assert {True, False} == {h for _, h in kinds}
    assert reference.config.layer_types[:3] == ["sliding_attention", "sliding_attention", "compressed_sparse_attention"]


def _check_forward(args, reference, model, tokens):
    """Every layer's hidden streams but the last, and the logits, agree to FORWARD_RTOL."""
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens), output_hidden_states=True)
    graphdef, state = nnx.split(model)
    ours = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t, collect_hidden=True))(state, jnp.asarray(tokens))
    # The reference records the embedding streams, then each layer's output but the last (whose
    # place holds the final normalised hidden state); the logits cover the last layer.
    for layer in range(args.num_layers - 1):
        error = _relative_error(ours.hidden[layer], expected.hidden_states[layer + 1].numpy())
        print(f"layer {layer}: relative error {error:.2e}")
        assert error < FORWARD_RTOL, f"layer {layer} ({args.attention_kind(layer)}): relative error {error:.2e}"
    error = _relative_error(ours.logits, expected.logits.numpy())
    print(f"logits: relative error {error:.2e}")
    assert error < FORWARD_RTOL, f"logits: relative error {error:.2e}"


def test_forward_matches_reference_per_layer(setup):
    _check_forward(*setup)


def test_unusual_ratios_match_reference():
    """Any ratio > 1 works for either compressed kind: CSA at 8 and HCA at 16 equal the reference built
    with those `compress_rates`."""
    args = parity_args(**UNUSUAL_RATIOS)
    reference = random_reference(args, seed=0)
    assert reference.config.layer_types == [
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ]
    assert reference.config.compress_rates == {"compressed_sparse_attention": 8, "heavily_compressed_attention": 16}
    tokens = np.random.default_rng(1).integers(0, args.vocab_size, (2, UNUSUAL_SEQ_LEN))
    _check_forward(args, reference, matching_model(args, reference), tokens)


def test_exported_config_names_unusual_ratios():
    """The `config.json` we write for other ratios gives `transformers` the same schedule (it reads
    `layer_types` and `compress_rates`, not the release's `compress_ratios`), and is checked back."""
    args = parity_args(**UNUSUAL_RATIOS)
    config = config_json(args, quantized=False)
    read = DeepseekV4Config.from_dict(config)
    assert read.layer_types == [
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ]
    assert read.compress_rates == {"compressed_sparse_attention": 8, "heavily_compressed_attention": 16}
    assert mismatches(config, args) == []
    other = dict(config, compress_rates={"compressed_sparse_attention": 8, "heavily_compressed_attention": 32})
    del other["compress_ratios"]
    assert mismatches(other, args) == ["compression ratios: checkpoint has [8, 32, 8], the config has [8, 16, 8]"]


def test_gradients_match_reference(setup):
    args, reference, model, tokens = setup
    probe = np.random.default_rng(2).standard_normal((2, SEQ_LEN, args.vocab_size)).astype(np.float32)
    reference.zero_grad()
    logits = reference(torch.from_numpy(tokens)).logits
    (logits * torch.from_numpy(probe)).sum().backward()
    expected = {
        name: (p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32))
        for name, p in reference.named_parameters()
    }

    graphdef, trainable, rest = nnx.split(model, nnx.Param, ...)

    def loss(trainable_state):
        out = nnx.merge(graphdef, trainable_state, rest)(jnp.asarray(tokens))
        return jnp.sum(out.logits * probe)

    grads = jax.jit(jax.grad(loss))(trainable)
    flat = {path: np.asarray(var[...]) for path, var in hf_mapping.model_flat(model).items()}
    flat.update({".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)})
    ours = hf_mapping.flat_to_hf(flat, args)
    checked, worst = 0, 0.0
    for name, reference_grad in expected.items():
        scale = np.abs(reference_grad).max()
        if scale == 0:  # indexer weights: selection is discrete, no gradient on either side
            assert np.abs(ours[name]).max() == 0, name
            continue
        error = np.abs(ours[name] - reference_grad).max() / scale
        assert error < GRAD_RTOL, f"gradient of {name}: relative error {error:.2e}"
        checked += 1
        worst = max(worst, error)
    assert checked > 100
    print(f"largest relative gradient error over {checked} tensors: {worst:.2e}")
