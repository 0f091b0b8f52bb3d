"""Slots of one owner in shared memory: the writer and the reader's views.

Where it sits: below :mod:`recoverkit.storage.shm` (the store: names, job directories,
budget, listing for gc), which hands out one :class:`SlotSet` per owner directory. The
flow of a slot (see ``storage.shm`` for the layout)::

    w = slots.begin(step, nbytes)   not the newest complete slot, nor one open here;
                                    its index deleted first (torn until commit)
    copy into w.view / w.address    (the copy engine)
    w.commit(index_bytes)           the index validated, then written last (tmp + rename)
    v = slots.open(step)            index validated, data file a regular file of at least
                                    data_bytes, mapped read-only, pinned until v.close()

Pins are per process and per data file: a view from any store of this process keeps the
slot from being rewritten; a mapping still referenced by a memoryview is unmapped (and
unpinned) once the last one is released. The mappings, pins and directory checks are
:mod:`recoverkit.storage.shm_map`.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from typing import TYPE_CHECKING

from ..errors import CheckpointNotFoundError, IntegrityError, StorageError
from ..format.shm_index import MAX_DATA_BYTES, MAX_INDEX_BYTES, ShmIndex, decode_index
from .fs import LocalFS, open_regular
from .shm_map import _Mapping, _pin, _pinned, _real_dir, _refuse, _refuse_read

if TYPE_CHECKING:
    from .shm import ShmStore

__all__ = ["MAX_SLOTS", "SlotBusyError", "SlotSet", "SlotWriter", "SnapshotView"]

MAX_SLOTS = 16
_SLOT_INDEX = re.compile(r"slot-(\d{1,2})\.index")


class SlotBusyError(StorageError):
    """Every slot of an owner holds the newest complete snapshot or is open in this process."""


# ------------------------------------------------------------------ one owner's slots
class SlotSet:
    """The slots of one owner (its own snapshots, or the replicas of them held here)."""

    def __init__(self, store: ShmStore, owner: int, replica: bool, path: str) -> None:
        self.store = store
        self.owner = owner
        self.replica = replica
        self.dir = path
        self._lock = threading.Lock()
        self._writing: set[int] = set()
        self._maps: dict[int, tuple[_Mapping, int]] = {}  # slot -> writable mapping, inode
        #: mappings whose close waited for a memoryview still alive, with the path they pin
        self._lingering: list[tuple[_Mapping, str | None]] = []
        self._cache: dict[int, tuple[tuple[int, int, int], ShmIndex, bytes]] = {}

    def __repr__(self) -> str:
        return f"SlotSet({self.dir!r})"

    def _data(self, k: int) -> str:
        return os.path.join(self.dir, f"slot-{k}.data")

    def _index(self, k: int) -> str:
        return os.path.join(self.dir, f"slot-{k}.index")

    # ------------------------------------------------------------ listing
    def _slots_on_disk(self) -> list[int]:
        try:
            names = os.listdir(self.dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(m.group(1)) for n in names if (m := _SLOT_INDEX.fullmatch(n)) and int(m.group(1)) < MAX_SLOTS)

    def _load(self, k: int) -> tuple[ShmIndex, bytes] | None:
        """Slot ``k``'s index if the slot is complete (a valid index, a data file of its own
        at least ``data_bytes`` long); None otherwise (torn, being written, damaged)."""
        path = self._index(k)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                return None
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            hit = self._cache.get(k)
            if hit is not None and hit[0] == sig:
                idx, raw = hit[1], hit[2]
            else:
                raw = self.store.fs.read_file(path, max_bytes=MAX_INDEX_BYTES)
                idx = decode_index(raw, path=path)
                self._cache[k] = (sig, idx, raw)
            self._check_index(idx, path)
            dst = os.lstat(self._data(k))
        except (OSError, IntegrityError):
            self._cache.pop(k, None)
            return None
        if not stat.S_ISREG(dst.st_mode) or dst.st_size < idx.data_bytes:
            return None
        return idx, raw

    def _check_index(self, idx: ShmIndex, path: str) -> None:
        if idx.rank != self.owner:
            raise IntegrityError(f"{path}: index of rank {idx.rank} in the slots of rank {self.owner}", path=path)

    def _complete(self) -> dict[int, ShmIndex]:
        out = {}
        for k in self._slots_on_disk():
            if k in self._writing:
                continue
            got = self._load(k)
            if got is not None:
                out[k] = got[0]
        return out

    def steps(self) -> list[int]:
        """Steps of the complete snapshots, ascending (each index validated)."""
        with self._lock:
            return sorted({idx.step for idx in self._complete().values()})

    def indexes(self) -> list[ShmIndex]:
        """The validated indexes of the complete snapshots, by step."""
        with self._lock:
            return sorted(self._complete().values(), key=lambda i: i.step)

    def newest(self) -> int | None:
        """The newest complete step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def index(self, step: int) -> ShmIndex:
        """The validated index of ``step`` (CheckpointNotFoundError if no complete slot holds it)."""
        with self._lock:
            for idx in self._complete().values():
                if idx.step == step:
                    return idx
        raise CheckpointNotFoundError(f"{self.dir}: no complete shared-memory snapshot of step {step}")

    def data_file_bytes(self) -> int:
        total = 0
        for k in range(MAX_SLOTS):
            try:
                st = os.lstat(self._data(k))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
        return total

    # ------------------------------------------------------------ writing
    def begin(
        self, step: int, data_bytes: int, *, hold: bool = False, mapped_only: bool = False, room: int = 0
    ) -> SlotWriter:
        """A slot to write ``step`` into (``data_bytes`` of data): never the one holding the
        newest complete snapshot, nor one open, pinned or held in this process.

        Its index is deleted first, so until :meth:`SlotWriter.commit` the slot is torn and
        never listed. Raises SlotBusyError when no slot is free, StorageError(ENOSPC) when
        the data file would grow past the store's budget (or the memory is full).

        ``hold``: the slot is an arena a snapshot is staged into (``staging.slot_arena``):
        it stays pinned in this process, through the commit, until
        :meth:`SlotWriter.release` (its bytes are still read, and a lazy copy may still
        write them, after the index is written). No writer of this process takes it meanwhile.

        ``mapped_only``: only if the slot it would take is already mapped writable here with
        room for ``data_bytes`` (no file to create, grow or map: nothing slow for a caller on
        the training thread); SlotBusyError otherwise. ``room``: grow the data file to
        at least this many bytes (within the budget) though ``data_bytes`` are written, so a
        later ``mapped_only`` writer of that size finds the slot ready.
        """
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        if type(data_bytes) is not int or not 0 <= data_bytes <= MAX_DATA_BYTES:
            raise ValueError(f"data_bytes must be an integer in [0, {MAX_DATA_BYTES}], got {data_bytes!r}")
        self.store.make_job_dir()
        _real_dir(self.dir, create=True)
        with self._lock:
            self._reap()
            complete = self._complete()
            newest = max(complete, key=lambda k: complete[k].step, default=None)
            free = [
                k for k in range(self.store.nslots)
                if k != newest and k not in self._writing and not _pinned(self._data(k))
            ]  # fmt: skip
            # the slot to take: an unused one first, else the oldest snapshot's
            pick = min(free, key=lambda k: (k in complete, complete[k].step if k in complete else -1, k), default=None)
            if mapped_only and pick is not None and not self._mapped(pick, data_bytes):
                free = []  # not ready: never another slot instead (that would drop an older snapshot)
            if not free:
                raise SlotBusyError(
                    errno.EBUSY,
                    f"{self.dir}: no free slot for step {step}: of {self.store.nslots}, one holds the newest "
                    f"snapshot (step {complete[newest].step if newest is not None else '-'}) and the others are "
                    "open or being written" + (f" (or not yet mapped for {data_bytes} bytes)" if mapped_only else ""),
                    self.dir,
                )
            assert pick is not None
            k = pick
            self._writing.add(k)
            if hold:
                _pin(self._data(k), +1)  # until release(): no writer of this process takes it
        try:
            self.store.fs.remove(self._index(k))  # torn from here until commit
            self._cache.pop(k, None)
            mapping = self._map_for_write(k, data_bytes, max(data_bytes, min(int(room), MAX_DATA_BYTES)))
        except BaseException:
            with self._lock:
                self._writing.discard(k)
                if hold:
                    _pin(self._data(k), -1)
            raise
        return SlotWriter(self, k, step, data_bytes, mapping, hold=hold)

    def _mapped(self, k: int, data_bytes: int) -> bool:
        """Slot ``k`` is mapped writable here with room for ``data_bytes``."""
        held = self._maps.get(k)
        return held is not None and held[0].mm is not None and held[0].nbytes >= data_bytes

    def _map_for_write(self, k: int, data_bytes: int, room: int) -> _Mapping:
        """Slot ``k``'s writable mapping, its file grown to ``room`` bytes if smaller than
        ``data_bytes`` (just ``data_bytes`` where ``room`` would pass the budget)."""
        path = self._data(k)
        fd, st = open_regular(path, os.O_RDWR | os.O_CREAT, _refuse, mode=0o600)
        try:
            if st.st_nlink > 1:
                raise StorageError(errno.EMLINK, f"{path}: has {st.st_nlink} hard links (remove it)", path)
            size = st.st_size
            if size < room and self.store.used_bytes() - size + room <= self.store.budget_bytes:
                data_bytes = room  # room for both layouts, within the budget
            if size < data_bytes:
                used = self.store.used_bytes()
                if used - size + data_bytes > self.store.budget_bytes:
                    raise StorageError(
                        errno.ENOSPC,
                        f"{path}: a snapshot of {data_bytes} bytes would take this job's shared memory to "
                        f"{used - size + data_bytes} bytes, over its budget of {self.store.budget_bytes} bytes "
                        "(raise the shm tier's budget_bytes)",
                        path,
                    )
                self._drop_map(k)
                try:
                    os.posix_fallocate(fd, 0, data_bytes)  # pages now: ENOSPC here, never SIGBUS later
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        os.ftruncate(fd, size)
                        raise StorageError(
                            e.errno, f"{path}: cannot grow to {data_bytes} bytes of shared memory: {e.strerror}", path
                        ) from e
                    os.ftruncate(fd, data_bytes)
                size = data_bytes
            held = self._maps.get(k)
            if held is not None and (held[1] != st.st_ino or held[0].nbytes < data_bytes or held[0].mm is None):
                self._drop_map(k)
                held = None
            if held is None:
                held = (_Mapping(fd, size, write=True), st.st_ino)
                self._maps[k] = held
            return held[0]
        finally:
            os.close(fd)

    def _drop_map(self, k: int) -> None:
        held = self._maps.pop(k, None)
        if held is not None and not held[0].close():
            self._lingering.append((held[0], None))

    def _reap(self) -> None:
        """Unmap what waited for its last memoryview (and unpin what it pinned)."""
        left = []
        for m, pinned in self._lingering:
            if not m.close():
                left.append((m, pinned))
            elif pinned is not None:
                _pin(pinned, -1)
        self._lingering = left

    def _committed(self, w: SlotWriter, index_bytes: bytes, index: ShmIndex | None) -> None:
        path = self._index(w.slot)
        idx = index if index is not None else decode_index(index_bytes, path=path)  # must read back
        self._check_index(idx, path)
        if idx.step != w.step or idx.data_bytes != w.data_bytes:
            raise IntegrityError(
                f"{path}: the index says step {idx.step} of {idx.data_bytes} bytes, the slot was begun for step "
                f"{w.step} of {w.data_bytes} bytes",
                path=path,
            )
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        self.store.fs.remove(tmp)
        self.store.fs.write_file(tmp, index_bytes, new=True)
        os.replace(tmp, path)  # complete from here
        with self._lock:
            self._writing.discard(w.slot)
            st = os.lstat(path)
            self._cache[w.slot] = ((st.st_ino, st.st_mtime_ns, st.st_size), idx, bytes(index_bytes))
            for k, other in self._complete().items():  # one slot per step: an older copy goes
                if k != w.slot and other.step == w.step and not _pinned(self._data(k)):
                    self.store.fs.remove(self._index(k))
                    self._cache.pop(k, None)

    def _aborted(self, w: SlotWriter) -> None:
        with self._lock:
            self._writing.discard(w.slot)

    def _released(self, w: SlotWriter) -> None:
        with self._lock:
            self._writing.discard(w.slot)
            _pin(self._data(w.slot), -1)

    def invalidate(self, step: int) -> None:
        """Make ``step`` unselectable here (its index deleted; the data stays for reuse)."""
        with self._lock:
            for k, idx in self._complete().items():
                if idx.step == step:
                    self.store.fs.remove(self._index(k))
                    self._cache.pop(k, None)

    # ------------------------------------------------------------ reading
    def open(self, step: int) -> SnapshotView:
        """Map the complete snapshot of ``step`` read-only; pinned until ``close()``.

        Raises CheckpointNotFoundError when no complete slot holds it, IntegrityError when
        its files are not what the index says.
        """
        with self._lock:
            found = next(((k, i) for k, i in self._complete().items() if i.step == step), None)
            if found is None:
                raise CheckpointNotFoundError(f"{self.dir}: no complete shared-memory snapshot of step {step}")
            k = found[0]
            data = self._data(k)
            _pin(data, +1)
        try:
            got = self._load(k)
            if got is None or got[0].step != step:
                raise CheckpointNotFoundError(f"{self.dir}: the snapshot of step {step} was overwritten meanwhile")
            idx, raw = got
            fd, st = open_regular(data, os.O_RDONLY, _refuse_read)
            try:
                if st.st_size < idx.data_bytes:
                    raise IntegrityError(f"{data}: {st.st_size} bytes, the index records {idx.data_bytes}", path=data)
                mapping = _Mapping(fd, idx.data_bytes, write=False)
            finally:
                os.close(fd)
        except BaseException:
            _pin(data, -1)
            raise
        return SnapshotView(self, k, idx, raw, mapping, data)

    def clear(self) -> None:
        """Delete every slot of this owner (nothing may be open)."""
        with self._lock:
            for k in list(self._maps):
                self._drop_map(k)
            self._cache.clear()
        LocalFS().remove_tree(self.dir)

    def close(self) -> None:
        """Unmap the writable mappings (files stay)."""
        with self._lock:
            for k in list(self._maps):
                self._drop_map(k)
            self._reap()


class SlotWriter:
    """A slot being written (from :meth:`SlotSet.begin`): fill ``view`` (or ``address``),
    then :meth:`commit` the index, or :meth:`abort`.

    A held writer (``begin(..., hold=True)``) keeps the slot pinned and its view valid after
    the commit, until :meth:`release` (or :meth:`abort`)."""

    def __init__(
        self, slots: SlotSet, slot: int, step: int, data_bytes: int, mapping: _Mapping, *, hold: bool = False
    ) -> None:
        self.slots = slots
        self.slot = slot
        self.step = step
        self.data_bytes = data_bytes
        self.hold = hold
        self._mapping = mapping
        self.address = mapping.address
        self._view: memoryview | None = None
        self.done = False  # no longer the writer's (released, aborted, or committed unheld)
        self.committed = False

    @property
    def view(self) -> memoryview:
        """The slot's ``data_bytes`` bytes, writable."""
        if self.done:
            raise ValueError("the slot writer is done")
        if self._view is None:
            self._view = self._mapping.view(readonly=False)[: self.data_bytes]
        return self._view

    def _release(self) -> None:
        self.done = True
        if self._view is not None:
            self._view.release()
            self._view = None

    def commit(self, index_bytes: bytes, *, index: ShmIndex | None = None) -> None:
        """Write the index (validated first, for this slot's step and size), last and
        atomically: the snapshot is complete.

        ``index``: what ``index_bytes`` decode to, when this process built them itself
        (``format.shm_index.encode_index``): they are not parsed back. Bytes that came
        from elsewhere (a peer) are always parsed and validated: leave it out.
        """
        if self.done or self.committed:
            raise ValueError("the slot writer is done")
        try:
            self.slots._committed(self, index_bytes, index)
        except BaseException:
            if not self.hold:  # a held slot stays held (torn) until release()
                self.abort()
            raise
        self.committed = True
        if not self.hold:
            self._release()

    def abort(self) -> None:
        """Leave the slot torn (free for the next writer); a held writer already committed
        keeps its snapshot (as :meth:`release`)."""
        if not self.done:
            self._release()
            if self.hold:
                self.slots._released(self)
            else:
                self.slots._aborted(self)

    def release(self) -> None:
        """A held writer: nothing reads or writes the slot through it any more, so a writer
        may take it again (committed: its snapshot stays listed until then; not committed:
        torn). An unheld writer: as :meth:`abort`."""
        self.abort()


class SnapshotView:
    """A complete snapshot mapped read-only (from :meth:`SlotSet.open`); pinned in this
    process (no writer here reuses its slot) until :meth:`close`."""

    def __init__(self, slots: SlotSet, slot: int, index: ShmIndex, raw: bytes, mapping: _Mapping, path: str) -> None:
        self.slots = slots
        self.slot = slot
        self.step = index.step
        self.index = index
        self.index_bytes = raw
        self.path = path
        self._mapping = mapping
        self.address = mapping.address
        self.data: memoryview = mapping.view(readonly=True)
        self.closed = False

    def memory_view(self, offset: int, nbytes: int) -> memoryview:
        """``nbytes`` at ``offset`` of the data, read-only; IntegrityError outside it."""
        if self.closed:
            raise ValueError(f"{self.path}: the snapshot view is closed")
        if type(offset) is not int or type(nbytes) is not int or offset < 0 or nbytes < 0 or offset + nbytes > self.index.data_bytes:
            raise IntegrityError(
                f"{self.path}: bytes [{offset}, {offset}+{nbytes}) lie outside the {self.index.data_bytes} data bytes",
                path=self.path,
            )
        return self.data[offset : offset + nbytes]

    def close(self) -> None:
        """Unmap (once every memoryview taken from it is released) and unpin."""
        if self.closed:
            return
        self.closed = True
        self.data.release()
        if not self._mapping.close():  # a memoryview is still alive: unmapped once it is gone
            with self.slots._lock:
                self.slots._lingering.append((self._mapping, self.path))
            # stays pinned: its bytes may still be read
            return
        _pin(self.path, -1)

    def __enter__(self) -> SnapshotView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
