"""One progress line on stderr: bytes done / total, rate and ETA.

Converting a 130B checkpoint takes a long time; a line that says how far along it is
and when it will end is the difference between waiting and killing the job. On a
terminal the line rewrites itself; in a log it is printed every ``log_every`` seconds.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total: int, label: str, *, stream: Optional[TextIO] = None, enabled: bool = True, log_every: float = 10.0):
        self.total = max(1, int(total))
        self.label = label
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = 0.5 if self.tty else log_every
        self.start = time.perf_counter()
        self._last = self.start

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_s = _duration(eta) if eta == eta else "?"
        return (
            f"{self.label}: {_size(self.done)} / {_size(self.total)} ({100 * self.done / self.total:.0f}%), "
            f"{_size(rate)}/s, ETA {eta_s}"
        )

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.log_every:
            self._last = now
            self._emit(final=False)

    def set(self, done: int, total: int) -> None:
        """Report absolute progress (for work that counts its own bytes)."""
        self.total = max(1, int(total))
        self.update(int(done) - self.done)

    def close(self) -> float:
        """Print the final line; returns the elapsed seconds."""
        elapsed = time.perf_counter() - self.start
        if self.enabled:
            self._emit(final=True)
        return elapsed

    def _emit(self, final: bool) -> None:
        end = "\n" if final or not self.tty else ""
        prefix = "\r" if self.tty else ""
        self.stream.write(f"{prefix}{self.line()}{end}")
        self.stream.flush()
