"""The run directory's guards, taken once at start-up: one live run at a time, a file system every
node shares, and no temporary file left behind by a process that was killed while writing.

- The lock: rank 0 holds an exclusive `flock` on `run_dir/.lock` for the whole run and writes its
  host and pid into it. A second run started on the same directory finds it held and refuses, naming
  that host and pid. The kernel (or the NFS lock manager) drops the lock when its process dies, however
  it dies, so a crashed run never blocks its own restart.
- Shared: every rank reads the checkpoint that rank 0 names, so all ranks must see one directory.
  Rank 0 writes a token file there and every rank must read it back; a rank that cannot stops the
  run, with one line naming it, before anything is trained that could not be resumed.
- Temporaries: a checkpoint is written to `.NAME.tmp.PID` and renamed (see atomic.py); a kill between
  the two leaves that file. Under the lock no other writer exists, so rank 0 deletes such files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import socket
from pathlib import Path

from lstm_dist.common.distributed import DistEnv, broadcast_object, gather_objects
from lstm_dist.common.errors import EveryRankError

LOCK_NAME = ".lock"


class RunDirectory:
    """The run directory of this job, claimed by `claim()` on every rank; `release()` at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    def claim(self, env: DistEnv) -> None:
        """Collective: lock (rank 0), check that every rank sees the directory, clear stale temporaries."""
        problem = self._lock() if env.is_main else None
        problem = broadcast_object(problem)
        if problem is None:
            problem = self._check_shared(env)
        if problem is not None:
            self.release()
            raise EveryRankError(problem)
        if env.is_main:
            for stale in self.path.glob("checkpoints/.*.tmp.*"):
                stale.unlink(missing_ok=True)

    def _lock(self) -> str | None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 200).decode("utf-8", "replace").split()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                return f"cannot lock run directory {self.path} ({exc.strerror}); check that its file system supports locks"
            who = f" (host {holder[0]}, pid {holder[1]})" if len(holder) >= 2 else ""
            return (f"run directory {self.path} is in use by another run{who}; wait for it to end or stop it, "
                    "or choose another run.name")
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        self._lock_fd = fd
        return None

    def _check_shared(self, env: DistEnv) -> str | None:
        token = None
        if env.is_main:
            token = (f".shared-check-{secrets.token_hex(8)}", secrets.token_hex(16))
            (self.path / token[0]).write_text(token[1])
        token = broadcast_object(token)
        try:
            seen = (self.path / token[0]).read_text() == token[1]
        except OSError:
            seen = False
        views = gather_objects((seen, socket.gethostname()))
        problem = None
        if env.is_main:
            (self.path / token[0]).unlink(missing_ok=True)
            blind = [f"{rank} (on {host})" for rank, (ok, host) in enumerate(views) if not ok]
            if blind:
                problem = (f"run directory {self.path} is not shared by every node: rank{'s' if len(blind) > 1 else ''} "
                           f"{', '.join(blind)} cannot see the file rank 0 wrote there; put run.dir on a file system "
                           "every node mounts (NFS, Lustre, ...)")
        return broadcast_object(problem)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None
