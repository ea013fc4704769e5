"""One training run per workdir: an advisory lock file, ``WORKDIR/.lock``.

The lock is an ``flock`` on the file, so the operating system drops it when the holding
process exits for any reason (a crash, SIGKILL, a lost node): a lock left by a dead run
is simply taken over. The file records who holds it (pid, host, start time) so that a
refused run can say which process to wait for. Remote workdirs (``gs://...``) cannot be
locked this way and are not locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

from glm_jax.errors import CheckpointError

LOCK = ".lock"


class WorkdirLock:
    def __init__(self, workdir: str):
        self.workdir = str(workdir)
        self.path = os.path.join(self.workdir, LOCK)
        self._fd: Optional[int] = None
        self.previous: Optional[dict] = None  # the record of a dead holder whose lock was taken over

    @property
    def supported(self) -> bool:
        return "://" not in self.workdir

    def acquire(self) -> "WorkdirLock":
        """Take the lock, or raise CheckpointError naming the run that holds it."""
        if not self.supported or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
            since = f", running since {holder['started']}" if holder.get("started") else ""
            raise CheckpointError(
                f"workdir {self.workdir} is in use by another training run ({who}{since}); wait for it to end, "
                "or train in another workdir="
            ) from None
        self.previous = _read(fd) or None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
