"""SIGINT and SIGTERM during training: finish the step, checkpoint, stop; a second one stops at once.

A preempted job (SIGTERM from a scheduler) or a Ctrl-C loses at most the step in flight; the
trainer checks the flag between steps and raises ``Interrupted`` once its checkpoint is written.
"""

from __future__ import annotations

import signal


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run stopped after a finished step and wrote a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def catch_signals(stop: list) -> dict:
    """Handlers that append the first signal to ``stop`` (a second raises KeyboardInterrupt); returns
    the handlers they replace, for ``restore_signals``. Outside the main thread nothing changes."""
    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopped without a new checkpoint")
        stop.append(signum)

    try:
        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        return {}


def restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
