"""Faults as data: a fault injector and a file-system wrapper that obeys it.

The commit protocol announces each named phase to an injected :class:`FaultInjector`
(``faults.reached("after_data", step=3, rank=0)``); a test arms the injector to raise an
error or kill the process (a real SIGKILL) at that point, and its counters prove that the
fault fired. :class:`FaultyFS` wraps any file system so every backend can be tortured the
same way: ENOSPC on a segment write, EIO on fsync, a failed rename.

Example:
    >>> f = FaultInjector().fail_at(phase="after_data", step=3, error=OSError(5, "EIO"))
    >>> f.reached("after_data", step=2, rank=0)   # nothing: wrong step
    >>> f.fired
    0
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from .fs import DEFAULT_MAX_READ_BYTES, LocalFS

__all__ = ["PHASES", "FaultInjector", "FaultyFS"]

#: Named points of the save/commit protocol, in the order a save reaches them.
PHASES = (
    "before_data",  # the step's temporary directory exists; no data written yet
    "after_data",  # this rank's segment is written and fsynced
    "before_manifest",  # every rank reported success; the manifest is about to be written
    "after_manifest",  # manifest written and fsynced in the temporary directory
    "after_rename",  # the step directory has its final name (committed)
    "after_latest",  # `latest` points at the step
    "retention",  # old steps are being deleted
)


@dataclass
class _Rule:
    action: str  # "raise" | "kill"
    phase: str | None = None
    op: str | None = None
    step: int | None = None
    rank: int | None = None
    path_contains: str | None = None
    error: BaseException | None = None
    times: int = 1


class FaultInjector:
    """Arms faults at named phases or file-system operations; counts what fired."""

    def __init__(self) -> None:
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.fired = 0
        self.seen: list[tuple[str, int | None, int | None]] = []

    def fail_at(
        self,
        *,
        phase: str | None = None,
        op: str | None = None,
        step: int | None = None,
        rank: int | None = None,
        path_contains: str | None = None,
        error: BaseException | None = None,
        times: int = 1,
    ) -> FaultInjector:
        """Raise ``error`` (default EIO) at a phase, or at a file-system ``op`` of FaultyFS."""
        if phase is not None and phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}")
        self._rules.append(
            _Rule("raise", phase, op, step, rank, path_contains, error or OSError(5, "injected EIO"), times)
        )
        return self

    def kill_at(
        self, *, phase: str | None = None, op: str | None = None, step: int | None = None,
        rank: int | None = None, path_contains: str | None = None,
    ) -> FaultInjector:
        """SIGKILL this process when the phase or operation is reached."""
        if phase is not None and phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}")
        self._rules.append(_Rule("kill", phase, op, step, rank, path_contains))
        return self

    def reached(self, phase: str, *, step: int | None = None, rank: int | None = None) -> None:
        """Called by the protocol at each phase; fires a matching armed fault."""
        with self._lock:
            self.seen.append((phase, step, rank))
        self._fire(lambda r: r.phase == phase and _match(r.step, step) and _match(r.rank, rank))

    def on_op(self, op: str, path: str) -> None:
        """Called by FaultyFS before each operation."""
        self._fire(lambda r: r.op == op and (r.path_contains is None or r.path_contains in path))

    def _fire(self, match) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            rule = next((r for r in self._rules if r.times > 0 and match(r)), None)
            if rule is None:
                return
            rule.times -= 1
            self.fired += 1
        if rule.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        assert rule.error is not None
        raise rule.error


def _match(want: int | None, got: int | None) -> bool:
    return want is None or want == got


class FaultyFS(LocalFS):
    """A LocalFS whose operations first ask a FaultInjector whether to fail."""

    def __init__(self, faults: FaultInjector, inner: LocalFS | None = None) -> None:
        self.faults = faults
        self.inner = inner or LocalFS()

    def makedirs(self, path: str) -> None:
        self.faults.on_op("makedirs", path)
        self.inner.makedirs(path)

    def mkdir(self, path: str) -> None:
        self.faults.on_op("mkdir", path)
        self.inner.mkdir(path)

    def write_file(self, path: str, data: bytes, *, new: bool = False) -> None:
        self.faults.on_op("write_file", path)
        self.inner.write_file(path, data, new=new)

    def read_file(self, path: str, *, max_bytes: int = DEFAULT_MAX_READ_BYTES) -> bytes:
        self.faults.on_op("read_file", path)
        return self.inner.read_file(path, max_bytes=max_bytes)

    def remove(self, path: str) -> None:
        self.faults.on_op("remove", path)
        self.inner.remove(path)

    def rename(self, src: str, dst: str) -> None:
        self.faults.on_op("rename", dst)
        self.inner.rename(src, dst)

    def replace(self, src: str, dst: str) -> None:
        self.faults.on_op("replace", dst)
        self.inner.replace(src, dst)

    def fsync_dir(self, path: str) -> None:
        self.faults.on_op("fsync_dir", path)
        self.inner.fsync_dir(path)

    def remove_tree(self, path: str) -> None:
        self.faults.on_op("remove_tree", path)
        self.inner.remove_tree(path)

    def write_segment(
        self, path: str, items: Sequence[tuple[int, int, int]], *, direct: bool = False, crc: bool = False
    ) -> list[int] | None:
        self.faults.on_op("write_segment", path)
        return self.inner.write_segment(path, items, direct=direct, crc=crc)

    def read_segment(self, path: str, items: Sequence[tuple[int, int, int, int]]) -> list[int]:
        self.faults.on_op("read_segment", path)
        return self.inner.read_segment(path, items)
