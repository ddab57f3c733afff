"""The shipped sample data and tokenizer: reproducible from the scripts, valid, sized for the tiny
model, and measurable with the exact-match helper."""

import filecmp
import json
import os

import numpy as np
import pytest

from bench import data as bench_data
from configs.data import SAMPLE_DIR, get_config, sample_path
from data import tasks
from data.chat_template import DEEPSEEK_V4, render
from data.evaluation import exact_match_accuracy, split_last_reply
from data.pipeline import build_encoder, build_sft_pipeline, load_conversations, load_preferences, load_prompts
from scripts import make_sample_data, train_tokenizer

SAMPLE_FILES = ("sft_train.jsonl", "sft_heldout.jsonl", "preference.jsonl", "prompts.jsonl")


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(get_config())


def test_generator_reproduces_committed_files(tmp_path):
    make_sample_data.main(["--out", str(tmp_path)])
    for name in SAMPLE_FILES:
        assert filecmp.cmp(tmp_path / name, sample_path(name), shallow=False), name


def test_tokenizer_retrains_identically_with_512_tokens(tmp_path, encoder):
    out = tmp_path / "tokenizer.json"
    train_tokenizer.main(["--data", sample_path("sft_train.jsonl"), "--out", str(out)])
    assert filecmp.cmp(out, get_config().tokenizer_path, shallow=False)
    assert encoder.tokenizer.vocab_size == get_config().vocab_size == 512
    # Release order for the first three: BOS 0, EOS 1, pad 2; every marker is one token.
    assert [encoder.tokenizer.token_id(t) for t in DEEPSEEK_V4.special_tokens] == list(range(7))


def test_heldout_prompts_are_unseen_and_everything_fits(encoder):
    train = load_conversations(sample_path("sft_train.jsonl"))
    heldout = load_conversations(sample_path("sft_heldout.jsonl"))
    seen = {m.content for c in train for m in c.messages if m.role == "user"}
    assert len(train) >= 1000 and len(heldout) >= 100
    assert not seen & {split_last_reply(c)[0][-1].content for c in heldout}
    lengths = [len(ids) for ids, _ in encoder.pieces_to_ids([render(encoder.template, c.messages) for c in train])]
    assert max(lengths) <= get_config().seq_len // 4  # several examples share a row


def test_preference_and_prompt_sets(encoder):
    prefs = load_preferences(sample_path("preference.jsonl"), encoder)
    prompts = load_prompts(sample_path("prompts.jsonl"), encoder)
    assert len(prefs) >= 100 and len(prompts) >= 100
    assert all(not np.array_equal(p["chosen"], p["rejected"]) for p in prefs)
    for p in prompts:  # the answer field is the checkable reward target
        name = p["extra"]["task"]
        assert name in tasks.TASKS and p["answer"]


def test_exact_match_accuracy(encoder):
    heldout = load_conversations(sample_path("sft_heldout.jsonl"))[:20]
    prompts = encoder.pieces_to_ids(
        [render(encoder.template, c.messages[:-1], generation_prompt=True) for c in heldout]
    )
    answers = {tuple(ids): c.messages[-1].content for c, (ids, _) in zip(heldout, prompts)}
    eos = encoder.tokenizer.token_id(encoder.template.eos)

    def oracle(prompts):  # right answer, EOS, then junk that must be ignored
        return [encoder.tokenizer.encode(" " + answers[tuple(p.tolist())]) + [eos, 5, 6] for p in prompts]

    def half_wrong(prompts):
        return [
            encoder.tokenizer.encode(answers[tuple(p.tolist())] + ("" if i % 2 else "x")) for i, p in enumerate(prompts)
        ]

    assert exact_match_accuracy(heldout, oracle, encoder) == {"accuracy": 1.0, "correct": 20, "total": 20}
    assert exact_match_accuracy(heldout, half_wrong, encoder)["accuracy"] == 0.5


def test_sample_dir_holds_only_generated_files():
    # rollouts.jsonl comes from scripts/make_sample_rollouts.py (reproduced in test_rollouts.py)
    assert sorted(os.listdir(SAMPLE_DIR)) == sorted(SAMPLE_FILES + ("tokenizer.json", "rollouts.jsonl"))
    with open(sample_path("prompts.jsonl")) as f:
        assert set(json.loads(f.readline())) == {"prompt", "answer", "task"}


def test_default_config_reads_every_sample_record(capsys):
    pipeline = build_sft_pipeline(get_config())
    assert pipeline.stats.as_metrics() == {
        "data/records_read": 4000,
        "data/records_kept": 4000,
        "data/truncated": 0,
        "data/dropped_too_long": 0,
        "data/skipped_total": 0,
    }
    bench_data.main(["--batches", "3", "--warmup", "1"])
    report = json.loads(capsys.readouterr().out)
    assert report["tokens_per_sec"] > 0 and 0 < report["packing_efficiency"] <= 1
