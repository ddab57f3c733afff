"""File patterns -> validated records, each tagged with the file and line it came from.

Reading and validating happen here, before any grain transformation, so every problem is reported
against its source line (strict mode) or counted by reason (skip mode). Missing files and patterns
that match nothing are configuration errors and always raise: skipping them would silently change
the mixture.
"""

import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterator

from data.errors import DataError, InvalidRecord, LoadStats


@dataclasses.dataclass(frozen=True)
class Located:
    """A parsed record and where it came from (1-based line), for later error messages."""

    record: Any
    path: str
    line: int


def expand(pattern: str) -> list[str]:
    """The sorted files a glob pattern names (sorted so that order, hence shuffling, is stable)."""
    paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not paths:
        raise DataError(pattern, "the pattern matches no file", reason="missing_file")
    for path in paths:
        if os.path.isdir(path):
            raise DataError(
                path,
                f"is a directory; name its JSONL files with a glob pattern, e.g. {os.path.join(path, '*.jsonl')}",
                reason="missing_file",
            )
        if not os.path.isfile(path):
            raise DataError(path, "no such file", reason="missing_file")
    return paths


def read_records(pattern: str, parse: Callable[[Any], Any], *, skip_bad: bool, stats: LoadStats) -> Iterator[Located]:
    """Yields the valid records of every file the pattern names, in file then line order."""
    for path in expand(pattern):
        yield from _read_file(path, parse, skip_bad=skip_bad, stats=stats)


def _read_file(path: str, parse, *, skip_bad: bool, stats: LoadStats) -> Iterator[Located]:
    seen_any = False
    with open(path, "rb") as f:  # decoded line by line, so a bad byte is reported with its line
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            seen_any = True
            stats.records_read += 1
            try:
                record = parse(_decode(line))
            except InvalidRecord as e:
                if not skip_bad:
                    raise DataError(path, e.detail, line=line_no, reason=e.reason) from None
                stats.skip(e.reason)
                continue
            yield Located(record, path, line_no)
    if not seen_any:
        if not skip_bad:
            raise DataError(path, "the file holds no records", reason="empty_file")
        stats.skip("empty_file")


def _decode(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRecord("bad_encoding", f"not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRecord("malformed_json", f"not valid JSON ({e.msg} at column {e.colno})") from None
