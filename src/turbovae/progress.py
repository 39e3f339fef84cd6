"""Progress of long work, the same way everywhere: a bar with an ETA when stderr is a terminal, and a
plain line every ~10 s when it is not (a log file, a CI job, a pipe), so that a long step never runs
without a word.

    with Progress(total=len(x), desc="IWAE k=1000", unit="example") as bar:
        for batch in ...:
            bar.update(len(batch))

The interval between plain lines is ``TURBOVAE_PROGRESS_INTERVAL`` seconds (default 10). A task
that ends before its first line prints nothing; one that printed lines ends with a ``done`` line.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

INTERVAL_ENV = "TURBOVAE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0  # seconds between plain lines when stderr is not a terminal


def line_interval() -> float:
    """Seconds between plain progress lines: ``TURBOVAE_PROGRESS_INTERVAL``, else 10."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def is_terminal(file: TextIO | None = None) -> bool:
    file = file or sys.stderr
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def clock_text(seconds: float) -> str:
    """``42 s``, ``3:05`` (minutes), ``1:02:03`` (hours)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _count(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() or value >= 100 else f"{value:,.1f}"


def note(text: str, file: TextIO | None = None) -> None:
    """One line on stderr (``turbovae: ...``), printed above a bar if one is showing."""
    tqdm.write(f"turbovae: {text}", file=file or sys.stderr)


class Progress:
    """A progress display over ``total`` units of work (None: unknown).

    Args:
        total: The work to do, in ``unit`` (steps, examples, seconds).
        desc: What is being done, at the start of the bar or line.
        enabled: False shows nothing; True (default) a bar on a terminal, plain lines otherwise.
        terminal: Force the bar (True) or the plain lines (False); default: whether ``file`` is a tty.
        initial: Work already done (a resumed run).
        interval: Seconds between plain lines (default ``line_interval()``).
        clock: The time source (tests pass a fake one).
    """

    def __init__(
        self,
        total: float | None,
        desc: str,
        unit: str = "it",
        *,
        enabled: bool = True,
        terminal: bool | None = None,
        initial: float = 0,
        file: TextIO | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.file = file or sys.stderr
        self.terminal = is_terminal(self.file) if terminal is None else terminal
        self.interval = line_interval() if interval is None else interval
        self.clock = clock
        self.n = self.initial = initial
        self.start = self.last = clock()
        self.postfix = ""
        self.lines = 0  # plain lines written
        self.timed = False  # follow_clock: the work is the seconds of a time budget
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None
        self.bar: tqdm | None = None
        if enabled and self.terminal:
            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.file,
                            dynamic_ncols=True)  # fmt: skip

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(done=exc[0] is None)

    def update(self, n: float = 1) -> None:
        """``n`` more units done."""
        with self._lock:
            self.n += n
            if self.bar is not None:
                self.bar.update(n)
            else:
                self._maybe_line()

    def set(self, n: float) -> None:
        """The work done so far is ``n`` units."""
        self.update(n - self.n)

    def set_postfix(self, **values: Any) -> None:
        """Figures shown after the count (``loss=12.3``), on the bar or the next line."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def write(self, text: str) -> None:
        """A line of text above the bar (or simply a line), as it is."""
        tqdm.write(text, file=self.file)

    def _maybe_line(self) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if now - self.last < self.interval:
            return
        self.last = now
        self.lines += 1
        print(f"turbovae: {self.desc}: {self.status(now)}", file=self.file, flush=True)

    def status(self, now: float | None = None) -> str:
        """``1,200 of 3,000 steps (40%), 52 s, ETA 1:18; loss 12.3``."""
        now = self.clock() if now is None else now
        elapsed = now - self.start
        if self.timed:
            left = (
                f", about {clock_text(self.total - elapsed)} left"
                if self.total and elapsed < self.total
                else ""
            )
            text = f"{clock_text(elapsed)} elapsed" + (
                f" of {clock_text(self.total)}{left}" if self.total else ""
            )
            return f"{text}; {self.postfix}" if self.postfix else text
        if self.total:
            text = f"{_count(self.n)} of {_count(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text = f"{_count(self.n)} {self.unit}"
        text += f", {clock_text(elapsed)} elapsed"
        done = self.n - self.initial
        if self.total and done > 0 and self.n < self.total:
            text += f", ETA {clock_text(elapsed / done * (self.total - self.n))}"
        return f"{text}; {self.postfix}" if self.postfix else text

    def follow_clock(self, period: float = 1.0) -> Progress:
        """Count seconds: a background thread sets the work done to the seconds elapsed (work measured
        by a time budget, like ``turbovae tune``'s) every ``period`` seconds, until ``close``."""
        if not self.enabled:
            return self
        self.timed = True
        self._stop = stop = threading.Event()

        def tick() -> None:
            while not stop.wait(period):
                elapsed = self.clock() - self.start
                self.set(int(min(elapsed, self.total) if self.total else elapsed))

        threading.Thread(target=tick, name="turbovae-progress", daemon=True).start()
        return self

    def close(self, done: bool = True) -> None:
        if self._stop is not None:
            self._stop.set()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines and done and self.enabled:  # it said something: say that it ended
            elapsed = clock_text(self.clock() - self.start)
            work = "" if self.timed else f", {_count(self.n)} {self.unit}"
            print(f"turbovae: {self.desc}: done{work} in {elapsed}", file=self.file, flush=True)
        self.enabled = False


__all__ = ["Progress", "clock_text", "is_terminal", "line_interval", "note"]
