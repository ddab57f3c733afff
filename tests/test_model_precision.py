"""bf16 compute against fp32 on the same weights.

Stated bounds (measured in brackets): the bf16 logits differ from fp32 by less than 6% in relative
Frobenius norm [3.6%], the median position by less than 2% of the largest fp32 logit [1.0%], and the
per-position argmax agrees on at least 93% of positions [97.5%]. Single positions can move further
[15%]: bf16 rounding can flip a discrete choice (an expert, an indexer selection) there.
"""

import jax
import numpy as np
from flax import nnx

from model import hf_mapping
from model.transformer import DeepSeekV4
from tests.model_configs import parity_args

FROBENIUS_BOUND = 0.06
MEDIAN_BOUND = 0.02
ARGMAX_AGREEMENT = 0.93


def _logits(args, flat, tokens):
    model = DeepSeekV4(args, nnx.Rngs(0))
    hf_mapping.load_flat(model, flat)
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t).logits)(state, tokens))


def test_bf16_close_to_fp32():
    fp32 = parity_args(dtype="float32")
    reference = DeepSeekV4(fp32, nnx.Rngs(3))
    flat = {p: np.asarray(v[...]) for p, v in hf_mapping.model_flat(reference).items()}
    tokens = np.random.default_rng(0).integers(0, fp32.vocab_size, (2, 160)).astype(np.int32)
    exact = _logits(fp32, flat, tokens)
    low = _logits(parity_args(dtype="bfloat16"), flat, tokens)
    frobenius = np.linalg.norm(low - exact) / np.linalg.norm(exact)
    assert 0 < frobenius < FROBENIUS_BOUND, frobenius  # > 0: bf16 was really used
    median = np.median(np.abs(low - exact).max(-1)) / np.abs(exact).max()
    assert median < MEDIAN_BOUND, median
    agreement = (low.argmax(-1) == exact.argmax(-1)).mean()
    assert agreement >= ARGMAX_AGREEMENT, agreement


def test_bf16_parameters_give_bf16_weights():
    args = parity_args(dtype="bfloat16", param_dtype="bfloat16")
    model = nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0)))
    dtypes = {p: v.dtype for p, v in hf_mapping.model_flat(model).items()}
    assert dtypes["groups.0.blocks.0.attn.wq_a"] == np.dtype("bfloat16")
    assert dtypes["groups.0.blocks.0.moe.experts.w1"] == np.dtype("bfloat16")
    # fp32 islands stay fp32 whatever the parameter dtype: mHC, sinks, compressor position bias.
    assert dtypes["groups.0.blocks.0.attn_hc.fn"] == np.dtype("float32")
    assert dtypes["groups.0.blocks.0.attn.attn_sink"] == np.dtype("float32")
