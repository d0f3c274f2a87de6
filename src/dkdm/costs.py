"""What a distillation will cost, said before it is spent: the pool's memory against what the
device has free (refused where it cannot fit), and after the first chunks of the preparation the
time the rest and the training's teacher forwards will take at the rate measured."""

from __future__ import annotations

import sys

from .errors import DkdmError
from .progress import duration

#: A preparation estimated to take longer than this is announced as such before it goes on.
LONG_PREPARATION_S = 3600.0


class Estimate:
    """After the first chunk of the pool's preparation: how long the rest and the training's
    teacher forwards take at the rate measured, said plainly when the preparation is long."""

    def __init__(self, prep_steps: int, train_forwards: int, main: bool):
        import time

        self.prep_steps, self.train_forwards, self.main = prep_steps, train_forwards, main
        self.start, self.done_before, self.said = time.monotonic(), None, False

    def __call__(self, prep_calls: int) -> None:
        import time

        if self.done_before is None:  # a resumed preparation counts from where it starts
            self.done_before, self.start = prep_calls, time.monotonic()
            return
        if self.said or not self.main or prep_calls <= self.done_before:
            return
        self.said = True
        rate = (prep_calls - self.done_before) / max(time.monotonic() - self.start, 1e-9)
        left = (self.prep_steps - prep_calls) / rate
        print(f"estimate: the pool's preparation {duration(left)} more, training at least "
              f"{duration(self.train_forwards / rate)} (its teacher forwards alone), at {rate:,.0f} teacher "
              f"sample-steps/s measured", file=sys.stderr)
        if left > LONG_PREPARATION_S:
            print(f"warning: preparing the pool takes about {duration(left)} on this machine; a smaller --batch or "
                  f"--rho shrinks the pool (round(rho x T) x batch entries) and --prep-steps cuts the steps per entry "
                  f"(Ctrl-C saves the preparation; --resume continues it)", file=sys.stderr)


def check_pool_fits(mem: int, size: int, shape, s, device) -> None:
    """Refuse a pool that cannot fit in the memory this device has free (per process), with the fix."""
    import os

    from .devices import available_memory

    free = available_memory(device)
    where = "GPU" if device.type == "cuda" else "machine"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    if free is None or mem * local <= 0.8 * free:
        return
    raise DkdmError(f"the pool needs {mem * local / 2**30:,.1f} GiB ({size:,} entries x {list(shape)} "
                    f"{s.pool_dtype}{f' in each of {local} processes' if local > 1 else ''}) but this {where} "
                    f"has {free / 2**30:,.1f} GiB free: a smaller --batch ({s.batch}) or --rho ({s.rho}) shrinks it "
                    f"(round(rho x T) x batch entries), --pool-dtype bfloat16 halves it")
