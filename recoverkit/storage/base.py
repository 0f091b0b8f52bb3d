"""The storage-tier interface.

A tier is a place a step can be committed to and restored from: node-local disk (segment
files), a persistent store (zarr via tensorstore). One implementation per module.

Call order for one step, and which rank calls what::

    coordinator (rank 0):  staging = tier.prepare(step)    -> shared with every rank
    every rank:            records = tier.write_rank(staging, payload)   (durable on return)
    coordinator:           tier.commit(step, staging, manifest)  if every rank succeeded
                           tier.abort(staging)                   otherwise

``commit`` writes the manifest last and makes the step selectable atomically; nothing a
crash leaves behind before that point is ever listed by :meth:`Tier.steps`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..format.manifest import BlobRecord, Manifest, ShardRecord

__all__ = ["ShardData", "RankPayload", "RankRecords", "Tier"]


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


@dataclass
class RankRecords:
    """What a rank reports to the coordinator after its data is durable."""

    rank: int
    blob: BlobRecord
    shards: list[tuple[str, ShardRecord]]
    files: dict[str, int]


class Tier(ABC):
    """A storage level that holds committed steps."""

    name: str

    @abstractmethod
    def prepare(self, step: int) -> str:
        """Coordinator: create the step's staging area; return its id for every rank."""

    @abstractmethod
    def write_rank(self, staging: str, payload: RankPayload) -> RankRecords:
        """Every rank: write its payload into the staging area; durable on return."""

    @abstractmethod
    def commit(self, step: int, staging: str, manifest: Manifest) -> None:
        """Coordinator: write the manifest last and make the step selectable atomically."""

    @abstractmethod
    def abort(self, staging: str) -> None:
        """Coordinator: remove an uncommitted staging area."""

    @abstractmethod
    def steps(self) -> list[int]:
        """Committed steps, ascending (cheap: does not verify data)."""

    @abstractmethod
    def manifest(self, step: int) -> Manifest:
        """The step's verified manifest; raises IntegrityError / CheckpointNotFoundError."""

    @abstractmethod
    def read(self, step: int, requests: Sequence[tuple[ShardRecord | BlobRecord, int]]) -> None:
        """Read each record's bytes into the buffer at the paired pointer, verifying CRCs."""

    @abstractmethod
    def delete(self, step: int) -> None:
        """Remove a committed step (unselectable first, then its data)."""

    def describe(self, step: int) -> str:
        """Where the step lives, for messages."""
        return f"{self.name} step {step}"
