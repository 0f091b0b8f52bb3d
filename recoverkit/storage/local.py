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

import dataclasses
import os
import uuid
import warnings
from collections.abc import Sequence

from ..errors import CheckpointNotFoundError, IntegrityError
from ..format.checksum import crc32c
from ..format.manifest import MANIFEST_NAME, BlobRecord, Manifest, ShardRecord
from ..format.segment import PACK_BELOW, plan_offsets, segment_name
from ..format.validate import check_manifest, check_name
from .base import Buffer, RankPayload, RankRecords, ShardMeta, Tier, destination
from .faults import FaultInjector
from .fs import LocalFS
from .layout import LATEST, TMP_PREFIX, TRASH_PREFIX, parse_step_dirname, step_dirname

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
        # Large shards on 4 KiB boundaries (O_DIRECT writes them straight from memory),
        # small ones packed tightly: 100k tiny tensors take their bytes, not 4 KiB each.
        sizes = [len(payload.blob)]
        ptrs = [_buffer_address(payload.blob)]
        for s in payload.shards:
            sizes.append(s.data.numel())
            ptrs.append(s.data.data_ptr())
        offsets, end = plan_offsets(sizes, pack_below=PACK_BELOW)
        items = list(zip(offsets, ptrs, sizes))
        # Bytes staged without a checksum (the blocking path) get theirs in the write's pass.
        need_crc = any(s.crc32c is None for s in payload.shards)
        crcs = self.fs.write_segment(os.path.join(staging, name), items, direct=self.direct_io, crc=need_crc) or []
        shards = []
        for i, s in enumerate(payload.shards, 1):
            crc = s.crc32c if s.crc32c is not None else crcs[i]
            shards.append((s.key, ShardRecord(rank, name, offsets[i], sizes[i], crc, s.offsets, s.shape)))
        blob_rec = BlobRecord(rank, name, offsets[0], sizes[0], crcs[0] if crcs else crc32c(payload.blob))
        return RankRecords(rank, blob_rec, shards, {name: end})

    def commit(self, step: int, staging: str, manifest: Manifest, *, rank: int = 0) -> None:
        staging = self._here(staging)
        self.faults.reached("before_manifest", step=step, rank=rank)
        here = [f for f in sorted(manifest.files) if self.fs.size(os.path.join(staging, f)) is not None]
        if len(here) < len(manifest.files):  # node-local disks: the other hosts hold the rest
            manifest = dataclasses.replace(manifest, held=tuple(here))
        check_manifest(manifest, where=f"{self._step_dir(step)}/{MANIFEST_NAME}")  # never commit what readers refuse
        self.fs.write_file(os.path.join(staging, MANIFEST_NAME), manifest.to_bytes(), new=True)
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
        manifest = Manifest.from_bytes(data, path=path)
        if manifest.step != step:
            raise IntegrityError(f"{path}: manifest is for step {manifest.step}, directory says {step}", path=path)
        manifest.check_files({f: self.fs.size(os.path.join(where, f)) for f in manifest.files}, where=where)
        return manifest

    def read(self, step: int, requests: Sequence[tuple[ShardRecord | BlobRecord, Buffer]]) -> None:
        where = self._step_dir(step)
        by_file: dict[str, list[tuple[int, int, int, int]]] = {}
        for rec, buf in requests:
            name = check_name(rec.file, where=where)
            ptr = destination(buf, rec.nbytes, f"{where}/{name} at {rec.offset}")
            by_file.setdefault(name, []).append((rec.offset, ptr, rec.nbytes, rec.crc32c))
        for name, items in by_file.items():
            self.fs.read_segment(os.path.join(where, name), items)

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


def _buffer_address(data: bytes) -> int:
    import ctypes

    if not data:
        return 0
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
