"""Faults as data: a fault injector and a file-system wrapper that obeys it.

The commit protocol announces each named phase to an injected :class:`FaultInjector`
(``faults.reached("after_data", step=3, rank=0)``); a test arms the injector to raise an
error or kill the process (a real SIGKILL) at that point, and its counters prove that the
fault fired. :class:`FaultyFS` wraps any file system so every backend can be tortured the
same way: it intercepts *every* public operation of :class:`~recoverkit.storage.fs.LocalFS`
(its methods are generated from the class, so an operation added there is intercepted here
without anyone remembering to), asking the injector before and after each call.

The faults users hit, each one call:

* :meth:`FaultInjector.no_space` / :meth:`FaultInjector.io_error`: ENOSPC or EIO on a write;
* :meth:`FaultInjector.fsync_fails`: the write happened but did not become durable (the
  error is raised *after* the call ran, as a failed ``fsync`` is), or a directory fsync fails;
* :meth:`FaultInjector.read_only`: EROFS on every operation that would change anything;
* :meth:`FaultInjector.kill_at` with ``when="before"`` or ``"after"``: the process dies
  (SIGKILL) just before an operation or a phase, or just after an operation completed.

Besides LocalFS's operations, the zarr store announces the I/O tensorstore does for it as
``kv_write``, ``kv_read``, ``kv_list`` and ``kv_delete`` (``recoverkit.storage.zarr_store``):
the same faults apply to it.

Example:
    >>> f = FaultInjector().fail_at(phase="after_data", step=3, error=OSError(5, "EIO"))
    >>> f.reached("after_data", step=2, rank=0)   # nothing: wrong step
    >>> f.fired
    0
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from .fs import LocalFS

__all__ = [
    "PHASES",
    "SHM_PHASES",
    "READ_OPS",
    "WRITE_OPS",
    "CHANGE_OPS",
    "FaultInjector",
    "FaultyFS",
    "fs_operations",
    "intercepted",
]

#: Named points of the save/commit protocol, in the order a save reaches them.
PHASES = (
    "before_data",  # the step's staging area exists; no data written yet
    "after_data",  # this rank's data is written and durable
    "before_manifest",  # every rank reported success; the manifest is about to be written
    "after_manifest",  # the manifest's bytes are durable, the step not yet selectable
    "after_rename",  # the step is selectable under its final name (the commit point)
    "after_latest",  # `latest` points at the step (tiers without a pointer: the commit is done)
    "retention",  # old steps are about to be deleted
)

#: Named points of the shared-memory tier's copy of a staged step (not a commit: the drain
#: writes it before the disk commits, so they are not among PHASES).
SHM_PHASES = (
    "shm_stage",  # a slot is taken as the save's staging arena (index gone); nothing staged yet
    "shm_copy",  # the copies into the slot are submitted (or, staged in place, landed); no index yet
    "shm_index",  # every byte landed and its CRC matched; the index is about to be written
)

#: LocalFS operations that only look: a read-only file system lets them through.
READ_OPS = frozenset(
    {"read_file", "listdir", "size", "is_file", "is_dir", "exists", "read_segment"}
)
#: Operations that write data: LocalFS's, and the zarr store's kvstore writes (``kv_write``),
#: where ENOSPC and a failed fsync strike.
WRITE_OPS = frozenset({"write_file", "write_segment", "check_writable", "kv_write"})
#: Operations a read-only file system refuses (fsync of a directory still works there).
CHANGE_OPS = frozenset(
    {"makedirs", "mkdir", "rename", "replace", "remove", "remove_tree", "kv_delete"} | WRITE_OPS
)
_WHEN = ("before", "after")


def fs_operations(cls: type = LocalFS) -> list[str]:
    """The public operations of a file-system class (what :class:`FaultyFS` intercepts).

    Example:
        >>> "write_segment" in fs_operations()
        True
    """
    return sorted(
        n for n, v in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")
    )


@dataclass
class _Rule:
    action: str  # "raise" | "kill"
    phase: str | None = None
    ops: frozenset[str] | None = None
    step: int | None = None
    rank: int | None = None
    path_contains: str | None = None
    error: BaseException | None = None
    times: int | None = 1  # None: every time
    when: str = "before"


class FaultInjector:
    """Arms faults at named phases or file-system operations; counts what fired.

    ``fired`` counts the faults that fired, ``seen`` lists every phase reached
    ``(phase, step, rank)`` and ``ops`` counts every file-system operation a
    :class:`FaultyFS` was asked to make (by name).
    """

    def __init__(self) -> None:
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.fired = 0
        self.seen: list[tuple[str, int | None, int | None]] = []
        self.ops: Counter[str] = Counter()

    # ----------------------------------------------------------------- arming
    def fail_at(
        self,
        *,
        phase: str | None = None,
        op: str | Iterable[str] | None = None,
        step: int | None = None,
        rank: int | None = None,
        path_contains: str | None = None,
        error: BaseException | None = None,
        times: int | None = 1,
        when: str = "before",
    ) -> FaultInjector:
        """Raise ``error`` (default EIO) at a phase, or at a file-system ``op`` (one name or
        several) of FaultyFS; ``when="after"`` raises once the operation has run.
        ``times=None`` fires on every match."""
        rule = _rule("raise", phase, op, step, rank, path_contains, times, when)
        rule.error = error or OSError(errno.EIO, "injected EIO")
        return self._arm(rule)

    def kill_at(
        self,
        *,
        phase: str | None = None,
        op: str | Iterable[str] | None = None,
        step: int | None = None,
        rank: int | None = None,
        path_contains: str | None = None,
        when: str = "before",
    ) -> FaultInjector:
        """SIGKILL this process when the phase is reached, or just before (``when="before"``)
        or just after (``when="after"``) a file-system operation."""
        return self._arm(_rule("kill", phase, op, step, rank, path_contains, 1, when))

    def no_space(self, *, path_contains: str | None = None, times: int | None = 1) -> FaultInjector:
        """ENOSPC on the next write of file data (``times=None``: every write)."""
        err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.fail_at(op=WRITE_OPS, path_contains=path_contains, error=err, times=times)

    def io_error(
        self,
        *,
        op: str | Iterable[str] = WRITE_OPS,
        path_contains: str | None = None,
        times: int | None = 1,
    ) -> FaultInjector:
        """EIO on the next ``op`` (default: a write of file data)."""
        err = OSError(errno.EIO, os.strerror(errno.EIO))
        return self.fail_at(op=op, path_contains=path_contains, error=err, times=times)

    def fsync_fails(
        self, *, path_contains: str | None = None, times: int | None = 1
    ) -> FaultInjector:
        """A failed fsync: the next write of file data runs, then reports EIO (its bytes
        reached the page cache, not the disk), and a directory fsync fails with EIO."""
        err = OSError(errno.EIO, "fsync: " + os.strerror(errno.EIO))
        self.fail_at(
            op=WRITE_OPS, path_contains=path_contains, error=err, times=times, when="after"
        )
        return self.fail_at(op="fsync_dir", path_contains=path_contains, error=err, times=times)

    def read_only(self, *, path_contains: str | None = None) -> FaultInjector:
        """EROFS on every operation that would change anything, for good."""
        err = OSError(errno.EROFS, os.strerror(errno.EROFS))
        return self.fail_at(op=CHANGE_OPS, path_contains=path_contains, error=err, times=None)

    def disarm(self) -> FaultInjector:
        """Drop every armed fault (the counters stay)."""
        with self._lock:
            self._rules.clear()
        return self

    def _arm(self, rule: _Rule) -> FaultInjector:
        with self._lock:
            self._rules.append(rule)
        return self

    # ------------------------------------------------------------- announcing
    def reached(self, phase: str, *, step: int | None = None, rank: int | None = None) -> None:
        """Called by the protocol at each phase; fires a matching armed fault."""
        with self._lock:
            self.seen.append((phase, step, rank))
        self._fire(lambda r: r.phase == phase and _match(r.step, step) and _match(r.rank, rank))

    def on_op(self, op: str, *paths: str, when: str = "before") -> None:
        """Called by FaultyFS (and other I/O seams) before and after each operation."""
        if when == "before":
            with self._lock:
                self.ops[op] += 1

        def match(r: _Rule) -> bool:
            if r.ops is None or op not in r.ops or r.when != when:
                return False
            return r.path_contains is None or any(r.path_contains in p for p in paths)

        self._fire(match)

    def _fire(self, match: Callable[[_Rule], bool]) -> None:
        with self._lock:
            rule = next(
                (r for r in self._rules if (r.times is None or r.times > 0) and match(r)), None
            )
            if rule is None:
                return
            if rule.times is not None:
                rule.times -= 1
            self.fired += 1
        if rule.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        assert rule.error is not None
        raise rule.error


def _rule(
    action: str,
    phase: str | None,
    op: str | Iterable[str] | None,
    step: int | None,
    rank: int | None,
    path_contains: str | None,
    times: int | None,
    when: str,
) -> _Rule:
    if phase is not None and phase not in PHASES + SHM_PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases are {', '.join(PHASES + SHM_PHASES)}")
    if (phase is None) == (op is None):
        raise ValueError("name exactly one of phase= and op=")
    if when not in _WHEN:
        raise ValueError(f"when must be 'before' or 'after', got {when!r}")
    if phase is not None and when != "before":
        raise ValueError("a phase is a point, not a call: when='after' applies to op= only")
    ops = None if op is None else frozenset([op] if isinstance(op, str) else op)
    return _Rule(action, phase, ops, step, rank, path_contains, None, times, when)


def _match(want: int | None, got: int | None) -> bool:
    return want is None or want == got


class FaultyFS(LocalFS):
    """A LocalFS whose every operation asks a FaultInjector first, and again once it ran.

    Each public method of :class:`LocalFS` is generated here from the class itself: it
    announces ``faults.on_op(name, *paths, when="before")``, calls the same method of
    ``inner``, then announces ``when="after"``. Where ``inner`` runs LocalFS's own code for
    it, that code runs on this wrapper instead, so an operation made of others
    (``check_writable`` writes and removes a probe) has each of them intercepted as well.
    Anything else (attributes) is ``inner``'s.

    Example:
        >>> import errno, tempfile
        >>> faults = FaultInjector().no_space()
        >>> try:
        ...     FaultyFS(faults).write_file(tempfile.mkdtemp() + "/x", b"hi")
        ... except OSError as e:
        ...     e.errno == errno.ENOSPC, faults.fired
        (True, 1)
    """

    def __init__(self, faults: FaultInjector, inner: LocalFS | None = None) -> None:
        self.faults = faults
        self.inner = inner if inner is not None else LocalFS()

    def __getattr__(self, name: str) -> Any:  # attributes LocalFS may grow (an engine, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _intercept(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def method(self: FaultyFS, *args: Any, **kwargs: Any) -> Any:
        paths = tuple(os.fspath(a) for a in args if isinstance(a, (str, os.PathLike)))
        self.faults.on_op(name, *paths, when="before")
        if getattr(type(self.inner), name, None) is original:
            # inner runs LocalFS's own code: run it here, so that the operations it is made
            # of (check_writable's write_file, remove_tree's remove) are intercepted too
            out = original(self, *args, **kwargs)
        else:
            out = getattr(self.inner, name)(*args, **kwargs)
        self.faults.on_op(name, *paths, when="after")
        return out

    method.__faulty_op__ = name  # type: ignore[attr-defined]
    return method


for _name in fs_operations(LocalFS):
    setattr(FaultyFS, _name, _intercept(_name, getattr(LocalFS, _name)))
del _name


def intercepted(fs_class: type = FaultyFS) -> Collection[str]:
    """The operations ``fs_class`` routes through its injector (for conformance tests)."""
    return {
        n
        for n in fs_operations(fs_class)
        if getattr(getattr(fs_class, n), "__faulty_op__", None) == n
    }
