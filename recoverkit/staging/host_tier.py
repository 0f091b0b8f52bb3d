"""Tier 1 as a read-only tier: restore from the snapshots kept in host memory.

The pipeline keeps the newest ``host_keep`` staged snapshots in the pool. Restoring from
them needs no disk at all; every region is still verified against the CRC-32C the copy
engine computed while staging. A snapshot holds only this rank's shards, so this tier
serves restores in a world of one rank (peers' replicas serve larger worlds).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from ..errors import CheckpointNotFoundError, IntegrityError
from ..format.checksum import crc32c, hexcrc
from ..format.manifest import BlobRecord, Manifest, ShardRecord, TensorRecord
from ..storage.base import Buffer, ReadableTier, destination
from .pipeline import AsyncPipeline

__all__ = ["HostTier"]

_BLOB = "host:blob"
_POOL = "host:pool"


class HostTier(ReadableTier):
    name = "host"

    def __init__(self, pipeline: AsyncPipeline, *, run_id: str) -> None:
        self.pipeline = pipeline
        self.run_id = run_id

    def _snap(self, step: int):  # type: ignore[no-untyped-def]
        for snap in list(self.pipeline.host):
            if snap.step == step and not snap.released:
                return snap
        raise CheckpointNotFoundError(f"no host snapshot of step {step}")

    def steps(self) -> list[int]:
        return sorted(s.step for s in list(self.pipeline.host) if not s.released)

    def manifest(self, step: int) -> Manifest:
        snap = self._snap(step)
        tensors: dict[str, TensorRecord] = dict(snap.aliases)
        for e in snap._entries:
            p = e.shard
            rec = ShardRecord(0, _POOL, e.offset, e.nbytes, int(e.crc or 0), p.offsets, p.shape)
            prev = tensors.get(p.key)
            tensors[p.key] = TensorRecord(p.key, p.dtype, p.global_shape, (prev.shards if prev else ()) + (rec,))
        blob = BlobRecord(0, _BLOB, 0, len(snap.blob), crc32c(snap.blob))
        return Manifest(step=step, run_id=self.run_id, world_size=1, tensors=tensors, blobs=(blob,))

    def read(self, step: int, requests: Sequence[tuple[ShardRecord | BlobRecord, Buffer]]) -> None:
        """Copy each region out with the copy engine (its threads, CRC on the fly: one pass
        over the bytes) and check every CRC against the one computed while staging."""
        snap = self._snap(step)
        copies = []
        for rec, buf in requests:
            ptr = destination(buf, rec.nbytes, f"host snapshot of step {step}")
            if rec.nbytes == 0:
                continue
            if rec.file == _BLOB:
                src = ctypes.cast(ctypes.c_char_p(snap.blob), ctypes.c_void_p).value or 0
            else:
                src = self.pipeline.pool.address(rec.offset)
            copies.append((rec, self.pipeline.copier.submit(src, ptr, rec.nbytes, crc=True)))
        for _, h in copies:  # every copy has landed (or failed) before anything is judged
            h.wait()
        found_crcs = [h.result() for _, h in copies]
        for (rec, _), found in zip(copies, found_crcs):
            if found != rec.crc32c:
                raise IntegrityError(
                    f"host snapshot of step {step}: region at {rec.offset} has crc {hexcrc(found)}, "
                    f"staged {hexcrc(rec.crc32c)}"
                )

    def describe(self, step: int) -> str:
        return f"host snapshot of step {step}"
