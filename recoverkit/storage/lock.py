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

The lock file is ours only if it is a regular file with no other name: ``.lock`` is opened
with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` before it is locked or written, so
a planted symlink never has its target truncated or rewritten and a planted FIFO never blocks.
Anything else (a symlink, a FIFO, a directory, a device, a file with other hard links) is a
:class:`~recoverkit.errors.StorageError`, not a
:class:`~recoverkit.errors.CheckpointLockedError`: no writer holds the root, but nobody can
take its lock until the stray file is removed, which is a fix for the operator, not a wait.
:func:`probe_holder` tells who holds a root's lock without creating or changing anything.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading

from ..errors import CheckpointLockedError, StorageError
from .fs import open_regular
from .layout import LOCK

__all__ = ["RunLock", "probe_holder"]

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
        self.root = root
        self.path = os.path.join(root, LOCK)
        self._fd: int | None = None
        self._key: str | None = None

    def acquire(self) -> RunLock:
        """Take the lock; CheckpointLockedError if a live writer holds it, StorageError if
        ``.lock`` is not a regular file of its own (a symlink, FIFO, directory, ...)."""
        # The root may be a symlink (the user's choice); ``.lock`` inside it is never followed.
        key = self._key = os.path.join(os.path.realpath(self.root), LOCK)
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
        fd, st = open_regular(self.path, os.O_RDWR | os.O_CREAT, _refuse_lock)
        if st.st_nlink > 1:
            os.close(fd)
            raise StorageError(
                errno.EMLINK, f"{self.path}: the run lock file has {st.st_nlink} hard links; writing the "
                "holder into it would change the other names too (remove it)", self.path
            )
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
                _HELD.discard(self._key)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def probe_holder(root: str) -> str | None:
    """Who holds the run lock of ``root`` (``"pid N on HOST"``), or None if nobody does.

    For readers (``ls``, a dry-run ``gc``): probes with a shared POSIX lock, which conflicts
    with the writer's exclusive one, and releases it at once. The lock file is neither
    created nor changed, never followed if it is a symlink and never blocked on if it is a
    FIFO: a missing or non-regular ``.lock`` is held by nobody (no writer can take it
    either; :meth:`RunLock.acquire` says why).

    Example:
        >>> import tempfile; root = tempfile.mkdtemp()
        >>> probe_holder(root) is None
        True
    """
    path = os.path.join(root, LOCK)
    try:
        fd, _ = open_regular(path, os.O_RDONLY, _refuse_lock)
    except OSError:  # StorageError (not a regular file) is an OSError too
        return None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(fd)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _refuse_lock(path: str, kind: str) -> StorageError:
    code = errno.ELOOP if kind == "a symbolic link" else errno.EINVAL
    return StorageError(
        code, f"{path}: the run lock is {kind}, not a regular file; recoverkit neither follows nor "
        "writes it (remove it if no job of yours made it)", path
    )


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
    except (OSError, ValueError):
        return "holder unknown"
