"""Errors that point at the offending input, and the tally of records skipped instead.

A bad record must never surface as a traceback from deep inside grain: validation happens while
files are read, and every failure is either a `DataError` naming file and line, or (when the config
skips bad records) one more count under a short reason code that ends up in the metrics.
"""

import collections
import dataclasses


class InvalidRecord(ValueError):
    """A record broke a rule; `reason` is a short stable code used as the metrics key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class DataError(ValueError):
    """A user-facing input error: the message starts with `path:line:` when a line is known."""

    def __init__(self, path: str, detail: str, *, line: int | None = None, reason: str = "error"):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {detail} [{reason}]")
        self.path = str(path)
        self.line = line
        self.reason = reason


@dataclasses.dataclass
class LoadStats:
    """What happened to the records of one load: read, kept, skipped by reason, length policy."""

    records_read: int = 0
    records_kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    truncated: int = 0
    dropped_too_long: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def as_metrics(self, prefix: str = "data") -> dict[str, int]:
        """Flat scalars for the metrics writers (console, TensorBoard, JSONL)."""
        metrics = {
            f"{prefix}/records_read": self.records_read,
            f"{prefix}/records_kept": self.records_kept,
            f"{prefix}/truncated": self.truncated,
            f"{prefix}/dropped_too_long": self.dropped_too_long,
            f"{prefix}/skipped_total": sum(self.skipped.values()),
        }
        metrics.update({f"{prefix}/skipped/{reason}": n for reason, n in sorted(self.skipped.items())})
        return metrics
