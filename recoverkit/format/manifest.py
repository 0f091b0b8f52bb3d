"""The manifest: the one file that makes a step a checkpoint.

The manifest is written last, after every rank's data is durable; its presence under the
final step name is what "committed" means. It lists every tensor shard (where its bytes
live and their CRC-32C), every rank's non-tensor blob, the world layout and the run id, and
carries a checksum of itself so a torn or edited manifest is never trusted.

See ``docs/FORMAT.md`` for the reference.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import IncompatibleCheckpointError, IntegrityError
from .checksum import crc32c, hexcrc

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ShardRecord",
    "TensorRecord",
    "BlobRecord",
    "Manifest",
]

FORMAT_NAME = "recoverkit"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardRecord:
    """One rank's region of a tensor and where its bytes are.

    ``offsets``/``shape`` place the region in the tensor's global shape; ``file``,
    ``offset`` and ``nbytes`` locate its bytes; ``crc32c`` checks them.
    """

    rank: int
    file: str
    offset: int
    nbytes: int
    crc32c: int
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "file": self.file,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "crc32c": self.crc32c,
            "offsets": list(self.offsets),
            "shape": list(self.shape),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ShardRecord:
        return cls(
            rank=int(d["rank"]),
            file=str(d["file"]),
            offset=int(d["offset"]),
            nbytes=int(d["nbytes"]),
            crc32c=int(d["crc32c"]),
            offsets=tuple(int(x) for x in d["offsets"]),
            shape=tuple(int(x) for x in d["shape"]),
        )


@dataclass(frozen=True)
class TensorRecord:
    """A logical tensor: dtype, global shape and its shards (or the key it aliases)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    shards: tuple[ShardRecord, ...] = ()
    alias_of: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.alias_of is not None:
            d["alias_of"] = self.alias_of
        else:
            d["shards"] = [s.to_json() for s in self.shards]
        return d

    @classmethod
    def from_json(cls, key: str, d: Mapping[str, Any]) -> TensorRecord:
        return cls(
            key=key,
            dtype=str(d["dtype"]),
            shape=tuple(int(x) for x in d["shape"]),
            shards=tuple(ShardRecord.from_json(s) for s in d.get("shards", ())),
            alias_of=d.get("alias_of"),
        )


@dataclass(frozen=True)
class BlobRecord:
    """A rank's encoded non-tensor state (the object tree with tensor placeholders)."""

    rank: int
    file: str
    offset: int
    nbytes: int
    crc32c: int
    encoding: str = "recoverkit-json"

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "file": self.file,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "crc32c": self.crc32c,
            "encoding": self.encoding,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BlobRecord:
        return cls(
            rank=int(d["rank"]),
            file=str(d["file"]),
            offset=int(d["offset"]),
            nbytes=int(d["nbytes"]),
            crc32c=int(d["crc32c"]),
            encoding=str(d.get("encoding", "recoverkit-json")),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything needed to find, verify and restore one step.

    Example:
        >>> m = Manifest(step=3, run_id="r", world_size=1)
        >>> Manifest.from_bytes(m.to_bytes()).step
        3
    """

    step: int
    run_id: str
    world_size: int
    tensors: Mapping[str, TensorRecord] = field(default_factory=dict)
    blobs: tuple[BlobRecord, ...] = ()
    files: Mapping[str, int] = field(default_factory=dict)
    created_unix: float = field(default_factory=time.time)
    pickled: bool = False
    user_meta: Mapping[str, Any] = field(default_factory=dict)
    #: the files this copy holds when it is one host's node-local copy of the step (the
    #: other hosts' disks hold the rest); None: every file in ``files`` is here
    held: tuple[str, ...] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data and blobs the step holds."""
        return sum(t.nbytes for t in self.tensors.values()) + sum(b.nbytes for b in self.blobs)

    def blob_for(self, rank: int) -> BlobRecord:
        for b in self.blobs:
            if b.rank == rank:
                return b
        raise IncompatibleCheckpointError(f"step {self.step} has no object state for rank {rank}")

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "step": self.step,
            "run_id": self.run_id,
            "created_unix": self.created_unix,
            "world_size": self.world_size,
            "pickled": self.pickled,
            "files": dict(sorted(self.files.items())),
            "blobs": [b.to_json() for b in self.blobs],
            "tensors": {k: t.to_json() for k, t in self.tensors.items()},
            "user_meta": dict(self.user_meta),
        } | ({"held": list(self.held)} if self.held is not None else {})

    def to_bytes(self) -> bytes:
        body = self.body()
        canonical = _canonical(body)
        body["checksum"] = hexcrc(crc32c(canonical))
        return json.dumps(body, indent=1, sort_keys=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, *, path: str = "<manifest>") -> Manifest:
        """Parse and verify a manifest; raise IntegrityError or IncompatibleCheckpointError."""
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IntegrityError(f"{path}: not valid JSON ({e})", path=path) from None
        if not isinstance(body, dict):
            raise IntegrityError(f"{path}: manifest is not a JSON object", path=path)
        if body.get("format") != FORMAT_NAME:
            raise IncompatibleCheckpointError(
                f"{path}: not a recoverkit manifest (format={body.get('format')!r})"
            )
        version = body.get("version")
        if version != FORMAT_VERSION:
            raise IncompatibleCheckpointError(
                f"{path}: format version {version!r}; this recoverkit reads version {FORMAT_VERSION}"
            )
        stored = body.pop("checksum", None)
        found = hexcrc(crc32c(_canonical(body)))
        if stored != found:
            raise IntegrityError(
                f"{path}: manifest checksum mismatch (stored {stored}, computed {found})", path=path
            )
        try:
            return cls(
                step=int(body["step"]),
                run_id=str(body["run_id"]),
                world_size=int(body["world_size"]),
                created_unix=float(body["created_unix"]),
                pickled=bool(body.get("pickled", False)),
                files={str(k): int(v) for k, v in body["files"].items()},
                blobs=tuple(BlobRecord.from_json(b) for b in body["blobs"]),
                tensors={k: TensorRecord.from_json(k, t) for k, t in body["tensors"].items()},
                user_meta=dict(body.get("user_meta", {})),
                held=tuple(str(f) for f in body["held"]) if body.get("held") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"{path}: malformed manifest field ({e!r})", path=path) from None

    def check_files(self, sizes: Mapping[str, int | None], *, where: str) -> None:
        """Raise IntegrityError if a listed file is missing or shorter than recorded."""
        for name, size in self.files.items():
            if self.held is not None and name not in self.held:
                continue  # on another host's disk
            found = sizes.get(name)
            if found is None:
                raise IntegrityError(f"{where}/{name}: file listed in the manifest is missing", path=f"{where}/{name}")
            if found != size:
                raise IntegrityError(
                    f"{where}/{name}: size {found} bytes, manifest records {size}", path=f"{where}/{name}"
                )


def file_sizes(records: Iterable[ShardRecord | BlobRecord]) -> dict[str, int]:
    """The size each file must have: the end of its last region."""
    sizes: dict[str, int] = {}
    for r in records:
        sizes[r.file] = max(sizes.get(r.file, 0), r.offset + r.nbytes)
    return sizes


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
