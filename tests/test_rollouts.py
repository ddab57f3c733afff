"""Rollouts files: the shipped sample (reproducible, valid), batches whose log-probs line up with the
loss's shifted targets, and bad input reported by file and line or skipped group by group."""

import filecmp
import json
import math

import numpy as np
import pytest

from configs.data import get_config, sample_path
from data.encode import encode_prompt
from data.errors import DataError, LoadStats
from data.chat_template import render_reply
from data.formats import Message, parse_prompt
from data.pipeline import build_encoder
from data.rollouts import load_rollouts, make_batch
from model.losses import shifted_targets
from scripts import make_sample_rollouts
from trainer import rewards

SEQ_LEN = 40
G = 4
LAYERS, K = 2, 3


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(get_config())


@pytest.fixture(scope="module")
def eos(encoder):
    return encoder.tokenizer.token_id(encoder.template.eos)


def _rollout(encoder, eos, prompt="add 1 2", reply="3", **fields):
    """A valid record: the reply's ids and EOS, one log-prob each, a reward; `fields` override."""
    ids = encoder.tokenizer.encode(reply) + [eos]
    record = {"prompt": prompt, "answer": reply, "completion_ids": ids, "logprobs": [-0.5] * len(ids), "reward": 1.0}
    record.update(fields)
    return {k: v for k, v in record.items() if v is not None}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _load(path, encoder, **kw):
    return load_rollouts(path, encoder, seq_len=SEQ_LEN, **kw)


def test_generator_reproduces_the_sample(tmp_path):
    make_sample_rollouts.main(["--out", str(tmp_path / "rollouts.jsonl")])
    assert filecmp.cmp(tmp_path / "rollouts.jsonl", sample_path("rollouts.jsonl"), shallow=False)


def test_sample_loads_into_equal_groups(encoder):
    stats = LoadStats()
    reward = rewards.get("sample_tasks")
    groups = _load(sample_path("rollouts.jsonl"), encoder, reward_fn=reward, stats=stats)
    assert [len(g) for g in groups] == [G] * 4 and stats.records_kept == stats.records_read == 16
    assert [g[0].group for g in groups] == ["upper itcxp", "sort 5 4 3 7", "add 67 80", "sample-3"]
    for group in groups:
        assert {r.reward for r in group} == {0.0, 1.0}  # the sample mixes right and wrong replies
        for r in group:
            assert len(r.sampling_logprobs) == len(r.completion_ids) and r.routed_experts is None
    # Rewards written in the file agree with the shipped checker.
    with open(sample_path("rollouts.jsonl")) as f:
        given = [json.loads(line).get("reward") for line in f]
    assert [r.reward for g in groups for r in g][:8] == given[:8] and given[8] is None


def test_batch_lines_up_with_shifted_targets(encoder):
    """The prediction at the reply cue (position P-1) scores the first completion token; shifting the
    sampling log-probs like the loss mask puts that token's log-prob at the same position."""
    groups = _load(sample_path("rollouts.jsonl"), encoder, reward_fn=rewards.get("sample_tasks"))
    batch = make_batch(groups[:2], seq_len=SEQ_LEN, pad_id=encoder.tokenizer.token_id(encoder.template.pad))
    assert batch["tokens"].shape == batch["sampling_logprobs"].shape == (2 * G, SEQ_LEN)
    assert batch["group_ids"].tolist() == [0] * G + [1] * G
    targets, weights = shifted_targets(batch["tokens"], batch["loss_mask"], 1, batch["segment_ids"])
    shifted = np.pad(batch["sampling_logprobs"][:, 1:], ((0, 0), (0, 1)))
    for row, rollout in enumerate(r for g in groups[:2] for r in g):
        p, c = len(rollout.prompt_ids), len(rollout.completion_ids)
        assert np.flatnonzero(np.asarray(weights[row])).tolist() == list(range(p - 1, p + c - 1))
        np.testing.assert_array_equal(np.asarray(targets[row, p - 1 : p + c - 1]), rollout.completion_ids)
        np.testing.assert_array_equal(shifted[row, p - 1 : p + c - 1], rollout.sampling_logprobs)
        assert batch["segment_ids"][row].tolist() == [1] * (p + c) + [0] * (SEQ_LEN - p - c)
        assert batch["positions"][row, : p + c].tolist() == list(range(p + c))
        assert batch["rewards"][row] == rollout.reward


def test_text_and_ids_completions_agree(tmp_path, encoder, eos):
    ids = _rollout(encoder, eos, reply="147")
    text = _rollout(encoder, eos, reply="147", completion="147" + encoder.template.eos, completion_ids=None)
    (group,) = _load(_write(tmp_path / "r.jsonl", [ids, text] * (G // 2)), encoder)
    assert all(r.completion_ids.tolist() == ids["completion_ids"] for r in group)


@pytest.fixture(scope="module")
def thinking_encoder():
    return build_encoder(get_config(template="deepseek_v4_thinking"))


def _thinking_rollout(encoder, completion):
    """A text completion of "upper ab" (answer "AB"), one log-prob per token, reward left to compute."""
    count = len(encoder.tokenizer.encode(completion))
    return {"prompt": "upper ab", "answer": "AB", "completion": completion, "logprobs": [-0.5] * count}


def test_thinking_completion_round_trips(tmp_path, thinking_encoder):
    """`{reasoning}</think>{answer}<EOS>` after the `<think>` cue: the ids SFT trains on for that reply,
    decoded back to the same text, rewarded on the answer."""
    encoder = thinking_encoder
    text = "A, B</think>AB" + encoder.template.eos
    prompt = parse_prompt({"prompt": "upper ab"}).prompt
    _, reply = render_reply(encoder.template, prompt, Message("assistant", "AB", "A, B"))
    ((sft_ids, _),) = encoder.pieces_to_ids([reply])
    (group,) = _load(
        _write(tmp_path / "r.jsonl", [_thinking_rollout(encoder, text)] * G), encoder, reward_fn=rewards.exact_match
    )
    rollout = group[0]
    assert rollout.completion_ids.tolist() == sft_ids
    assert encoder.tokenizer.token_id("</think>") in sft_ids
    assert encoder.tokenizer.decode(rollout.completion_ids) == text
    assert encoder.tokenizer.decode(rollout.prompt_ids).endswith("<｜User｜>upper ab<｜Assistant｜><think>")
    assert rollout.reward == 1.0


def test_thinking_completion_without_think_end(tmp_path, thinking_encoder):
    """Cut off before its end-of-reply marker, a completion may stop inside its reasoning (no answer:
    reward 0); an ended one without `</think>` is refused, as the release's parser refuses it."""
    encoder = thinking_encoder
    cut = _thinking_rollout(encoder, "A, B")
    (group,) = _load(_write(tmp_path / "cut.jsonl", [cut] * G), encoder, reward_fn=rewards.exact_match)
    assert encoder.tokenizer.decode(group[0].completion_ids) == "A, B" and group[0].reward == 0.0
    path = _write(tmp_path / "r.jsonl", [cut, _thinking_rollout(encoder, "AB" + encoder.template.eos), cut, cut])
    with pytest.raises(DataError, match=rf"^{path}:2: in thinking mode .* has no '</think>' \[missing_think_end\]$"):
        _load(path, encoder, reward_fn=rewards.exact_match)


BAD = {  # reason -> fields replaced in an otherwise valid record
    "missing_logprobs": dict(logprobs=None),
    "logprob_count": dict(logprobs=[-0.5]),
    "nonfinite_logprob": dict(logprobs=[-0.5, math.nan]),
    "token_out_of_vocab": dict(completion_ids=[5, 9999], logprobs=[-0.5, -0.5]),
    "nonfinite_reward": dict(reward=math.nan),
    "missing_reward": dict(reward=None),
    "too_long": dict(prompt="add " + "1 " * SEQ_LEN),
    "bad_routed_experts": dict(routed_experts=[[[0, 1]]]),
    "missing_field": dict(completion_ids=None),
    "wrong_type": dict(reward="high"),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_rollout_names_file_and_line(tmp_path, encoder, eos, reason):
    good = _rollout(encoder, eos)
    path = _write(tmp_path / "bad.jsonl", [good, _rollout(encoder, eos, **BAD[reason]), good, good])
    with pytest.raises(DataError, match=rf"^{path}:2: .*\[{reason}\]$"):
        _load(path, encoder)


def test_reward_function_errors_name_the_line(tmp_path, encoder, eos):
    good = _rollout(encoder, eos, reward=None)
    path = _write(tmp_path / "bad.jsonl", [good, _rollout(encoder, eos, reward=None, answer=None), good, good])
    with pytest.raises(DataError, match=rf"^{path}:2: the reward function failed: .*no 'answer'.*\[reward_error\]$"):
        _load(path, encoder, reward_fn=rewards.exact_match)


def test_nan_reward_skips_its_group(tmp_path, encoder, eos):
    records = [_rollout(encoder, eos, prompt="add 1 2") for _ in range(G)]
    records += [_rollout(encoder, eos, prompt="add 2 2", reply="4", reward=r) for r in (1.0, math.inf, 0.0, 1.0)]
    stats = LoadStats()
    groups = _load(_write(tmp_path / "r.jsonl", records), encoder, skip_bad=True, stats=stats)
    assert [g[0].group for g in groups] == ["add 1 2"]
    assert stats.skipped == {"nonfinite_reward": 1, "incomplete_group": G - 1} and stats.records_kept == G


def test_unequal_groups_name_groups_and_sizes(tmp_path, encoder, eos):
    records = [_rollout(encoder, eos, group="a") for _ in range(G)] + [
        _rollout(encoder, eos, group="b") for _ in range(G)
    ]
    records += [_rollout(encoder, eos, group="c") for _ in range(G - 1)] + [_rollout(encoder, eos, group=7)]
    path = _write(tmp_path / "r.jsonl", records)
    with pytest.raises(
        DataError,
        match=rf"all have {G} completions .*'c' has {G - 1} \(first at {path}:9\), "
        rf"'7' has 1 .*\[unequal_group\]",
    ):
        _load(path, encoder)
    with pytest.raises(DataError, match=r"all have 3 completions \(group_size\): 'a' has 4"):
        _load(path, encoder, group_size=3)
    stats = LoadStats()
    assert [g[0].group for g in _load(path, encoder, skip_bad=True, stats=stats)] == ["a", "b"]
    assert stats.skipped == {"unequal_group": G}


def test_text_completion_missing_its_end_marker_gets_a_hint(tmp_path, encoder, eos):
    record = _rollout(encoder, eos, completion="3", completion_ids=None)  # 2 log-probs: "3" and EOS
    path = _write(tmp_path / "r.jsonl", [record] * G)
    with pytest.raises(DataError, match="must end with .*end▁of▁sentence.* or be given as ids"):
        _load(path, encoder)


def test_routed_experts_in_the_batch(tmp_path, encoder, eos):
    """[layer][token][k] per record -> the model's [B, S, layers, k]; padding holds experts 0..k-1."""
    rng = np.random.default_rng(0)
    prompt = encode_prompt(parse_prompt({"prompt": "add 1 2"}), encoder)["prompt"]
    tokens = len(prompt) + len(_rollout(encoder, eos)["completion_ids"])
    experts = [rng.integers(0, 8, (LAYERS, tokens, K)) for _ in range(G)]
    path = _write(tmp_path / "r.jsonl", [_rollout(encoder, eos, routed_experts=e.tolist()) for e in experts])
    (group,) = _load(path, encoder, num_experts=8)
    batch = make_batch([group], seq_len=SEQ_LEN, pad_id=0)
    assert batch["routed_experts"].shape == (G, SEQ_LEN, LAYERS, K)
    for row, e in enumerate(experts):
        np.testing.assert_array_equal(batch["routed_experts"][row, :tokens], np.moveaxis(e, 0, 1))
        assert (batch["routed_experts"][row, tokens:] == np.arange(K)).all()
    with pytest.raises(DataError, match=r":1: .*outside \[0, 4\)"):
        _load(path, encoder, num_experts=4)
    mixed = _write(
        tmp_path / "m.jsonl",
        [_rollout(encoder, eos, routed_experts=experts[0].tolist())] + [_rollout(encoder, eos)] * (G - 1),
    )
    with pytest.raises(DataError, match=r":2: 'routed_experts' \[layers, k\] absent .*\[bad_routed_experts\]"):
        _load(mixed, encoder)
