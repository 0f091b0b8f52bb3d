"""Tier 2: node-local disk, one segment file per rank per step.

The commit protocol on a POSIX file system:

1. ``prepare``: create ``ROOT/.tmp-step-N-<id>/`` (never selectable).
2. ``write_rank``: each rank writes ``rank-R.seg`` with its object blob and tensor bytes at
   aligned offsets and fsyncs it.
3. ``commit``: write ``manifest.json`` into the temporary directory and fsync it, fsync the
   directory, rename it to ``ROOT/step-N`` (the atomic commit point), fsync ``ROOT``, then
   write ``latest`` through a temporary file, rename it and fsync ``ROOT`` again.

With ranks on several hosts and ``ROOT`` on each host's own disk, the first rank of a host
that does not see rank 0's temporary directory creates it there (``adopt``) and, once rank
0 committed, commits the same manifest on its host: every host's disk then holds a
committed step with its own ranks' segment files.

A step directory without a manifest cannot exist under its final name, so listing
``step-*`` directories that hold ``manifest.json`` lists exactly the committed steps.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import threading
import uuid
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointNotFoundError, IntegrityError
from ..format.checksum import crc32c, crc32c_ptr
from ..format.manifest import MANIFEST_NAME, BlobRecord, Manifest, PackRecord, ShardRecord
from ..format.segment import PACK_ALIGNMENT, PACK_BELOW, PACK_BYTES, plan_offsets, segment_name
from ..format.validate import check_manifest, check_name
from .base import Buffer, RankPayload, RankRecords, Region, ShardData, ShardMeta, Tier, destination
from .faults import FaultInjector
from .fs import LocalFS
from .layout import LATEST, TMP_PREFIX, TRASH_PREFIX, parse_step_dirname, step_dirname

if TYPE_CHECKING:  # torch is imported by the write path only (the CLI's reads never load it)
    import torch

__all__ = ["LocalTier"]


class LocalTier(Tier):
    """Segment files in a directory on a local (or shared POSIX) file system.

    Example:
        >>> import tempfile
        >>> tier = LocalTier(tempfile.mkdtemp())
        >>> tier.steps()
        []
    """

    name = "local"

    def __init__(
        self,
        root: str,
        *,
        fs: LocalFS | None = None,
        faults: FaultInjector | None = None,
        direct_io: bool = False,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.fs = fs or LocalFS()
        self.faults = faults or FaultInjector()
        self.direct_io = direct_io
        self._packs: dict[tuple[str, PackRecord], bytes] = {}  # recently read packs, verified
        self._packs_lock = threading.Lock()

    # ----------------------------------------------------------------- writing
    def prepare(self, step: int, layout: Sequence[ShardMeta] = ()) -> str:
        self.fs.makedirs(self.root)
        staging = os.path.join(self.root, f"{TMP_PREFIX}{step_dirname(step)}-{uuid.uuid4().hex[:8]}")
        self.fs.mkdir(staging)  # a new directory of our own, never a name someone planted
        return staging

    def _here(self, staging: str) -> str:
        """The staging directory under *this* root (rank 0's path names it on rank 0's host)."""
        return os.path.join(self.root, os.path.basename(staging))

    def adopt(self, staging: str) -> bool:
        staging = self._here(staging)
        self.fs.makedirs(self.root)
        try:
            self.fs.mkdir(staging)
        except FileExistsError:
            return False  # rank 0 (or a peer on this node) made it: shared storage
        return True

    def write_rank(self, staging: str, payload: RankPayload) -> RankRecords:
        staging = self._here(staging)
        self.fs.makedirs(staging)
        name = segment_name(payload.rank)
        rank = payload.rank
        # The blob first, then the small whole tensors packed tightly (100k tiny tensors take
        # their bytes, not 4 KiB each) and grouped into packs of one CRC each, then the rest,
        # large shards on 4 KiB boundaries (O_DIRECT writes them straight from memory).
        shards = payload.shards
        small = [i for i, s in enumerate(shards) if _packable(s)]
        if len(small) < 2:
            small = []
        chosen = set(small)
        order = small + [i for i in range(len(shards)) if i not in chosen]
        sizes = [len(payload.blob)] + [shards[i].data.numel() for i in order]
        placed, end = plan_offsets(sizes, pack_below=PACK_BELOW)
        offset = [0] * len(shards)
        for i, at in zip(order, placed[1:]):
            offset[i] = at
        packs, keep = _packs(shards, small, offset, rank, name, engine=self.fs.engine)
        items = [(placed[0], _buffer_address(payload.blob), sizes[0])]
        for p, data in zip(packs, keep):
            items.append((p.offset, int(data.data_ptr()), p.nbytes))
        in_pack = {i: p for p, members in packs.items() for i in members}
        rest = [i for i in order if i not in in_pack]
        for i in rest:
            items.append((offset[i], int(shards[i].data.data_ptr()), shards[i].data.numel()))
        # Bytes staged without a checksum (the blocking path) get theirs in the write's pass.
        need_crc = any(shards[i].crc32c is None for i in rest)
        crcs = self.fs.write_segment(os.path.join(staging, name), items, direct=self.direct_io, crc=need_crc) or []
        del keep
        records: list[tuple[str, ShardRecord] | None] = [None] * len(shards)
        for i, s in enumerate(shards):
            pack = in_pack.get(i)
            if pack is not None:
                n = s.data.numel()
                records[i] = (s.key, ShardRecord(rank, name, offset[i], n, pack.crc32c, s.offsets, s.shape, pack))
        for j, i in enumerate(rest, 1 + len(packs)):
            s = shards[i]
            crc = s.crc32c if s.crc32c is not None else crcs[j]
            records[i] = (s.key, ShardRecord(rank, name, offset[i], s.data.numel(), crc, s.offsets, s.shape))
        blob_rec = BlobRecord(rank, name, placed[0], sizes[0], crcs[0] if crcs else crc32c(payload.blob, engine=self.fs.engine))
        return RankRecords(rank, blob_rec, [r for r in records if r is not None], {name: end})

    def commit(self, step: int, staging: str, manifest: Manifest, *, rank: int = 0) -> None:
        staging = self._here(staging)
        self.faults.reached("before_manifest", step=step, rank=rank)
        here = [f for f in sorted(manifest.files) if self.fs.size(os.path.join(staging, f)) is not None]
        if len(here) < len(manifest.files):  # node-local disks: the other hosts hold the rest
            manifest = dataclasses.replace(manifest, held=tuple(here))
        check_manifest(manifest, where=f"{self._step_dir(step)}/{MANIFEST_NAME}")  # never commit what readers refuse
        self.fs.write_file(os.path.join(staging, MANIFEST_NAME), manifest.to_bytes(engine=self.fs.engine), new=True)
        self.fs.fsync_dir(staging)
        self.faults.reached("after_manifest", step=step, rank=rank)
        final = self._step_dir(step)
        if self.fs.exists(final):
            warnings.warn(f"{final}: replacing an existing committed step {step}", stacklevel=3)
            self._unpublish(final)
        self.fs.rename(staging, final)
        try:
            self.fs.fsync_dir(self.root)
        except OSError:
            self._unpublish(final)  # the rename may not be durable: never report it committed
            raise
        self.faults.reached("after_rename", step=step, rank=rank)
        try:
            self._write_latest(step)
        except OSError as e:  # the step is committed; `latest` is only a hint
            warnings.warn(f"{self.root}/{LATEST}: could not point it at step {step}: {e}", stacklevel=3)
        self.faults.reached("after_latest", step=step, rank=rank)

    def abort(self, staging: str) -> None:
        self.fs.remove_tree(self._here(staging))

    def _write_latest(self, step: int) -> None:
        tmp = os.path.join(self.root, f"{TMP_PREFIX}{LATEST}-{uuid.uuid4().hex[:8]}")
        try:
            self.fs.write_file(tmp, (step_dirname(step) + "\n").encode(), new=True)
            # rename replaces whatever has the name `latest` (a planted symlink itself, not its target)
            self.fs.replace(tmp, os.path.join(self.root, LATEST))
        except OSError:
            try:  # leave no temporary bytes behind (start-up cleanup would find them later)
                self.fs.remove(tmp)
            except OSError:
                pass
            raise
        self.fs.fsync_dir(self.root)

    # ----------------------------------------------------------------- reading
    def steps(self) -> list[int]:
        """Committed steps: real ``step-*`` directories holding a regular ``manifest.json``.

        Nothing is opened and nothing is followed: a symlink named like a step (to a
        directory anywhere), a foreign file, or a step whose manifest is a symlink, FIFO or
        other special file is not a step, so discovery never reads outside the root or
        blocks. (The root itself may be a symlink: it is the user's.)
        """
        if not self.fs.is_dir(self.root, follow_symlinks=True):
            return []
        found = []
        for name in self.fs.listdir(self.root):
            step = parse_step_dirname(name)
            if step is None:
                continue
            path = os.path.join(self.root, name)
            if self.fs.is_dir(path) and self.fs.is_file(os.path.join(path, MANIFEST_NAME)):
                found.append(step)
        return sorted(found)

    def latest_hint(self) -> int | None:
        """The step ``latest`` names (a hint; discovery scans and verifies).

        None when ``latest`` is missing, unreadable, not a regular file (a FIFO is never
        waited on, a symlink never followed), longer than a step name could be, or garbage.
        """
        try:  # `latest` holds one step directory name: 4 KiB is plenty
            text = self.fs.read_file(os.path.join(self.root, LATEST), max_bytes=4096).decode().strip()
        except (OSError, ValueError):  # IntegrityError and UnicodeDecodeError are ValueErrors
            return None
        return parse_step_dirname(text)

    def manifest(self, step: int) -> Manifest:
        where = self._step_dir(step)
        path = os.path.join(where, MANIFEST_NAME)
        try:
            data = self.fs.read_file(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{where}: no committed step {step} (no {MANIFEST_NAME})") from None
        manifest = Manifest.from_bytes(data, path=path, engine=self.fs.engine)
        if manifest.step != step:
            raise IntegrityError(f"{path}: manifest is for step {manifest.step}, directory says {step}", path=path)
        manifest.check_files({f: self.fs.size(os.path.join(where, f)) for f in manifest.files}, where=where)
        return manifest

    def read(self, step: int, requests: Sequence[tuple[Region, Buffer]]) -> None:
        where = self._step_dir(step)
        by_file: dict[str, list[tuple[int, int, int, int]]] = {}
        packed: dict[PackRecord, list[tuple[ShardRecord, int]]] = {}
        for rec, buf in requests:
            name = check_name(rec.file, where=where)
            ptr = destination(buf, rec.nbytes, f"{where}/{name} at {rec.offset}")
            pack = getattr(rec, "pack", None)
            if pack is not None:  # a shard without a CRC of its own: through its verified pack
                assert isinstance(rec, ShardRecord)
                packed.setdefault(pack, []).append((rec, ptr))
                continue
            by_file.setdefault(name, []).append((rec.offset, ptr, rec.nbytes, rec.crc32c))
        for name, items in by_file.items():
            self.fs.read_segment(os.path.join(where, name), items)
        for pack, members in packed.items():
            data = self._pack_bytes(where, pack)
            base = _buffer_address(data)
            for rec, ptr in members:
                if rec.nbytes:  # the validated manifest put the shard inside its pack
                    ctypes.memmove(ptr, base + rec.offset - pack.offset, rec.nbytes)

    def _pack_bytes(self, where: str, pack: PackRecord) -> bytes:
        """A pack's verified bytes; the last few are kept, so reading its tensors one at a
        time (an export, a partial restore) reads and verifies it once."""
        check_name(pack.file, where=where)
        key = (where, pack)
        with self._packs_lock:
            data = self._packs.get(key)
        if data is not None:
            return data
        buf = bytearray(pack.nbytes)  # bounded: validated against the file's real size
        ptr = destination(buf, pack.nbytes, f"{where}/{pack.file} pack at {pack.offset}")
        self.fs.read_segment(os.path.join(where, pack.file), [(pack.offset, ptr, pack.nbytes, pack.crc32c)])
        data = bytes(buf)
        with self._packs_lock:
            self._packs[key] = data
            while len(self._packs) > _PACKS_KEPT:
                self._packs.pop(next(iter(self._packs)))
        return data

    def delete(self, step: int) -> None:
        self._unpublish(self._step_dir(step))

    def _unpublish(self, path: str) -> None:
        """Make a step unselectable with one rename, then delete its bytes.

        Only a name directly in the root is renamed (the rename moves a symlink itself), and
        :meth:`LocalFS.remove_tree` unlinks a symlink without touching its target: a step
        name planted as a symlink never leads a deletion out of the root.
        """
        if os.path.dirname(path) != self.root:
            raise ValueError(f"{path}: not a step directory of {self.root}")
        trash = os.path.join(self.root, f"{TRASH_PREFIX}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
        self.fs.rename(path, trash)
        self.fs.fsync_dir(self.root)
        self.fs.remove_tree(trash)

    def cleanup(self) -> list[str]:
        """Remove leftovers of interrupted saves and deletes (writer only, under the lock).

        A ``.tmp-*`` or ``.trash-*`` name is removed whatever it is: a real directory with
        its contents, a symlink by unlinking it (its target is never touched), a file or a
        FIFO by unlinking it.
        """
        removed: list[str] = []
        if not self.fs.is_dir(self.root, follow_symlinks=True):
            return removed
        for name in self.fs.listdir(self.root):
            if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                self.fs.remove_tree(os.path.join(self.root, name))  # lstat: never follows a symlink
                removed.append(name)
        return removed

    def step_path(self, step: int) -> str:
        return self._step_dir(step)

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.root, step_dirname(step))

    def describe(self, step: int) -> str:
        return self._step_dir(step)


def _packable(s: ShardData) -> bool:
    """A small shard that is its whole tensor (what a pack's table can describe)."""
    return s.data.numel() < PACK_BELOW and s.shape == s.global_shape and not any(s.offsets)


def _packs(
    shards: Sequence[ShardData], small: list[int], offset: list[int], rank: int, name: str,
    *, engine: Any = None,
) -> tuple[dict[PackRecord, list[int]], list[torch.Tensor]]:
    """Group the packed shards (``small``, in file order) into packs of at most PACK_BYTES,
    each within one state entry (a job loading only ``model`` never reads, nor is stopped by
    damage in, the optimizer's bytes); return each pack with its members and its bytes
    gathered in one buffer (gaps zero)."""
    import torch

    packs: dict[PackRecord, list[int]] = {}
    keep: list[torch.Tensor] = []
    zeros = torch.zeros(PACK_ALIGNMENT, dtype=torch.uint8)  # alignment gaps inside a pack
    start = 0
    while start < len(small):
        first = offset[small[start]]
        stop = start + 1
        entry = _entry(shards[small[start]].key)
        while (
            stop < len(small)
            and offset[small[stop]] + shards[small[stop]].data.numel() - first <= PACK_BYTES
            and _entry(shards[small[stop]].key) == entry
        ):
            stop += 1
        members = small[start:stop]
        parts: list[torch.Tensor] = []
        pos = first
        for i in members:
            if offset[i] > pos:
                parts.append(zeros[: offset[i] - pos])
            parts.append(shards[i].data)
            pos = offset[i] + shards[i].data.numel()
        data = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        crc = crc32c_ptr(int(data.data_ptr()), pos - first, engine=engine) if pos > first else 0
        packs[PackRecord(rank, name, first, pos - first, crc)] = members
        keep.append(data)
        start = stop
    return packs, keep


def _entry(key: str) -> str:
    """The state entry a tensor key belongs to: its first part, after a ``rank-RRRRR/``
    prefix of rank-local state."""
    head, _, rest = key.partition("/")
    if head.startswith("rank-") and rest:
        return rest.partition("/")[0]
    return head


#: packs a LocalTier keeps after reading them (each at most PACK_BYTES)
_PACKS_KEPT = 4


def _buffer_address(data: bytes) -> int:
    if not data:
        return 0
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
