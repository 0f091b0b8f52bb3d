"""The run lock: one writer per checkpoint root.

The writer of a root holds an exclusive POSIX record lock (``lockf``) on ``ROOT/.lock`` for
as long as its Checkpointer lives. The kernel drops the lock when the holder dies (SIGKILL
included), so a restarted job takes it over at once, while a second live writer on the same
root gets a :class:`~recoverkit.errors.CheckpointLockedError` naming the holder instead of
interleaving checkpoints with it. Readers (restore, the CLI) never take the lock.

Why ``lockf`` and not ``flock``: a ``flock`` belongs to the open file, which forked children
(DataLoader workers) share, so a SIGKILLed trainer's workers would keep its lock for seconds
after it died. A POSIX lock belongs to the process and is not inherited by ``fork``. As POSIX
locks never conflict within one process, a registry fences a second writer in the same
process.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading

from ..errors import CheckpointLockedError
from .layout import LOCK

__all__ = ["RunLock"]

_HELD: set[str] = set()  # lock files this process holds
_HELD_LOCK = threading.Lock()


class RunLock:
    """An exclusive, process-lifetime lock on a checkpoint root.

    Example:
        >>> import tempfile; root = tempfile.mkdtemp()
        >>> with RunLock(root):
        ...     pass
    """

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, LOCK)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        key = os.path.realpath(self.path)
        with _HELD_LOCK:
            if key in _HELD:
                raise CheckpointLockedError(
                    f"{self.path}: another writer holds this checkpoint root (pid {os.getpid()}, this "
                    "process); two writers on one root would interleave checkpoints"
                )
            _HELD.add(key)
        try:
            return self._acquire()
        except BaseException:
            with _HELD_LOCK:
                _HELD.discard(key)
            raise

    def _acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = _read_holder(fd)
            os.close(fd)
            raise CheckpointLockedError(
                f"{self.path}: another writer holds this checkpoint root ({holder}); "
                "two writers on one root would interleave checkpoints"
            ) from None
        except OSError:
            os.close(fd)
            raise
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            with _HELD_LOCK:
                _HELD.discard(os.path.realpath(self.path))

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
    except (OSError, ValueError):
        return "holder unknown"
