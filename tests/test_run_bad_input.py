"""Bad input to train.py: one line on stderr naming the problem and its numbers, exit status 2, no
traceback, and no workdir created. A full-size config on this host, a tokenizer larger than the
model's vocabulary, a tokenizer the chat template cannot be encoded with, a data file of another
record kind than the objective reads."""

import os
import shutil
import subprocess
import sys

import pytest
import tokenizers

from configs.data import sample_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(tmp_path, *flags, tool: str = "train.py") -> tuple[str, str]:
    """Runs `tool` (train.py, or score_preferences.py) expecting bad input; -> its one stderr line
    (what is not absl/JAX logging), and all of stderr."""
    workdir = tmp_path / "run"
    out = ["--output", str(workdir)] if tool == "score_preferences.py" else [f"--workdir={workdir}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, tool, *out, *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert not workdir.exists()
    return lines[0], result.stderr


@pytest.mark.parametrize("tool", ["train.py", "score_preferences.py"])
def test_a_full_size_config_on_this_host_points_at_dry_run(tmp_path, tool):
    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(sample_path("tokenizer.json"), release / "tokenizer.json")
    line, _ = _train(tmp_path, "--config=configs/v4_pro.py", f"--config.release_dir={release}", tool=tool)
    assert "topology cm384 needs 768 devices and this host has none of them" in line
    assert "GiB" in line and line.endswith("or check the command here with --dry_run")


def test_a_tokenizer_larger_than_the_model_is_named(tmp_path):
    line, _ = _train(tmp_path, "--config=configs/tiny.py", "--config.model.vocab_size=256")
    assert line == (
        f"error: {sample_path('tokenizer.json')}: the tokenizer has 512 tokens but the model only 256 "
        "embedding rows (config.model.vocab_size) [vocab_too_large]"
    )


def test_a_tokenizer_without_the_template_markers_is_named(tmp_path):
    path = str(tmp_path / "plain.json")
    tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(path)
    line, _ = _train(tmp_path, "--config=configs/tiny.py", f"--config.data.tokenizer_path={path}")
    assert line.startswith(
        f"error: {path}: token '<｜begin▁of▁sentence｜>' is not in the vocabulary; the chat "
        "template and the tokenizer do not match"
    )


@pytest.mark.parametrize(
    "objective,source_field,wrong_file,says",
    [
        ("dpo", "preference_sources", "sft_train.jsonl", "this is an SFT record"),
        ("sft", "sft_sources", "preference.jsonl", "this is a preference pair"),
    ],
)
def test_a_data_file_of_another_record_kind_is_named(tmp_path, objective, source_field, wrong_file, says):
    line, _ = _train(
        tmp_path,
        "--config=configs/tiny.py",
        f"--config.objective={objective}",
        f"--config.data.{source_field}=(('{sample_path(wrong_file)}', 1.0),)",
        "--config.eval.num_examples=0",
    )
    assert line.startswith(f"error: {sample_path(wrong_file)}:1: {says} (")
    assert ", where this source needs " in line
    assert line.endswith("[wrong_record_kind]")


@pytest.mark.parametrize(
    "override,line",
    [
        ("--config.checkpoint.keep=0", "error: config.checkpoint.keep must be a positive integer, got 0"),
        ("--config.data.num_packing_bins=0", "error: config.data.num_packing_bins must be an integer >= 1, got 0"),
    ],
)
def test_an_override_out_of_range_is_named_before_anything_starts(tmp_path, override, line):
    assert _train(tmp_path, "--config=configs/tiny.py", override)[0] == line
