"""Every command-line tool answers bad input with one line on stderr naming the flag or field and its
numbers, exit status 2 and no traceback (trainer/cli.py), before any compile; `--traceback` shows the
traceback instead; library logs stay at warnings unless --verbosity is given. One bad input per tool here; tests/test_run_bad_input.py covers train.py's and
score_preferences.py's data and config checks in detail, tests/test_mesh_cli.py the mesh tool's output."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "command,says",
    [
        (
            ("train.py", "--config=configs/tiny.py", "--workdir={tmp}/run", "--config.mesh.axes.expert=7"),
            "error: cannot size axis 'fsdp': the other axes multiply to 7, which does not divide 8 devices",
        ),
        (
            ("plan.py", "--config=configs/tiny.py", "--config.mesh.topology=cm384:0"),
            "error: topology 'cm384:0': number of supernodes",
        ),
        (
            (
                "convert.py",
                "--direction=import",
                "--config=configs/tiny.py",
                "--input={tmp}",
                "--output={tmp}/out",
                "--dry_run",
            ),
            "error: {tmp}: neither model.safetensors.index.json nor model.safetensors found",
        ),
        (
            ("score_preferences.py", "--config=configs/tiny.py"),
            "error: flag --output=None: Flag --output must have a value other than None.",
        ),
        (
            ("plan.py", "--config=configs/tiny.py", "--no_such_flag=1"),
            "error: Unknown command line flag 'no_such_flag'",
        ),
        (
            ("plan.py", "--config=configs/tiny.py", "--search", "--search_margin=0.8"),
            "error: --search_margin=0.8: must be at least 1 (compiled / analytic bytes)",
        ),
        (
            ("-m", "mesh", "--topology=cm384", "--mesh=expert=7"),
            "error: --mesh=expert=7: cannot size axis 'fsdp': the other axes multiply to 7, which does not divide 768 "
            "devices",
        ),
        (
            ("-m", "mesh", "--topology=cm384", "--mesh=expert=x"),
            "error: --mesh=expert=x: entry 'expert=x' is not axis=<integer size> (-1 = the rest)",
        ),
        (
            ("-m", "model.summary", "--config=configs/tiny.py", "--config.model.capacity_factor=-1"),
            "error: config.model.capacity_factor: -1.0 must be >= 0 (0 = dropless)",
        ),
    ],
    ids=[
        "train",
        "plan",
        "convert",
        "score_preferences",
        "plan-unknown-flag",
        "plan-search-margin",
        "mesh",
        "mesh-size-not-integer",
        "model.summary",
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, command, says):
    result = _run(*(part.format(tmp=tmp_path) for part in command))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(says.format(tmp=tmp_path)), lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_traceback_flag_shows_the_traceback():
    result = _run("-m", "model.summary", "--config=configs/tiny.py", "--config.model.capacity_factor=-1", "--traceback")
    assert result.returncode not in (0, 2), result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().endswith(
        "configs.release.ConfigError: config.model.capacity_factor: -1.0 must be >= 0 (0 = dropless)"
    )


def test_library_logs_stay_at_warnings_unless_verbosity_is_given():
    program = (
        "from absl import app, logging\nfrom trainer.cli import parse_flags\n"
        "app.run(lambda argv: print(logging.get_verbosity()), flags_parser=parse_flags)"
    )
    assert _run("-c", program).stdout.split() == ["-1"]
    assert _run("-c", program, "--verbosity=0").stdout.split() == ["0"]
