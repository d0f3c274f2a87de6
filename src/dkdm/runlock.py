"""One run per directory: a lock file in the run directory, and room on its disk.

Two processes writing the same run directory (a second ``dkdm distill --out RUN --resume`` started
while the first still runs) would interleave checkpoints and logs. The first takes ``RUN/.lock``
(created atomically, holding its pid, host and start time); a second is refused in one line
while that process lives. A lock left by a killed process on this host is detected (its pid is
gone, or now belongs to a process that started later) and taken over; a lock from another host
cannot be checked from here and is refused with the file to delete.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from .errors import DkdmError

LOCK = ".lock"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), where /proc has them."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid apart), where /proc has it."""
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else None  # field 22 of stat: starttime, in ticks since boot


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` runs and, given its kernel start time, is still that process. A killed process
    its parent has not reaped yet (a zombie) is not alive. Without /proc, the kernel is asked."""
    fields = _stat(pid)
    if fields is not None:
        return fields[0] not in ("Z", "X") and (started is None or len(fields) <= 19 or fields[19] == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """The lock on run directory ``out``; ``acquire`` creates the directory if needed."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = self.out / LOCK
        self.held = False

    def _mine(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def acquire(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed, then the creation is tried again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_holder()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._mine(), f)
            self.held = True
            return
        raise DkdmError(f"cannot take the lock {self.path}: another process keeps taking it")

    def _check_holder(self) -> None:
        """Refuse while the holder lives; remove the lock of one that is gone."""
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            raise DkdmError(f"{self.path} exists but is unreadable: if no dkdm process uses {self.out}, delete it")
        if host != socket.gethostname():
            raise DkdmError(f"{self.out} is in use by process {pid} on host {host} (since {holder.get('since')}); "
                            f"if that run is gone, delete {self.path}")
        if pid != os.getpid() and process_alive(pid, holder.get("started")):
            raise DkdmError(f"{self.out} is in use by process {pid} (since {holder.get('since')}): one run per "
                            f"directory; wait for it to finish or choose another --out")
        try:
            self.path.unlink()  # stale: its process is gone
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.held:
            try:
                holder = json.loads(self.path.read_text())
                if int(holder.get("pid", -1)) == os.getpid():
                    self.path.unlink()
            except (OSError, ValueError):
                pass
            self.held = False


def check_free_space(directory, need_bytes: int, what: str) -> None:
    """Refuse before writing ``what`` (``need_bytes``) where the disk holding ``directory`` has less free."""
    d = Path(directory)
    while not d.exists() and d != d.parent:
        d = d.parent
    free = shutil.disk_usage(d).free
    if free < need_bytes:
        raise DkdmError(f"{what} needs {_size(need_bytes)} but {d} has {_size(free)} free: free space or choose "
                        f"another --out")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
