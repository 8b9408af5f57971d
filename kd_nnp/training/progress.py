"""Progress lines in the log for the long preparation steps of ``train`` (graph and feature
caches, the pretrained energies of the reference fit): ``i/n``, rate and ETA, every 10 % or
every 30 s, whichever comes first, and once at the end. Logged (not a tqdm bar), so it lands
in the run's log file and in SLURM output.
"""

from __future__ import annotations

import logging
import time


class ProgressLog:
    """``step()`` once per item; logs ``<what>: i/n (p %), r/s, elapsed, ETA`` at every
    ``1/marks`` of ``total``, after ``every_s`` seconds without a line, and at the end."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        total: int,
        *,
        marks: int = 10,
        every_s: float = 30.0,
    ) -> None:
        self.log, self.what, self.total = logger, what, int(total)
        self.marks, self.every_s = int(marks), every_s
        self.done = 0
        self.t0 = self.t_last = time.monotonic()
        self.next_mark = 1  # log when done >= next_mark / marks of total (integer test)

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        frac = self.done / self.total if self.total else 1.0
        if (
            self.done >= self.total
            or self.done * self.marks >= self.next_mark * self.total
            or now - self.t_last >= self.every_s
        ):
            self._emit(now, frac)
            self.t_last = now
            while self.next_mark * self.total <= self.done * self.marks:
                self.next_mark += 1

    def _emit(self, now: float, frac: float) -> None:
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.log.info(
            "%s: %d/%d (%.0f %%), %.3g/s, elapsed %.0f s, ETA %.0f s",
            self.what, self.done, self.total, 100 * frac, rate, elapsed, eta,
        )  # fmt: skip
