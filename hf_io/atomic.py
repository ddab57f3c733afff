"""All-or-nothing output directories: everything is written into a sibling temporary directory that
is renamed to the final name only once complete, so an interrupted or failed conversion (a full
disk, a crash) never leaves something at the final path that a later restore could take for done."""

import contextlib
import os
import shutil
import tempfile

from configs.release import ConfigError
from hf_io.team import SOLO, Team

INCOMPLETE_MARK = ".incomplete-"


@contextlib.contextmanager
def atomic_directory(final: str, team: Team = SOLO):
    """Yields a fresh temporary directory next to `final`; renames it to `final` when the block
    finishes, removes it when the block raises. `final` must not exist yet.

    Data is flushed to disk before the rename (one `os.sync`, cheaper than an fsync per file of
    tens of thousands of chunk files), so a power cut cannot leave a published but empty directory.
    In a team, process 0 makes the directory and the others write into it too; each flushes its own
    writes, and process 0 renames once all have finished the block. A process that fails takes the
    run down (trainer/distributed.py), leaving at most the temporary, marked incomplete by its name."""
    final = os.path.abspath(final)
    if os.path.exists(final):
        raise ConfigError(f"{final} already exists; the conversion writes a new directory")
    parent = os.path.dirname(final)
    temporary = None
    if team.is_lead:
        os.makedirs(parent, exist_ok=True)
        temporary = tempfile.mkdtemp(prefix=os.path.basename(final) + INCOMPLETE_MARK, dir=parent)
    temporary = team.lead_value(temporary)
    try:
        yield temporary
    except BaseException:
        if team.is_lead:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    os.sync()
    team.barrier(f"{final} written")
    if team.is_lead:
        os.rename(temporary, final)
    team.barrier(f"{final} published")
