"""A data source wrapper that marks a window of whole training steps of the Trainer's loop.

The Trainer asks its source for one batch per step, so the calls to ``next_batch`` number the
steps: between call ``start`` and call ``start + n`` lie exactly n whole steps (batch, update,
bookkeeping), without the loop's start-up, its first (warm-up, compiling) steps or the final save.
bench/speed.py times that window, bench/ops.py counts the ops dispatched in it.
"""

from __future__ import annotations


class StepWindow:
    """Wraps ``source``; calls ``on_start()`` at batch ``start`` and ``on_stop()`` at batch ``start + n``."""

    def __init__(self, source, start: int, n: int, on_start, on_stop):
        self._source, self._start, self._n = source, start, n
        self._on_start, self._on_stop = on_start, on_stop
        self._calls = 0

    @property
    def steps_needed(self) -> int:
        """Training steps that contain the whole window."""
        return self._start + self._n

    def __getattr__(self, name):
        return getattr(self._source, name)

    def next_batch(self):
        self._calls += 1
        if self._calls == self._start:
            self._on_start()
        elif self._calls == self._start + self._n:
            self._on_stop()
        return self._source.next_batch()
