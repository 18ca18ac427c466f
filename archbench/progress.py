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
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """`Progress(total, "eval runs/X")`; `.advance(what)` after each unit; `.done()` at the end."""

    def __init__(self, total: float | None, label: str, stream: TextIO | None = None,
                 min_interval: float = 2.0, enabled: bool = True, unit: str = "",
                 scale: float = 1.0) -> None:
        self.total, self.label = total, label
        self.unit, self.scale = unit, scale
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval, self.enabled = min_interval, enabled
        self.count = 0
        self.started = time.monotonic()
        self._last_said = float("-inf")

    def line(self, what: str = "") -> str:
        elapsed = time.monotonic() - self.started
        count = self._amount(self.count) + (f"/{self._amount(self.total)}" if self.total else "")
        count += f" {self.unit}" if self.unit else ""
        text = f"{self.label}: {count}"
        if what:
            text += f" {what}"
        text += f" ({_clock(elapsed)} elapsed"
        if self.total and 0 < self.count < self.total:
            text += f", about {_clock(elapsed / self.count * (self.total - self.count))} left"
        return text + ")"

    def _amount(self, value: float) -> str:
        return f"{value / self.scale:.1f}" if self.scale != 1.0 else f"{value:g}"

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def start(self, what: str) -> None:
        """Announce a unit that may take long by itself (a model's whole evaluation)."""
        self.say(f"{self.label}: {what} ...")

    def advance(self, what: str = "", units: float = 1) -> None:
        self.count += units
        now = time.monotonic()
        if now - self._last_said >= self.min_interval or self.count == self.total:
            self._last_said = now
            self.say(self.line(what))

    def done(self, what: str = "done") -> None:
        if self.count != self.total or time.monotonic() - self._last_said >= self.min_interval:
            self.say(self.line(what))


class LineBar:
    """The part of tqdm's interface the trainer uses, printing a `Progress` line every
    `min_interval` seconds instead of redrawing a bar: for output that is not a terminal."""

    def __init__(self, total: int, initial: int, desc: str, min_interval: float = 30.0) -> None:
        self.progress = Progress(total, desc, min_interval=min_interval, unit="steps")
        self.progress.count = initial
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.progress.advance(self.postfix, units=n)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def write(self, text: str) -> None:
        self.progress.say(text)

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on a terminal; lines every 30 s when stderr goes to a file or a pipe."""
    from tqdm import tqdm

    if enabled and not sys.stderr.isatty():
        return LineBar(total, initial, desc)
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)
