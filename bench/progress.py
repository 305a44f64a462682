"""A one-line progress bar on stderr for the long phases (silent when not a terminal)."""

import sys
import time


class Progress:
    def __init__(self, label: str, total: float, unit: str = "") -> None:
        self.label = label
        self.total = max(total, 1)
        self.unit = unit
        self.shown_at = 0.0
        self.live = sys.stderr.isatty()

    def show(self, done: float) -> None:
        now = time.monotonic()
        if not self.live or now - self.shown_at < 0.1:
            return
        self.shown_at = now
        filled = int(30 * min(done / self.total, 1))
        bar = "#" * filled + "." * (30 - filled)
        sys.stderr.write(f"\r  {self.label:<28} [{bar}] {done:,.0f}/{self.total:,.0f}{self.unit} ")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.live:
            sys.stderr.write("\r" + " " * 90 + "\r")
            sys.stderr.flush()
