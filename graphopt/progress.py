"""A dependency-free progress bar for long work (training, sampling, benchmarks).

On a terminal it redraws one line; in a log (not a TTY) it prints a line every tenth of the way,
so CI output stays short. It writes to stderr and can be switched off.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream: TextIO | None = None):
        self.total, self.desc, self.enabled = max(total, 1), desc, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1
        self.info = ""

    def update(self, n: int = 1, info: str = "") -> None:
        self.done += n
        self.info = info or self.info
        if not self.enabled:
            return
        now = time.perf_counter()
        decile = self.done * 10 // self.total
        if self.tty and (now - self._last_draw > 0.2 or self.done >= self.total):
            self._last_draw = now
            print("\r" + self._line(now), end="", file=self.stream, flush=True)
        elif not self.tty and decile != self._last_decile:
            self._last_decile = decile
            print(self._line(now), file=self.stream, flush=True)

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(24 * self.done / self.total)
        bar = "#" * filled + "-" * (24 - filled)
        return (f"{self.desc} [{bar}] {self.done}/{self.total} {rate:.1f}/s "
                f"elapsed {elapsed:.0f}s eta {eta:.0f}s" + (f" {self.info}" if self.info else ""))

    def close(self) -> float:
        """Finish the line; returns the elapsed seconds."""
        elapsed = time.perf_counter() - self.start
        if self.enabled and self.tty:
            print(file=self.stream, flush=True)
        return elapsed
