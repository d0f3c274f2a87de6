"""The other processes of a multi-process run: who they are, and which one is gone when a
collective fails.

A process that dies (kill -9, OOM killer, a lost node) breaks the next collective of every other
process with a transport error of the backend ("Connection closed by peer"), which names an
address, not a rank. A roll call taken once at the start (host and pid of every rank) lets the
survivors name the rank they lost, in the one line the command prints.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

from .errors import DkdmError
from .runlock import process_alive

# substrings of the errors gloo raises when a peer's connection breaks or times out (NCCL's are
# DistBackendError, a DistError)
_TRANSPORT_FAILURES = ("closed by peer", "reset by peer", "broken pipe", "connection refused", "timed out",
                       "remote process exited")


class PeerLost(DkdmError):
    """Another process of the run stopped; this one stopped too, its checkpoints intact."""

    exit_code = 4


def roll_call() -> list[tuple[str, int]]:
    """(host, pid) of every rank, in rank order; a collective, so every rank must call it."""
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), os.getpid()))
    return [tuple(entry) for entry in everyone]


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that broke because another process went away."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error).lower() for s in _TRANSPORT_FAILURES)


def lost_ranks(roll: list[tuple[str, int]], me: int, wait: float = 2.0) -> tuple[list[int], list[int]]:
    """(ranks on this host whose process is gone, ranks on other hosts that cannot be checked).

    A killed process closes its sockets before it is dead, so the survivor's collective can fail
    while the pid still looks alive: local ranks are watched for up to ``wait`` seconds."""
    here = socket.gethostname()
    local = [r for r, (host, _) in enumerate(roll) if r != me and host == here]
    unknown = [r for r, (host, _) in enumerate(roll) if r != me and host != here]
    deadline = time.monotonic() + wait
    while True:
        gone = [r for r in local if not process_alive(roll[r][1])]
        if gone or not local or time.monotonic() > deadline:
            return gone, unknown
        time.sleep(0.05)


def describe_loss(error: BaseException, roll: list[tuple[str, int]] | None, me: int) -> str:
    """Which rank failed, as far as this process can tell, with the backend's own reason."""
    reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    reason = reason.split("] ", 1)[-1].split(". ", 1)[0][:160]  # gloo prefixes its source location
    if roll:
        gone, unknown = lost_ranks(roll, me)
        if gone:
            names = ", ".join(f"rank {r} (pid {roll[r][1]})" for r in gone)
            return f"{names} of this run stopped ({reason})"
        if unknown:
            hosts = ", ".join(f"rank {r} on {roll[r][0]}" for r in unknown)
            return f"a process on another host stopped ({hosts}: see their logs; {reason})"
    return f"another process of this run stopped ({reason})"


@contextlib.contextmanager
def peer_failures(accelerator, roll, step, ckpt_dir):
    """A collective broken by a lost process becomes ``PeerLost``: which rank, at which step
    (``step()``), and the checkpoint in ``ckpt_dir`` to resume from."""
    from .checkpoint import list_checkpoints

    try:
        yield
    except RuntimeError as e:
        if accelerator.num_processes == 1 or not is_peer_failure(e):
            raise
        saved = list_checkpoints(ckpt_dir)
        resume = (f"--resume continues from {saved[-1]} (same number of processes)" if saved else
                  "no checkpoint was written yet: --resume starts the run again from its first step")
        raise PeerLost(f"{describe_loss(e, roll, accelerator.process_index)}; rank {accelerator.process_index} "
                       f"stopped at step {step()}; {resume}") from e


def check_in_sync(accelerator, net, step: int) -> None:
    """All processes must hold the same network; a cheap fingerprint of its weights is compared."""
    import torch

    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in net.parameters()])
        weights = torch.linspace(1, 2, len(flat), dtype=torch.float64, device=flat.device)
        fp = torch.stack([flat.sum(), (flat * weights).sum()]).reshape(1, 2)
    every = accelerator.gather(fp)
    if not torch.equal(every, fp.expand_as(every)):
        raise DkdmError(f"processes hold different student weights at step {step}; "
                        f"the distributed run is out of sync (stopped)")
