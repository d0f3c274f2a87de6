"""A data source wrapper that marks a window of whole training steps of the Trainer's loop.

The Trainer asks its source for one batch per step, so the calls to ``next_batch`` number the
steps: between call ``start`` and call ``start + n`` lie exactly n whole steps (batch, update,
bookkeeping), without the loop's start-up, its first (warm-up, compiling) steps or the final save.
bench/speed.py times each step of that window, bench/ops.py counts the ops dispatched in it.
"""

from __future__ import annotations


class StepWindow:
    """Wraps ``source``; calls ``mark(i)`` at batches ``start + i`` for i = 0 .. n: the marks bound
    n whole steps, one after the other."""

    def __init__(self, source, start: int, n: int, mark):
        self._source, self._start, self._n, self._mark = source, start, n, mark
        self._calls = 0

    @property
    def steps_needed(self) -> int:
        """Training steps that contain the whole window."""
        return self._start + self._n

    def __getattr__(self, name):
        return getattr(self._source, name)

    def next_batch(self):
        self._calls += 1
        if self._start <= self._calls <= self._start + self._n:
            self._mark(self._calls - self._start)
        return self._source.next_batch()
