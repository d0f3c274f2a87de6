"""Progress of long work: a live bar on a terminal, a line a minute in a log file.

tqdm redraws its bar ten times a second; on a terminal that is one line, but with stderr
redirected to a file (a cluster job, ``nohup``, CI) every redraw is kept, thousands of lines a
run. So ``progress_bar`` gives tqdm only where stderr is a terminal, and elsewhere a
``LineProgress`` that writes one plain line every ``LINE_EVERY_S`` seconds (done, rate, ETA) and
one when the work ends. Both take ``update(n)``, ``set_postfix(**values)`` and ``close()``.
"""

from __future__ import annotations

import sys
import time

#: Seconds between the progress lines written where stderr is not a terminal.
LINE_EVERY_S = 60.0


def progress_bar(total: int, desc: str, unit: str = "step", unit_scale: bool = False, initial: int = 0,
                 disable: bool = False, stream=None):
    """A progress display for ``total`` units of work on ``stream`` (default: stderr)."""
    stream = stream if stream is not None else sys.stderr
    if disable:
        return LineProgress(total, desc, unit, unit_scale, initial, stream, enabled=False)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, file=stream,
                    dynamic_ncols=True)
    return LineProgress(total, desc, unit, unit_scale, initial, stream)


def _count(n: float, scale: bool) -> str:
    if not scale or n < 1e4:
        return f"{n:,.0f}"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def duration(seconds: float) -> str:
    """Seconds as a person reads them: 42 s, 3.5 min, 1.2 h."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class LineProgress:
    """Progress as plain lines: ``desc: done / total unit (pct), rate, ETA, postfix`` every
    ``every_s`` seconds, and ``desc: total unit in TIME (rate)`` when closed."""

    def __init__(self, total: int, desc: str, unit: str = "step", unit_scale: bool = False, initial: int = 0,
                 stream=None, every_s: float | None = None, enabled: bool = True):
        self.total, self.desc, self.unit, self.scale = total, desc, unit, unit_scale
        self.n = self.start_n = initial
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self.enabled = enabled
        self.postfix: dict[str, str] = {}
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            self._write(self._line(now))

    def set_postfix(self, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def _rate(self, now: float) -> float:
        return (self.n - self.start_n) / max(now - self.t0, 1e-9)

    def _line(self, now: float) -> str:
        rate = self._rate(now)
        parts = [f"{_count(self.n, self.scale)} / {_count(self.total, self.scale)} {self.unit}s"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else ""),
                 f"{_count(rate, self.scale)} {self.unit}s/s"]
        if self.total and rate > 0:
            parts.append(f"ETA {duration((self.total - self.n) / rate)}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return f"{self.desc}: " + ", ".join(parts)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        if self.enabled and self.n > self.start_n:
            done = self.n - self.start_n
            self._write(f"{self.desc}: {_count(done, self.scale)} {self.unit}s in {duration(now - self.t0)} "
                        f"({_count(self._rate(now), self.scale)} {self.unit}s/s)"
                        + "".join(f", {k} {v}" for k, v in self.postfix.items()))

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
