"""Tier 3: the persistent store, a zarr v3 group per step written with tensorstore.

Layout under the store's root URL (any tensorstore kvstore: ``file://``, ``gs://``, ``s3://``),
every level a zarr v3 node (``format/zarr_layout.py`` has the names)::

    zarr.json                                  the root group (written by the first save)
    step-000001200/zarr.json                   the step group (attributes: step)
    step-000001200/model/fc.weight/…           one array per logical tensor, nested by key,
                                               global shape, chunk grid aligned to the shards
    step-000001200/.recoverkit/blobs/rank-00000/…  each rank's encoded object tree (uint8)
    step-000001200/.recoverkit/manifest/…      written last: its zarr.json present = committed

Object stores have no rename, so the commit point is one atomic object write: the
manifest's bytes (the array's one chunk) are written first, its ``zarr.json`` last. Each
rank writes only its own chunks; every chunk carries zarr's crc32c codec and every shard is
also checked against the CRC-32C in the manifest.

The injected :class:`~recoverkit.storage.faults.FaultInjector` hears the same commit
phases as the local tier's, at their equivalents here: ``before_manifest``;
``after_manifest`` once the manifest's chunk is durable and the step still unselectable;
``after_rename`` once its ``zarr.json`` is written (the commit point: no rename, the same
meaning); ``after_latest`` right after it (this tier keeps no ``latest`` pointer: the
commit is complete). ``before_data``/``after_data`` and ``retention`` are announced by the
commit protocol and the retention caller, as for every tier. The injector is also the
store's I/O seam (``kv_write``, ``kv_read``, ... operations; see ``zarr_store.py``).

Steps written by the previous layout (arrays flat under ``tensors/``, ``blobs/*.json``,
``manifest.json``) are still listed and read: the manifest found tells which, and each
record names the array or object it lives in.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..config import TierPolicy
from ..errors import CheckpointNotFoundError, IntegrityError
from ..format.checksum import crc32c, crc32c_ptr, hexcrc
from ..format.dtypes import dtype_from_name, from_bytes
from ..format.manifest import MANIFEST_NAME, BlobRecord, Manifest, ShardRecord
from ..format.validate import check_manifest, check_name
from ..format.zarr_layout import (
    BLOBS_GROUP,
    MANIFEST_ARRAY,
    ShardRegion,
    array_layout,
    array_paths,
    blob_path,
)
from .base import Buffer, RankPayload, RankRecords, Region, ShardMeta, Tier, destination
from .faults import FaultInjector
from .fs import LocalFS
from .layout import parse_step_dirname, step_dirname
from .zarr_store import ZarrStore

__all__ = ["ZarrTier"]

_MARK = f"{MANIFEST_ARRAY}/zarr.json"  # present = committed (this layout)


class ZarrTier(Tier):
    """Steps as zarr v3 groups in a tensorstore kvstore."""

    name = "persistent"
    needs_layout = True

    def __init__(
        self, url: str, *, options: TierPolicy | None = None, faults: FaultInjector | None = None, store: ZarrStore | None = None,
        fs: LocalFS | None = None,
    ) -> None:
        """``faults`` hears the commit phases and, when the store is built here, every store
        operation; ``fs`` does the store's own local-directory operations (``file://``)."""
        opts = options or TierPolicy()
        self.faults = faults or FaultInjector()
        self.store = store or ZarrStore(url, compression=opts.compression, level=opts.compression_level, fs=fs, faults=self.faults)
        self.url = self.store.url

    # ----------------------------------------------------------------- writing
    def prepare(self, step: int, layout: Sequence[ShardMeta] = ()) -> str:
        d = step_dirname(step)
        if not self.store.exists("zarr.json"):  # the root opens as a zarr group too
            self.store.write_group("", {"recoverkit": {"layout": "steps"}})
        if self.store.list_dir(d):
            if self._committed(d):
                self._unpublish(d)
            else:
                self.store.delete_prefix(d)  # leftovers of an interrupted save
        by_key: dict[str, list[ShardMeta]] = {}
        for m in layout:
            by_key.setdefault(m.key, []).append(m)
        paths = array_paths(by_key)
        layouts = [
            array_layout(k, ms[0].dtype, ms[0].global_shape, [ShardRegion(m.offsets, m.shape) for m in ms], path=paths[k])
            for k, ms in sorted(by_key.items())
        ]
        try:
            self.store.create_step(d, layouts, {"recoverkit": {"step": step}}, groups=[BLOBS_GROUP])
        except BaseException:  # no staging id reaches the protocol, so no abort: clean up here
            try:
                self.store.delete_prefix(d)
            except Exception:  # noqa: BLE001 - the next prepare of this step removes it
                pass
            raise
        return d

    def write_rank(self, staging: str, payload: RankPayload) -> RankRecords:
        items = []
        records = []
        layouts: dict[str, Any] = {}
        for s in payload.shards:
            n = int(s.data.numel())
            crc = s.crc32c if s.crc32c is not None else crc32c_ptr(int(s.data.data_ptr()), n)
            if s.key not in layouts:
                layouts[s.key] = self.store.read_layout(staging, s.key)
            tensor = from_bytes(s.data, dtype_from_name(s.dtype), s.shape)
            items.append((layouts[s.key], ShardRegion(s.offsets, s.shape), tensor))
            records.append((s.key, ShardRecord(payload.rank, layouts[s.key].path, 0, n, crc, s.offsets, s.shape)))
        self.store.write_regions(staging, items)
        blob_key = blob_path(payload.rank)
        self.store.write_bytes_array(f"{staging}/{blob_key}", payload.blob)
        blob = BlobRecord(payload.rank, blob_key, 0, len(payload.blob), crc32c(payload.blob))
        return RankRecords(payload.rank, blob, records, {blob_key: len(payload.blob)})

    def commit(self, step: int, staging: str, manifest: Manifest, *, rank: int = 0) -> None:
        self.faults.reached("before_manifest", step=step, rank=rank)
        check_manifest(manifest, where=f"{self.url}/{staging}/{MANIFEST_ARRAY}", arrays=True)  # readable back
        self.store.write_bytes_array(
            f"{staging}/{MANIFEST_ARRAY}", manifest.to_bytes(),
            before_publish=lambda: self.faults.reached("after_manifest", step=step, rank=rank),
        )
        self.faults.reached("after_rename", step=step, rank=rank)  # its zarr.json: the commit point
        self.faults.reached("after_latest", step=step, rank=rank)  # no `latest` here: committed

    def abort(self, staging: str) -> None:
        self.store.delete_prefix(staging)

    # ----------------------------------------------------------------- reading
    def steps(self) -> list[int]:
        out = []
        for name in self.store.list_dir(""):
            s = parse_step_dirname(name.rstrip("/"))
            if s is not None and self._committed(step_dirname(s)):
                out.append(s)
        return sorted(out)

    def manifest(self, step: int) -> Manifest:
        d = step_dirname(step)
        legacy = self._legacy(d)
        if legacy is None:
            raise CheckpointNotFoundError(f"{self.url}/{d}: no committed step {step}")
        key = f"{d}/{MANIFEST_NAME}" if legacy else f"{d}/{MANIFEST_ARRAY}"
        data = self.store.read_bytes(key) if legacy else self.store.read_bytes_array(key)
        manifest = Manifest.from_bytes(data, path=f"{self.url}/{key}", arrays=True)
        if manifest.step != step:
            raise IntegrityError(f"{self.url}/{key}: manifest is for step {manifest.step}", path=key)
        for name, size in manifest.files.items():  # the blobs: their real sizes bound every read of them
            found = self._blob_size(d, name)
            if found != size:
                what = "is missing" if found is None else f"is {found} bytes, the manifest records {size}"
                raise IntegrityError(f"{self.url}/{d}/{name}: file listed in the manifest {what}", path=name)
        return manifest

    def read(self, step: int, requests: Sequence[tuple[Region, Buffer]]) -> None:
        d = step_dirname(step)
        index: dict[ShardRecord, str] | None = None
        manifest = None
        for rec, buf in requests:
            ptr = destination(buf, rec.nbytes, f"{self.url}/{d}/{rec.file}")
            if isinstance(rec, BlobRecord):
                key = f"{d}/{check_name(rec.file, where=f'{self.url}/{d}', nested=True)}"
                data = self.store.read_bytes(key) if self._legacy_blob(rec.file) else self.store.read_bytes_array(key)
                if len(data) != rec.nbytes or crc32c(data) != rec.crc32c:
                    raise IntegrityError(f"{self.url}/{key}: object state fails its checksum", path=rec.file)
                if data:
                    ctypes.memmove(ptr, data, len(data))
                continue
            if manifest is None or index is None:
                manifest = self.manifest(step)
                index = {sh: k for k, t in manifest.tensors.items() for sh in t.shards}
            if not isinstance(rec, ShardRecord):  # the zarr tier never packs
                raise IntegrityError(f"{self.url}/{d}: {rec.file} at {rec.offset} is not a shard of this tier")
            found_key = index.get(rec)
            if found_key is None:
                raise IntegrityError(f"{self.url}/{d}: shard {rec.file} {list(rec.offsets)} is not in the manifest")
            key = found_key
            dtype = dtype_from_name(manifest.tensors[key].dtype)
            raw = np.ctypeslib.as_array((ctypes.c_uint8 * rec.nbytes).from_address(ptr)) if rec.nbytes else np.empty(0, np.uint8)
            out = from_bytes(torch.from_numpy(raw), dtype, rec.shape)
            self.store.read_region(d, key, rec.offsets, rec.shape, out=out, path=rec.file)
            found = crc32c_ptr(ptr, rec.nbytes) if rec.nbytes else 0
            if found != rec.crc32c:
                raise IntegrityError(
                    f"{self.url}/{d}/{rec.file}: region {list(rec.offsets)} has crc {hexcrc(found)}, "
                    f"manifest records {hexcrc(rec.crc32c)}",
                    path=rec.file,
                )

    def delete(self, step: int) -> None:
        self._unpublish(step_dirname(step))

    def _unpublish(self, d: str) -> None:
        self.store.delete_prefix(f"{d}/{_MARK}")  # unselectable first (either layout)
        self.store.delete_prefix(f"{d}/{MANIFEST_NAME}")
        self.store.delete_prefix(d)

    def _committed(self, d: str) -> bool:
        return self._legacy(d) is not None

    def _legacy(self, d: str) -> bool | None:
        """Whether step ``d`` was committed by the previous layout (None: not committed)."""
        if self.store.exists(f"{d}/{_MARK}"):
            return False
        if self.store.exists(f"{d}/{MANIFEST_NAME}"):
            return True
        return None

    @staticmethod
    def _legacy_blob(name: str) -> bool:
        """Blobs of the previous layout are plain objects (``blobs/rank-NNNNN.json``)."""
        return not name.startswith(f"{BLOBS_GROUP}/")

    def _blob_size(self, d: str, name: str) -> int | None:
        key = f"{d}/{check_name(name, where=f'{self.url}/{d}', nested=True)}"
        return self.store.size(key) if self._legacy_blob(name) else self.store.bytes_array_size(key)

    def describe(self, step: int) -> str:
        return f"{self.url}/{step_dirname(step)}"

