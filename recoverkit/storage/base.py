"""The storage-tier interface.

A tier is a place a step can be committed to and restored from: node-local disk (segment
files), a persistent store (zarr via tensorstore). One implementation per module.

Call order for one step, and which rank calls what::

    every rank:            its shard layout -> coordinator     (only if tier.needs_layout)
    coordinator (rank 0):  staging = tier.prepare(step, layout) -> shared with every rank
    every rank:            records = tier.write_rank(staging, payload)   (durable on return)
    coordinator:           tier.commit(step, staging, manifest)  if every rank succeeded
                           tier.abort(staging)                   otherwise

``commit`` writes the manifest last and makes the step selectable atomically; nothing a
crash leaves behind before that point is ever listed by :meth:`Tier.steps`.
"""

from __future__ import annotations

import ctypes
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union, cast

from ..format.manifest import BlobRecord, Manifest, PackRecord, ShardRecord

__all__ = ["Buffer", "Region", "destination", "ShardMeta", "ShardData", "RankPayload", "RankRecords", "ReadableTier", "Tier"]

#: where a read lands: a contiguous CPU tensor, a bytearray or a writable memoryview
if TYPE_CHECKING:  # the read path never needs torch: a tensor destination means torch is loaded
    import torch

Buffer = Union["torch.Tensor", bytearray, memoryview]
#: what a read names: a tensor shard, a rank's object blob, or a whole pack of small tensors
Region = ShardRecord | BlobRecord | PackRecord


def destination(buf: Buffer, nbytes: int, what: str) -> int:
    """The address of ``buf`` after checking it holds exactly ``nbytes`` writable bytes.

    Every tier calls this on every read request before it hands a pointer to the engine.

    Example:
        >>> destination(bytearray(4), 4, "x") != 0
        True
    """
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None and isinstance(buf, torch_mod.Tensor):
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError(f"{what}: a read needs a contiguous CPU tensor, got {buf.device} strides {buf.stride()}")
        size, ptr = buf.numel() * buf.element_size(), int(buf.data_ptr())
    else:
        view = memoryview(cast("bytearray | memoryview", buf))
        if view.readonly or not view.c_contiguous:
            raise ValueError(f"{what}: a read needs a writable contiguous buffer")
        size = view.nbytes
        ptr = ctypes.addressof(ctypes.c_char.from_buffer(view)) if size else 0
    if size != nbytes:
        raise ValueError(f"{what}: the destination holds {size} bytes, the record {nbytes}")
    return ptr


@dataclass(frozen=True)
class ShardMeta:
    """A shard's place without its bytes: what the coordinator needs to lay out a step."""

    key: str
    dtype: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    def to_json(self) -> list[Any]:
        return [self.key, self.dtype, list(self.global_shape), list(self.offsets), list(self.shape)]

    @classmethod
    def from_json(cls, d: list[Any]) -> ShardMeta:
        return cls(str(d[0]), str(d[1]), tuple(d[2]), tuple(d[3]), tuple(d[4]))


@dataclass
class ShardData:
    """One tensor shard a rank writes: its place in the global tensor and its bytes.

    ``data`` is a contiguous 1-D uint8 CPU tensor holding the shard's bytes; ``crc32c`` is
    the checksum when the stager already computed it, else None and the tier computes it.
    """

    key: str
    dtype: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    data: torch.Tensor
    crc32c: int | None = None


@dataclass
class RankPayload:
    """Everything one rank contributes to a step."""

    rank: int
    blob: bytes
    shards: list[ShardData] = field(default_factory=list)
    #: set when this rank cannot contribute (e.g. its save was skipped): it still takes
    #: part in the commit and reports this, so the step fails on every rank alike
    error: BaseException | None = None


@dataclass
class RankRecords:
    """What a rank reports to the coordinator after its data is durable."""

    rank: int
    blob: BlobRecord
    shards: list[tuple[str, ShardRecord]]
    files: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "blob": self.blob.to_json(),
            "shards": [[k, s.to_json()] for k, s in self.shards],
            "files": self.files,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RankRecords:
        return cls(
            rank=int(d["rank"]),
            blob=BlobRecord.from_json(d["blob"]),
            shards=[(str(k), ShardRecord.from_json(s, packs=True)) for k, s in d["shards"]],
            files={str(k): int(v) for k, v in d["files"].items()},
        )


class ReadableTier(ABC):
    """A place committed steps can be restored from."""

    name: str
    #: every view :meth:`memory_view` returns was already checked against its record's CRC
    #: and stays unchanged until the restore ends (see there); the in-place path then makes
    #: no CRC pass of its own over this tier's views
    views_verified: bool = False

    @abstractmethod
    def steps(self) -> list[int]:
        """Committed steps, ascending (cheap: does not verify data)."""

    @abstractmethod
    def manifest(self, step: int) -> Manifest:
        """The step's verified manifest; raises IntegrityError / CheckpointNotFoundError."""

    @abstractmethod
    def read(self, step: int, requests: Sequence[tuple[Region, Buffer]]) -> None:
        """Read each record's bytes into its paired buffer, verifying CRCs (a packed shard's
        through its whole pack).

        A buffer is a contiguous CPU tensor, a ``bytearray`` or a writable ``memoryview`` of
        exactly the record's ``nbytes`` (:func:`destination` checks it before any byte moves,
        so no read can run past its destination).
        """

    def describe(self, step: int) -> str:
        """Where the step lives, for messages."""
        return f"{self.name} step {step}"

    def memory_view(self, step: int, rec: Region) -> memoryview | None:
        """A read-only view of ``rec``'s bytes when this tier holds them in memory, else None.

        Optional (the default: None, the bytes come through :meth:`read`). A tier that holds a
        step in memory (a host snapshot: its pool range; shared memory: its mapped slot; bytes
        fetched from a peer) returns exactly ``rec.nbytes`` bytes, after checking that the
        region lies inside what it holds (ValueError otherwise, naming it). The bytes are
        **not** verified here: the caller checks them against ``rec.crc32c`` (a packed shard's
        through its pack: ask for the :class:`PackRecord`) before it uses them, which is how
        restore copies a step straight into live tensors (``restore.in_place``: every CRC,
        then every check, then the copies). The view must stay valid, and its bytes
        unchanged, while the tier holds the step: a tier that may give a step up meanwhile
        (a snapshot evicted by a newer save) keeps it for as long as a view of it is alive,
        or is only read while nothing writes (a Checkpointer settles its saves before it
        restores).

        ``views_verified`` (a class or instance attribute, default False) lets a tier that
        checks the bytes itself spare restore the second pass: set to True, it promises that
        every view it returns was already CRC-checked against ``rec.crc32c`` (the tier fetched
        or mapped the bytes and verified them on the way) and cannot change until the restore
        that asked for it ends; the in-place path then trusts those views and checks only
        the others. Only the value True counts; a tier that cannot keep that promise (its
        memory may be written meanwhile, or it checks lazily) leaves the flag False, and its
        views are checked before any byte is used, as above.

        Example:
            >>> class Disk(ReadableTier):
            ...     name = "disk"
            ...     def steps(self): return []
            ...     def manifest(self, step): raise FileNotFoundError(step)
            ...     def read(self, step, requests): pass
            >>> Disk().memory_view(1, BlobRecord(0, "f", 0, 4, 0)) is None
            True
        """
        return None


class Tier(ReadableTier):
    """A storage level that steps are committed to (see the module docstring for the order)."""

    #: whether ``prepare`` needs every rank's shard layout (gathered before it is called)
    needs_layout: bool = False

    @abstractmethod
    def prepare(self, step: int, layout: Sequence[ShardMeta] = ()) -> str:
        """Coordinator: create the step's staging area; return its id for every rank.

        ``layout`` lists every rank's shards when ``needs_layout`` is set.
        """

    def adopt(self, staging: str) -> bool:
        """Ranks other than 0, before writing: make ``staging`` exist on this rank's storage.

        True when this rank created it: its storage is not rank 0's (a node-local disk on
        another host), and it commits the step there too, with the same manifest. Exactly
        one rank per separate storage gets True. The default is shared storage: False.
        """
        return False

    @abstractmethod
    def write_rank(self, staging: str, payload: RankPayload) -> RankRecords:
        """Every rank: write its payload into the staging area; durable on return."""

    @abstractmethod
    def commit(self, step: int, staging: str, manifest: Manifest, *, rank: int = 0) -> None:
        """Coordinator (and the rank that adopted a separate storage): write the manifest
        last and make the step selectable atomically."""

    @abstractmethod
    def abort(self, staging: str) -> None:
        """Coordinator (and adopters): remove an uncommitted staging area."""

    @abstractmethod
    def delete(self, step: int) -> None:
        """Remove a committed step (unselectable first, then its data)."""
