"""A minimal progress bar for the command-line tools (no dependency).

On a terminal it redraws one line; otherwise (logs, CI) it prints a line every 10%.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, stream=None):
        self.total = max(int(total), 0)
        self.desc = desc
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last_decile = -1

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.tty:
            self._draw("\r", "")
        else:
            decile = (10 * self.done) // self.total if self.total else 10
            if decile != self._last_decile:
                self._last_decile = decile
                self._draw("", "\n")

    def close(self) -> None:
        if self.tty:
            self._draw("\r", "\n")

    def _draw(self, prefix: str, suffix: str) -> None:
        width = 30
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        self.stream.write(f"{prefix}{self.desc} [{bar}] {self.done}/{self.total} ({rate:.1f}/s){suffix}")
        self.stream.flush()
