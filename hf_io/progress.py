"""A progress line for long conversions: bytes done of the total, rate and time left, logged at most
every few seconds (and once at the end) so a multi-hour run is followable without flooding logs."""

import time

from absl import logging

GIB = 1 << 30


class Progress:
    def __init__(self, what: str, total_bytes: int, every_s: float = 5.0, clock=time.monotonic):
        self.what, self.total, self.every_s, self.clock = what, max(total_bytes, 1), every_s, clock
        self.done = 0
        self.started = self.last = clock()

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (
            f"{self.what}: {self.done / GIB:.2f}/{self.total / GIB:.2f} GiB "
            f"({100 * self.done / self.total:.0f}%), {rate / 1e6:.0f} MB/s, ETA {left:.0f} s"
        )

    def advance(self, nbytes: int):
        self.done += nbytes
        now = self.clock()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            logging.info("%s", self.line())
