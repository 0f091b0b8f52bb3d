"""Tier 3: the persistent store, a zarr v3 group per step written with tensorstore.

Layout under the store's root URL (any tensorstore kvstore: ``file://``, ``gs://``, ``s3://``)::

    step-000001200/zarr.json                   the group (attributes: step, run id)
    step-000001200/<array path>/…              one array per logical tensor, global shape,
                                               chunk grid aligned to the writers' shards
    step-000001200/blobs/rank-00000.json       each rank's encoded object tree
    step-000001200/manifest.json               written last: present = committed

Object stores have no rename, so the commit point is the manifest, written last in one
atomic object write. Each rank writes only its own chunks; every chunk carries zarr's
crc32c codec and every shard is also checked against the CRC-32C in the manifest.
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
from ..format.manifest import MANIFEST_NAME, BlobRecord, Manifest, ShardRecord
from ..format.validate import check_manifest, check_name
from ..format.zarr_layout import ShardRegion, array_layout, array_path
from ..state import dtype_from_name, from_bytes
from .base import Buffer, RankPayload, RankRecords, ShardMeta, Tier, destination
from .faults import FaultInjector
from .layout import parse_step_dirname, step_dirname
from .zarr_store import ZarrStore

__all__ = ["ZarrTier"]


class ZarrTier(Tier):
    """Steps as zarr v3 groups in a tensorstore kvstore."""

    name = "persistent"
    needs_layout = True

    def __init__(self, url: str, *, options: TierPolicy | None = None, faults: FaultInjector | None = None, store: ZarrStore | None = None) -> None:
        opts = options or TierPolicy()
        self.store = store or ZarrStore(url, compression=opts.compression, level=opts.compression_level)
        self.url = self.store.url
        self.faults = faults or FaultInjector()

    # ----------------------------------------------------------------- writing
    def prepare(self, step: int, layout: Sequence[ShardMeta] = ()) -> str:
        d = step_dirname(step)
        if self.store.list_dir(d):
            if self.store.exists(f"{d}/{MANIFEST_NAME}"):
                self._unpublish(d)
            else:
                self.store.delete_prefix(d)  # leftovers of an interrupted save
        by_key: dict[str, list[ShardMeta]] = {}
        for m in layout:
            by_key.setdefault(m.key, []).append(m)
        layouts = [
            array_layout(k, ms[0].dtype, ms[0].global_shape, [ShardRegion(m.offsets, m.shape) for m in ms])
            for k, ms in sorted(by_key.items())
        ]
        self.store.create_step(d, layouts, {"recoverkit": {"step": step}})
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
            records.append((s.key, ShardRecord(payload.rank, array_path(s.key), 0, n, crc, s.offsets, s.shape)))
        self.store.write_regions(staging, items)
        blob_key = f"blobs/rank-{payload.rank:05d}.json"
        self.store.write_bytes(f"{staging}/{blob_key}", payload.blob)
        blob = BlobRecord(payload.rank, blob_key, 0, len(payload.blob), crc32c(payload.blob))
        return RankRecords(payload.rank, blob, records, {blob_key: len(payload.blob)})

    def commit(self, step: int, staging: str, manifest: Manifest, *, rank: int = 0) -> None:
        self.faults.reached("before_manifest", step=step, rank=rank)
        check_manifest(manifest, where=f"{self.url}/{staging}/{MANIFEST_NAME}", arrays=True)  # readable back
        self.store.write_bytes(f"{staging}/{MANIFEST_NAME}", manifest.to_bytes())
        self.faults.reached("after_rename", step=step, rank=rank)

    def abort(self, staging: str) -> None:
        self.store.delete_prefix(staging)

    # ----------------------------------------------------------------- reading
    def steps(self) -> list[int]:
        out = []
        for name in self.store.list_dir(""):
            s = parse_step_dirname(name.rstrip("/"))
            if s is not None and self.store.exists(f"{step_dirname(s)}/{MANIFEST_NAME}"):
                out.append(s)
        return sorted(out)

    def manifest(self, step: int) -> Manifest:
        d = step_dirname(step)
        key = f"{d}/{MANIFEST_NAME}"
        if not self.store.exists(key):
            raise CheckpointNotFoundError(f"{self.url}/{d}: no committed step {step}")
        manifest = Manifest.from_bytes(self.store.read_bytes(key), path=f"{self.url}/{key}", arrays=True)
        if manifest.step != step:
            raise IntegrityError(f"{self.url}/{key}: manifest is for step {manifest.step}", path=key)
        for name, size in manifest.files.items():  # the blobs: their real sizes bound every read of them
            found = self.store.size(f"{d}/{name}")
            if found != size:
                what = "is missing" if found is None else f"is {found} bytes, the manifest records {size}"
                raise IntegrityError(f"{self.url}/{d}/{name}: file listed in the manifest {what}", path=name)
        return manifest

    def read(self, step: int, requests: Sequence[tuple[ShardRecord | BlobRecord, Buffer]]) -> None:
        d = step_dirname(step)
        index: dict[ShardRecord, str] | None = None
        manifest = None
        for rec, buf in requests:
            ptr = destination(buf, rec.nbytes, f"{self.url}/{d}/{rec.file}")
            if isinstance(rec, BlobRecord):
                key = f"{d}/{check_name(rec.file, where=f'{self.url}/{d}', nested=True)}"
                data = self.store.read_bytes(key)
                if len(data) != rec.nbytes or crc32c(data) != rec.crc32c:
                    raise IntegrityError(f"{self.url}/{key}: object state fails its checksum", path=rec.file)
                if data:
                    ctypes.memmove(ptr, data, len(data))
                continue
            if manifest is None or index is None:
                manifest = self.manifest(step)
                index = {sh: k for k, t in manifest.tensors.items() for sh in t.shards}
            key = index.get(rec)
            if key is None:
                raise IntegrityError(f"{self.url}/{d}: shard {rec.file} {list(rec.offsets)} is not in the manifest")
            dtype = dtype_from_name(manifest.tensors[key].dtype)
            raw = np.ctypeslib.as_array((ctypes.c_uint8 * rec.nbytes).from_address(ptr)) if rec.nbytes else np.empty(0, np.uint8)
            out = from_bytes(torch.from_numpy(raw), dtype, rec.shape)
            self.store.read_region(d, key, rec.offsets, rec.shape, out=out)
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
        self.store.delete_prefix(f"{d}/{MANIFEST_NAME}")  # unselectable first
        self.store.delete_prefix(d)

    def describe(self, step: int) -> str:
        return f"{self.url}/{step_dirname(step)}"

