"""A check on a topology's own number of emulated devices, which this pytest process (fixed at 8 by
conftest) cannot have: `run("cm384-12", "tests.test_train_step:some_check")` starts a fresh Python
that emulates the topology's devices (mesh/emulate.py), then imports the module and calls the
function, which raises on failure; a failure here shows the end of its output."""

import importlib
import subprocess
import sys
from pathlib import Path


def run(topology: str, target: str, timeout_s: int = 600):
    """Runs `target` ("module:function") in a process with `topology`'s devices; fails the calling
    test if it raises."""
    result = subprocess.run(
        [sys.executable, "-m", __name__, topology, target],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def main(topology: str, target: str):
    from mesh.emulate import emulate
    from mesh.presets import get_topology

    emulate(get_topology(topology))
    module, _, function = target.partition(":")
    getattr(importlib.import_module(module), function)()


if __name__ == "__main__":
    main(*sys.argv[1:])
