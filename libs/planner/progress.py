"""A progress bar for long simulations, drawn on stderr (one line per 25% when not a terminal)."""

from __future__ import annotations

import sys
from typing import TextIO


class ProgressBar:
    """Callable with the simulated time reached; draws ``label [#####     ] 50%``."""

    def __init__(self, label: str, total_s: float, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.total_s = max(total_s, 1e-9)
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._shown = -1

    def __call__(self, now_s: float) -> None:
        """Report progress up to simulated time ``now_s``."""
        percent = min(100, int(100 * now_s / self.total_s))
        step = 1 if self.tty else 25
        if percent // step == self._shown // step:
            return
        self._shown = percent
        filled = self.width * percent // 100
        line = f"{self.label} [{'#' * filled}{' ' * (self.width - filled)}] {percent:3d}%"
        self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        """Finish the bar (100%, newline on a terminal)."""
        self(self.total_s)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
