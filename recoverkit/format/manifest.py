"""The manifest: the one file that makes a step a checkpoint.

The manifest is written last, after every rank's data is durable; its presence under the
final step name is what "committed" means. It lists every tensor shard (where its bytes
live and their CRC-32C), every rank's non-tensor blob, the world layout and the run id, and
carries a checksum of itself so a torn or edited manifest is never trusted.

See ``docs/FORMAT.md`` for the reference.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import IncompatibleCheckpointError, IntegrityError
from .checksum import crc32c, hexcrc
from .validate import check_manifest

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
    def from_json(cls, d: Any) -> ShardRecord:
        """Parse strictly: the exact fields, integers where integers belong (else ValueError)."""
        if type(d) is dict and d.keys() == _SHARD_FIELDS:  # the fast path of a well-formed record
            offsets, shape = d["offsets"], d["shape"]
            rank, file, offset, nbytes, crc = d["rank"], d["file"], d["offset"], d["nbytes"], d["crc32c"]
            if (
                type(rank) is int and type(file) is str and type(offset) is int and type(nbytes) is int
                and type(crc) is int and type(offsets) is list and type(shape) is list
                and all(type(x) is int for x in offsets) and all(type(x) is int for x in shape)
            ):  # fmt: skip
                return cls(rank, file, offset, nbytes, crc, tuple(offsets), tuple(shape))
        _fields(d, _SHARD_FIELDS, "shard")
        return cls(
            rank=_int(d["rank"], "rank"),
            file=_str(d["file"], "file"),
            offset=_int(d["offset"], "offset"),
            nbytes=_int(d["nbytes"], "nbytes"),
            crc32c=_int(d["crc32c"], "crc32c"),
            offsets=_ints(d["offsets"], "offsets"),
            shape=_ints(d["shape"], "shape"),
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
    def from_json(cls, key: str, d: Any) -> TensorRecord:
        """Parse strictly: shards or an alias, never both (else ValueError)."""
        if type(d) is dict and d.keys() == _STORED_FIELDS:  # the fast path of a stored tensor
            dtype, shape, shards = d["dtype"], d["shape"], d["shards"]
            if type(dtype) is str and type(shape) is list and type(shards) is list and all(type(x) is int for x in shape):
                return cls(key, dtype, tuple(shape), tuple(map(ShardRecord.from_json, shards)))
        _fields(d, _TENSOR_FIELDS, f"tensor {key!r}", optional=("shards", "alias_of"))
        if ("shards" in d) == ("alias_of" in d):
            raise ValueError(f"tensor {key!r} must have exactly one of 'shards' and 'alias_of'")
        return cls(
            key=key,
            dtype=_str(d["dtype"], "dtype"),
            shape=_ints(d["shape"], "shape"),
            shards=tuple(ShardRecord.from_json(s) for s in _list(d.get("shards", []), "shards")),
            alias_of=_str(d["alias_of"], "alias_of") if "alias_of" in d else None,
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
    def from_json(cls, d: Any) -> BlobRecord:
        """Parse strictly: the exact fields, integers where integers belong (else ValueError)."""
        _fields(d, _BLOB_FIELDS, "blob", optional=("encoding",))
        return cls(
            rank=_int(d["rank"], "rank"),
            file=_str(d["file"], "file"),
            offset=_int(d["offset"], "offset"),
            nbytes=_int(d["nbytes"], "nbytes"),
            crc32c=_int(d["crc32c"], "crc32c"),
            encoding=_str(d.get("encoding", "recoverkit-json"), "encoding"),
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
        """The manifest as written: its canonical JSON with the checksum member in place.

        The checksum is the CRC-32C of the canonical JSON of every other field; as the file is
        that same text with ``"checksum"`` inserted where it sorts (after ``"blobs"``), a
        reader verifies it over the raw bytes without encoding the manifest again.
        """
        canonical = _canonical(self.body())
        at = canonical.index(b',"created_unix":')  # "checksum" sorts between "blobs" and it
        member = b',"checksum":"' + hexcrc(crc32c(canonical)).encode() + b'"'
        return canonical[:at] + member + canonical[at:]

    @classmethod
    def from_bytes(cls, data: bytes, *, path: str = "<manifest>", arrays: bool = False) -> Manifest:
        """Parse and validate a manifest; raise IntegrityError or IncompatibleCheckpointError.

        The JSON is parsed strictly (no NaN or Infinity, no duplicate keys, integers where
        integers belong) and every record is checked against its tensor and its file by
        :func:`recoverkit.format.validate.check_manifest` before the manifest is returned.
        ``arrays`` selects the zarr tier's layout (shards in arrays, not in listed files).
        """
        try:
            text = data.decode("utf-8")
            body = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite)
        except (UnicodeDecodeError, ValueError, RecursionError, MemoryError) as e:
            raise IntegrityError(f"{path}: not valid JSON ({_short(e)})", path=path) from None
        if not isinstance(body, dict):
            raise IntegrityError(f"{path}: manifest is not a JSON object", path=path)
        if body.get("format") != FORMAT_NAME:
            raise IncompatibleCheckpointError(
                f"{path}: not a recoverkit manifest (format={_short(body.get('format'))})"
            )
        version = body.get("version")
        if version != FORMAT_VERSION or type(version) is not int:
            raise IncompatibleCheckpointError(
                f"{path}: format version {_short(version)}; this recoverkit reads version {FORMAT_VERSION}"
            )
        stored = body.pop("checksum", None)
        if stored is None or stored != _raw_checksum(data):  # not as written: encode to check
            try:
                found = hexcrc(crc32c(_canonical(body)))
            except (ValueError, RecursionError) as e:
                raise IntegrityError(f"{path}: manifest cannot be checked ({_short(e)})", path=path) from None
        else:
            found = stored
        if stored != found:
            raise IntegrityError(
                f"{path}: manifest checksum mismatch (stored {_short(stored)}, computed {found})", path=path
            )
        try:
            _fields(body, _MANIFEST_FIELDS, "manifest", optional=("held", "pickled", "user_meta"))
            created = body["created_unix"]
            if type(created) not in (int, float):
                raise ValueError(f"created_unix must be a number, got {_short(created)}")
            user_meta = body.get("user_meta", {})
            if not isinstance(user_meta, dict):
                raise ValueError("user_meta must be a JSON object")
            pickled = body.get("pickled", False)
            if type(pickled) is not bool:
                raise ValueError(f"pickled must be true or false, got {_short(pickled)}")
            held = body.get("held")
            manifest = cls(
                step=_int(body["step"], "step"),
                run_id=_str(body["run_id"], "run_id"),
                world_size=_int(body["world_size"], "world_size"),
                created_unix=float(created),
                pickled=pickled,
                files={_str(k, "file name"): _int(v, f"size of {k!r}") for k, v in _dict(body["files"], "files").items()},
                blobs=tuple(BlobRecord.from_json(b) for b in _list(body["blobs"], "blobs")),
                tensors={k: TensorRecord.from_json(k, t) for k, t in _dict(body["tensors"], "tensors").items()},
                user_meta=user_meta,
                held=None if held is None else tuple(_str(f, "held file") for f in _list(held, "held")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise IntegrityError(f"{path}: malformed manifest ({_short(e)})", path=path) from None
        check_manifest(manifest, where=path, arrays=arrays)
        return manifest

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
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


_CHECKSUM_MEMBER = b',"checksum":"0x'


def _raw_checksum(data: bytes) -> str | None:
    """The checksum of a manifest written by :meth:`Manifest.to_bytes`, computed over its raw
    bytes without the checksum member; None when the file is not laid out that way."""
    at = data.find(_CHECKSUM_MEMBER)
    end = at + len(_CHECKSUM_MEMBER) + 9
    if at < 0 or data[end - 1 : end] != b'"':
        return None
    return hexcrc(crc32c(data[:at] + data[end:]))


# ------------------------------------------------------------------ strict JSON parsing
_SHARD_FIELDS = frozenset({"rank", "file", "offset", "nbytes", "crc32c", "offsets", "shape"})
_BLOB_FIELDS = frozenset({"rank", "file", "offset", "nbytes", "crc32c", "encoding"})
_TENSOR_FIELDS = frozenset({"dtype", "shape", "shards", "alias_of"})
_STORED_FIELDS = frozenset({"dtype", "shape", "shards"})
_MANIFEST_FIELDS = frozenset({
    "format", "version", "step", "run_id", "created_unix", "world_size", "pickled", "files", "blobs",
    "tensors", "user_meta", "held",
})  # fmt: skip


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {_short(dup)}")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {_short(text)} is out of range")
    return value


def _fields(d: Any, allowed: frozenset[str], what: str, *, optional: tuple[str, ...] = ()) -> None:
    if type(d) is not dict:
        raise TypeError(f"{what} must be a JSON object, got {type(d).__name__}")
    keys = d.keys()
    if keys <= allowed and len(keys) + len(optional) >= len(allowed):  # fast path: all present
        missing = [k for k in allowed if k not in keys and k not in optional]
        if not missing:
            return
    missing = sorted(k for k in allowed if k not in keys and k not in optional)
    extra = sorted(keys - allowed)
    raise ValueError(f"{what} fields: missing {missing}, unknown {[_short(k) for k in extra[:4]]}")


def _int(v: Any, what: str) -> int:
    if type(v) is not int:
        raise TypeError(f"{what} must be an integer, got {_short(v)}")
    return v


def _ints(v: Any, what: str) -> tuple[int, ...]:
    if type(v) is not list or any(type(x) is not int for x in v):
        raise TypeError(f"{what} must be a list of integers, got {_short(v)}")
    return tuple(v)


def _str(v: Any, what: str) -> str:
    if type(v) is not str:
        raise TypeError(f"{what} must be a string, got {_short(v)}")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if type(v) is not list:
        raise TypeError(f"{what} must be a list, got {type(v).__name__}")
    return v


def _dict(v: Any, what: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise TypeError(f"{what} must be a JSON object, got {type(v).__name__}")
    return v


def _short(v: Any, limit: int = 60) -> str:
    """``repr`` of a hostile value, cut short (never the whole of a huge string or number)."""
    try:
        text = repr(v) if not isinstance(v, BaseException) else str(v)
    except ValueError:  # an int too long to print
        text = f"<{type(v).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit] + "..."
