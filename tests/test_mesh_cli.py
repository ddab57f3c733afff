"""`python -m mesh`: axis table, device grid, errors."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True, text=True, timeout=120)


def test_cm384_table():
    result = run("--topology=cm384", "--mesh=expert=64,fsdp=12,tensor=1")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert rows["expert"][1:5] == ["64", "chip:2", "server:8", "supernode:4"]
    assert rows["fsdp"][1:3] == ["12", "supernode:12"]
    assert "196 GB/s" in " ".join(rows["fsdp"])
    assert "device grid omitted: 768 devices" in result.stdout


def test_small_mesh_prints_grid_and_pins():
    result = run("--topology=cm384-8", "--mesh=expert=4,fsdp=2", "--pin=fsdp=chip")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rows: (data, fsdp, expert); columns: tensor" in result.stdout
    assert "(0,1,0): 1" in result.stdout and "(0,0,1): 2" in result.stdout


def test_unknown_topology_lists_presets():
    result = run("--topology=dgx")
    assert result.returncode != 0
    assert "unknown topology 'dgx'; valid: atlas800t-a2" in result.stderr
