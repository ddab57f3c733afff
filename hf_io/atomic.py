"""All-or-nothing output directories: everything is written into a sibling temporary directory that
is renamed to the final name only once complete, so an interrupted or failed conversion (a full
disk, a crash) never leaves something at the final path that a later restore could take for done."""
import contextlib
import os
import shutil
import tempfile

INCOMPLETE_MARK = ".incomplete-"


@contextlib.contextmanager
def atomic_directory(final: str):
    """Yields a fresh temporary directory next to `final`; renames it to `final` when the block
    finishes, removes it when the block raises. `final` must not exist yet.

    Data is flushed to disk before the rename (one `os.sync`, cheaper than an fsync per file of
    tens of thousands of chunk files), so a power cut cannot leave a published but empty directory."""
    final = os.path.abspath(final)
    if os.path.exists(final):
        raise FileExistsError(f"{final} already exists; the conversion writes a new directory")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=os.path.basename(final) + INCOMPLETE_MARK, dir=parent)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    os.sync()
    os.rename(temporary, final)
