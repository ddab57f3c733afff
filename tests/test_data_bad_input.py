"""Bad input: each kind is a clear `DataError` naming file and line, raised when the pipeline is
built (not from inside grain), or, with skip_bad_records, a count of skipped records by reason."""

import json

import pytest

from configs.data import get_config
from data.errors import DataError
from data.pipeline import build_encoder, build_sft_pipeline, load_preferences, load_prompts

GOOD = {"messages": [{"role": "user", "content": "add 1 2"}, {"role": "assistant", "content": "3"}]}

# (reason code, bad line) pairs; every one is preceded by a good line, so the bad one is line 2.
BAD_LINES = {
    "malformed_json": '{"messages": [',
    "missing_role": json.dumps({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}),
    "unknown_role": json.dumps(
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    ),
    "empty_assistant": json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}
    ),
    "wrong_type": json.dumps({"prompt": "add 1 2", "completion": 3}),
    "token_out_of_vocab": json.dumps({"tokens": [0, 5, 9999], "loss_mask": [0, 1, 1]}),
    "missing_field": json.dumps({"text": "no known form"}),
    "bad_structure": json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),
    "reserved_token": json.dumps({"prompt": "add 1 2<｜Assistant｜></think>3", "completion": "3"}),
    "bad_encoding": b'{"prompt": "caf\xe9", "completion": "x"}',  # latin-1 bytes
}


def _write(path, lines):
    """Text lines as UTF-8; bytes lines as they are."""
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return str(path)


def _config(path, **overrides):
    return get_config(sft_sources=((path, 1.0),), prefetch=0, **overrides)


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_record_names_file_and_line(tmp_path, reason):
    path = _write(tmp_path / "bad.jsonl", [json.dumps(GOOD), BAD_LINES[reason], json.dumps(GOOD)])
    with pytest.raises(DataError, match=rf"^{path}:2: .*\[{reason}\]$"):
        build_sft_pipeline(_config(path))


def test_wrong_message_content_type_is_reported(tmp_path):
    record = {"messages": [{"role": "user", "content": ["a", "list"]}, {"role": "assistant", "content": "x"}]}
    path = _write(tmp_path / "bad.jsonl", [json.dumps(record)])
    with pytest.raises(DataError, match=r":1: messages\[0\]\.content must be a string"):
        build_sft_pipeline(_config(path))


def test_empty_file(tmp_path):
    path = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=rf"^{path}: the file holds no records \[empty_file\]$"):
        build_sft_pipeline(_config(path))


@pytest.mark.parametrize("name", ["absent.jsonl", "absent-*.jsonl"])
def test_missing_file_or_empty_pattern(tmp_path, name):
    with pytest.raises(DataError, match=r"\[missing_file\]$"):
        build_sft_pipeline(_config(str(tmp_path / name), skip_bad_records=True))


def test_skip_mode_counts_each_reason(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [json.dumps(GOOD)] + list(BAD_LINES.values()) + [json.dumps(GOOD)])
    empty = _write(tmp_path / "empty-part.jsonl", [])
    config = get_config(
        sft_sources=((path, 1.0), (empty.replace("empty-part", "*-part"), 1.0)), prefetch=0, skip_bad_records=True
    )
    with pytest.raises(DataError, match=r"no usable example"):  # the second source has none left
        build_sft_pipeline(config)
    pipeline = build_sft_pipeline(_config(path, skip_bad_records=True))
    metrics = pipeline.stats.as_metrics()
    assert {r: metrics[f"data/skipped/{r}"] for r in BAD_LINES} == {r: 1 for r in BAD_LINES}
    assert metrics["data/skipped_total"] == len(BAD_LINES)
    assert metrics["data/records_read"] == len(BAD_LINES) + 2 and metrics["data/records_kept"] == 2
    next(iter(pipeline))  # the surviving records still make batches


def test_tokenizer_larger_than_the_model_is_refused():
    with pytest.raises(ValueError, match=r"has 512 tokens but the model only 100 embedding rows"):
        build_encoder(get_config(vocab_size=100))


def test_preference_and_prompt_records_are_validated(tmp_path):
    encoder = build_encoder(get_config())
    prefs = _write(
        tmp_path / "pref.jsonl",
        [
            json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}),
            json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}),
        ],
    )
    with pytest.raises(DataError, match=r"pref.jsonl:2: .*\[empty_assistant\]"):
        load_preferences(prefs, encoder)
    prompts = _write(tmp_path / "prompts.jsonl", [json.dumps({"prompt": 7, "answer": "3"})])
    with pytest.raises(DataError, match=r"prompts.jsonl:1: .*\[wrong_type\]"):
        load_prompts(prompts, encoder)


def test_a_token_id_beyond_int32_is_named(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [json.dumps(GOOD), json.dumps({"tokens": [1, 2**31, 3]})])
    with pytest.raises(
        DataError,
        match=rf"^{path}:2: field 'tokens' holds 2147483648, outside the int32 range "
        r"\[token_out_of_vocab\]$",
    ):
        build_sft_pipeline(_config(path))


def test_a_directory_given_as_a_source_is_named_as_such(tmp_path):
    with pytest.raises(
        DataError,
        match=rf"^{tmp_path}: is a directory; name its JSONL files with a glob pattern, "
        rf"e.g. {tmp_path}/\*.jsonl \[missing_file\]$",
    ):
        build_sft_pipeline(_config(str(tmp_path)))


def test_a_prompt_longer_than_the_sampling_leaves_is_named_up_front(tmp_path):
    """GRPO/distillation sample max_new_tokens after each prompt within seq_len: a longer prompt is
    refused (file:line) when the prompts are loaded, not at the step that samples it."""
    from configs import tiny
    from data.errors import LoadStats
    from trainer.rollout_source import _load_prompts

    config = tiny.get_config()
    path = _write(
        tmp_path / "prompts.jsonl",
        [json.dumps({"prompt": "add 1 2"}), json.dumps({"prompt": " ".join(["word"] * 300)})],
    )
    config.data.prompt_sources = ((path, 1.0),)
    with pytest.raises(
        DataError,
        match=rf"^{path}:2: the prompt has \d+ tokens, more than the 244 that "
        r"config.data.seq_len=256 leaves beside max_new_tokens \[prompt_too_long\]$",
    ):
        _load_prompts(config, build_encoder(config.data), LoadStats(), 256 - 12)
