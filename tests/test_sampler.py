"""The sampler: the nucleus against a NumPy reference written from the definition, draws whose
frequencies match the sampling distribution, and on a sharded tiny model: temperature 0 is greedy
argmax, stop tokens end rows, and the returned log-probs are those of the full sequence's logits."""

import jax
import numpy as np
import pytest
import scipy.special
import scipy.stats
from flax import nnx
from jax.sharding import NamedSharding

from configs import parallelism
from mesh.sharding import activate, logical_to_spec
from tests.model_configs import tiny_args
from trainer.generate import make_greedy_generate
from trainer.sampler import draw, make_sampler, nucleus_mask, sampling_log_probs
from trainer.sharded_init import build_mesh, init_sharded
from trainer.state import split_variables
from trainer.step import BATCH

MAX_PROMPT, MAX_NEW, ROWS = 10, 6, 8
NUM_PROMPTS = 10  # two chunks of ROWS, the second partly empty
TEMPERATURE, TOP_P = 0.8, 0.9
ATOL = 1e-5  # sampler vs full-sequence forward: same prefixes, reductions in another order
SIGNIFICANCE = 1e-3  # chi-square test level (the seed is fixed: the outcome is too)
jit_draw = jax.jit(draw)  # one compile instead of one per primitive run eagerly


def reference_nucleus(probs, top_p):
    """Token j is inside when the tokens strictly more probable than j hold less than top_p."""
    above = np.array([[row[row > p].sum() for p in row] for row in probs.reshape(-1, probs.shape[-1])])
    return (above < top_p).reshape(probs.shape) | (top_p >= 1)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_nucleus_matches_reference(top_p):
    logits = np.random.default_rng(0).normal(scale=2.0, size=(16, 50)).astype(np.float32)
    log_probs = scipy.special.log_softmax(logits, axis=-1)
    expected = reference_nucleus(np.exp(log_probs.astype(np.float64)), top_p)
    np.testing.assert_array_equal(np.asarray(jax.jit(nucleus_mask)(log_probs, top_p)), expected)


def test_nucleus_keeps_ties_at_its_edge():
    """A sorted cut would keep [0.4, 0.2] (0.6 >= 0.5) and drop the equal 0.2s; the nucleus keeps them."""
    probs = np.array([[0.4, 0.2, 0.2, 0.2], [0.55, 0.25, 0.1, 0.1]])
    mask = jax.jit(nucleus_mask)
    assert np.asarray(mask(np.log(probs), 0.5)).tolist() == [[True] * 4, [True, False, False, False]]
    assert np.asarray(mask(np.log(probs), 0.85))[1].tolist() == [True] * 4
    assert np.asarray(mask(np.log(probs), 0.3))[0].tolist() == [True, False, False, False]


def test_temperature_zero_is_argmax():
    logits = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
    keys = jax.random.split(jax.random.key(1), 32)
    tokens, sampling_lp, model_lp = jit_draw(logits, keys, 0.0, TOP_P)
    np.testing.assert_array_equal(tokens, logits.argmax(axis=-1))
    np.testing.assert_array_equal(sampling_lp, 0.0)
    np.testing.assert_allclose(model_lp, scipy.special.log_softmax(logits, axis=-1).max(axis=-1), rtol=1e-5)


def test_sampled_frequencies_match_the_sampling_distribution():
    """20000 draws from fixed logits at temperature 0.7, top-p 0.8: tokens outside the nucleus never
    appear, and the counts of the others pass a chi-square test against the renormalised tempered
    probabilities (computed here in NumPy)."""
    draws, temperature, top_p = 20000, 0.7, 0.8
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
    tempered = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    inside = reference_nucleus(tempered[None], top_p)[0]
    expected = np.where(inside, tempered, 0.0) / tempered[inside].sum()
    assert 1 < inside.sum() < len(logits)  # the test must cut something and keep a choice

    keys = jax.random.split(jax.random.key(0), draws)
    tokens, sampling_lp, model_lp = jit_draw(np.broadcast_to(logits, (draws, len(logits))), keys, temperature, top_p)
    counts = np.bincount(np.asarray(tokens), minlength=len(logits))
    assert not counts[~inside].any()
    statistic, p_value = scipy.stats.chisquare(counts[inside], draws * expected[inside])
    assert p_value > SIGNIFICANCE, (counts, draws * expected)
    np.testing.assert_allclose(sampling_lp, np.log(expected[tokens]), rtol=1e-5)
    np.testing.assert_allclose(model_lp, scipy.special.log_softmax(logits)[tokens], rtol=1e-5)


@pytest.fixture(scope="module")
def model():
    """A tiny model born sharded on fsdp=4 x expert=2, rows sharded over all 8 devices, and prompts
    of varied lengths."""
    args = tiny_args(num_layers=2, compress_ratios=(0, 4), num_mtp_layers=0, num_hash_layers=1, sliding_window=16)
    mesh_config = parallelism.get_config("cm384-8", fsdp=4, expert=2)
    mesh, rules = build_mesh(mesh_config), mesh_config.rules
    graphdef, state, _ = init_sharded(args, mesh, rules, seed=0)
    params, routing = split_variables(state)
    batch_sharding = NamedSharding(mesh, logical_to_spec(BATCH, rules, dict(mesh.shape)))
    rng = np.random.default_rng(0)
    prompts = [
        rng.integers(0, args.vocab_size, rng.integers(2, MAX_PROMPT + 1)).astype(np.int32) for _ in range(NUM_PROMPTS)
    ]
    sample = make_sampler(
        graphdef, max_new_tokens=MAX_NEW, batch_rows=ROWS, max_prompt_len=MAX_PROMPT, batch_sharding=batch_sharding
    )
    forward = jax.jit(lambda st, t: jax.nn.log_softmax(nnx.merge(graphdef, st)(t).logits))

    def full_log_softmax(completions):
        """[rows, length, vocab] of the model on each prompt + completion, in one forward."""
        tokens = np.zeros((-(-len(prompts) // ROWS) * ROWS, MAX_PROMPT + MAX_NEW), np.int32)  # whole shards
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            tokens[row, : len(prompt) + len(completion.ids)] = np.concatenate([prompt, completion.ids])
        return np.asarray(forward(state, tokens))

    with activate(mesh, rules):
        greedy = sample(params, routing, prompts, stop_ids=(), temperature=0.0)
        sampled = sample(
            params, routing, prompts, stop_ids=(), key=jax.random.key(0), temperature=TEMPERATURE, top_p=TOP_P
        )
        return dict(
            mesh=mesh,
            rules=rules,
            graphdef=graphdef,
            params=params,
            routing=routing,
            prompts=prompts,
            sample=sample,
            batch_sharding=batch_sharding,
            greedy=greedy,
            sampled=sampled,
            greedy_logits=full_log_softmax(greedy),
            sampled_logits=full_log_softmax(sampled),
        )


def _predicting(logits, prompt, completion):
    """The rows of [length, vocab] that predict each completion token."""
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(completion.ids)]


def test_greedy_is_argmax_of_the_full_sequence(model):
    logits = model["greedy_logits"]
    for row, (prompt, completion) in enumerate(zip(model["prompts"], model["greedy"])):
        assert len(completion.ids) == MAX_NEW and not completion.stopped
        predicting = _predicting(logits[row], prompt, completion)
        np.testing.assert_array_equal(completion.ids, predicting.argmax(axis=-1))
        np.testing.assert_array_equal(completion.sampling_logprobs, 0.0)


def test_make_greedy_generate_is_the_sampler_at_temperature_zero(model):
    with activate(model["mesh"], model["rules"]):
        generate = make_greedy_generate(
            model["graphdef"],
            model["params"],
            model["routing"],
            max_new_tokens=MAX_NEW,
            batch_rows=ROWS,
            max_prompt_len=MAX_PROMPT,
            stop_id=-1,
            batch_sharding=model["batch_sharding"],
        )
        assert generate(model["prompts"]) == [c.ids.tolist() for c in model["greedy"]]


def test_logprobs_equal_those_of_the_full_sequence(model):
    """Model log-probs are log_softmax of the logits that predicted each token; sampling log-probs
    those of the tempered nucleus distribution built from the same logits."""
    for kind, temperature in (("greedy", 0.0), ("sampled", TEMPERATURE)):
        for row, (prompt, completion) in enumerate(zip(model["prompts"], model[kind])):
            predicting = _predicting(model[f"{kind}_logits"][row], prompt, completion)
            at = lambda table: np.take_along_axis(table, completion.ids[:, None], axis=-1)[:, 0]
            np.testing.assert_allclose(completion.model_logprobs, at(predicting), atol=ATOL)
            np.testing.assert_allclose(
                completion.sampling_logprobs, at(sampling_log_probs(predicting, temperature, TOP_P)), atol=ATOL
            )
    assert [c.ids.tolist() for c in model["sampled"]] != [c.ids.tolist() for c in model["greedy"]]


def test_stop_tokens_end_a_row(model):
    """Stop ids taken from the greedy output: each row ends right after the first one it emits and
    is otherwise the greedy row; rows that never emit one run to max_new_tokens."""
    greedy = [c.ids.tolist() for c in model["greedy"]]
    stop_ids = (greedy[0][2], greedy[1][0])
    with activate(model["mesh"], model["rules"]):
        stopped = model["sample"](
            model["params"], model["routing"], model["prompts"], stop_ids=stop_ids, temperature=0.0
        )
    for full, completion in zip(greedy, stopped):
        ends = [i for i, token in enumerate(full) if token in stop_ids]
        assert completion.ids.tolist() == full[: ends[0] + 1 if ends else MAX_NEW]
        assert completion.stopped == bool(ends)
        assert len(completion.sampling_logprobs) == len(completion.model_logprobs) == len(completion.ids)
    assert stopped[0].stopped and stopped[1].stopped and len(stopped[1].ids) == 1


def test_sampling_needs_a_key_and_valid_settings(model):
    sample = lambda **kw: model["sample"](model["params"], model["routing"], model["prompts"], stop_ids=(), **kw)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        sample(temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample(temperature=1.0, top_p=0.0, key=jax.random.key(0))
