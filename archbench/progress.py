"""Progress for steps that take longer than a few seconds, readable in a terminal and in a log.

Tokenizer training, tokenization, evaluation and report building used to run for minutes with no
output, which reads as a hang. `Progress` prints one line per unit of work with the count, the
time so far and an estimate of the time left. It never redraws a bar, so a log written through a
pipe (Slurm, `| tee`, Hydra's job log) holds one readable line per unit, never a wall of
carriage returns; lines closer together than `min_interval` seconds are merged, so thousands of
fast units do not flood the log either.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """`Progress(total, "eval runs/X")`; `.advance(what)` after each unit; `.done()` at the end."""

    def __init__(self, total: int | None, label: str, stream: TextIO | None = None,
                 min_interval: float = 2.0, enabled: bool = True) -> None:
        self.total, self.label = total, label
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval, self.enabled = min_interval, enabled
        self.count = 0
        self.started = time.monotonic()
        self._last_said = float("-inf")

    def line(self, what: str = "") -> str:
        elapsed = time.monotonic() - self.started
        count = f"{self.count}/{self.total}" if self.total else str(self.count)
        text = f"{self.label}: {count}"
        if what:
            text += f" {what}"
        text += f" ({_clock(elapsed)} elapsed"
        if self.total and 0 < self.count < self.total:
            text += f", about {_clock(elapsed / self.count * (self.total - self.count))} left"
        return text + ")"

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def start(self, what: str) -> None:
        """Announce a unit that may take long by itself (a model's whole evaluation)."""
        self.say(f"{self.label}: {what} ...")

    def advance(self, what: str = "", units: int = 1) -> None:
        self.count += units
        now = time.monotonic()
        if now - self._last_said >= self.min_interval or self.count == self.total:
            self._last_said = now
            self.say(self.line(what))

    def done(self, what: str = "done") -> None:
        if self.count != self.total or time.monotonic() - self._last_said >= self.min_interval:
            self.say(self.line(what))
