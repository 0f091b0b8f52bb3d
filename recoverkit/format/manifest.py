"""The manifest: the one file that makes a step a checkpoint.

The manifest is written last, after every rank's data is durable; its presence under the
final step name is what "committed" means. It lists every tensor shard (where its bytes
live and their CRC-32C), every rank's non-tensor blob, the world layout and the run id, and
carries a checksum of itself so a torn or edited manifest is never trusted.

See ``docs/FORMAT.md`` for the reference.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import IncompatibleCheckpointError, IntegrityError
from ..gcpause import paused
from . import xz
from .checksum import crc32c, hexcrc
from .validate import check_manifest

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PackRecord",
    "ShardRecord",
    "TensorRecord",
    "BlobRecord",
    "Manifest",
    "local_prefix",
]

FORMAT_NAME = "recoverkit"
#: the newest version this recoverkit writes: 2 when a step packs small tensors (``packs``),
#: else 1, so a step without packs stays readable by readers of version 1
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"


def local_prefix(rank: int) -> str:
    """Namespace of rank-local tensor keys in a multi-rank checkpoint.

    Example:
        >>> local_prefix(3)
        'rank-00003'
    """
    return f"rank-{rank:05d}"


@dataclass(frozen=True)
class PackRecord:
    """A region of a segment file holding many small whole tensors, checked by one CRC.

    Its shards (:attr:`ShardRecord.pack`) lie inside it; reading one reads and verifies the
    whole pack (at most :data:`recoverkit.format.segment.PACK_BYTES`).
    """

    rank: int
    file: str
    offset: int
    nbytes: int
    crc32c: int


@dataclass(frozen=True)
class ShardRecord:
    """One rank's region of a tensor and where its bytes are.

    ``offsets``/``shape`` place the region in the tensor's global shape; ``file``,
    ``offset`` and ``nbytes`` locate its bytes; ``crc32c`` checks them. A shard stored in a
    :class:`PackRecord` (``pack``) has no checksum of its own: ``crc32c`` is its pack's, and
    a reader verifies the pack.
    """

    rank: int
    file: str
    offset: int
    nbytes: int
    crc32c: int
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    pack: PackRecord | None = None

    def to_json(self) -> dict[str, Any]:
        d = {
            "rank": self.rank,
            "file": self.file,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "crc32c": self.crc32c,
            "offsets": list(self.offsets),
            "shape": list(self.shape),
        }
        if self.pack is not None:  # between ranks only: a manifest stores packs as tables
            d["pack"] = [self.pack.offset, self.pack.nbytes, self.pack.crc32c]
        return d

    @classmethod
    def from_json(cls, d: Any, *, packs: bool = False) -> ShardRecord:
        """Parse strictly: the exact fields, integers where integers belong (else ValueError).

        ``packs``: a record exchanged between ranks may name its pack (a manifest never does).
        """
        if packs and type(d) is dict and "pack" in d:
            d = dict(d)
            where = _ints(d.pop("pack"), "pack")
            if len(where) != 3:
                raise ValueError(f"pack must be [offset, nbytes, crc32c], got {_short(where)}")
            s = cls.from_json(d)
            return dataclasses.replace(s, pack=PackRecord(s.rank, s.file, *where))
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
        tensors: dict[str, Any] = {}
        packs: dict[PackRecord, list[tuple[str, TensorRecord]]] = {}
        for k, t in self.tensors.items():
            pack = t.shards[0].pack if len(t.shards) == 1 else None
            if pack is None:
                tensors[k] = t.to_json()
            else:
                packs.setdefault(pack, []).append((k, t))
        body = {
            "format": FORMAT_NAME,
            "version": 2 if packs else 1,
            "step": self.step,
            "run_id": self.run_id,
            "created_unix": self.created_unix,
            "world_size": self.world_size,
            "pickled": self.pickled,
            "files": dict(sorted(self.files.items())),
            "blobs": [b.to_json() for b in self.blobs],
            "tensors": tensors,
            "user_meta": dict(self.user_meta),
        } | ({"held": list(self.held)} if self.held is not None else {})
        if packs:
            order = sorted(packs, key=lambda p: (p.rank, p.file, p.offset))
            body["packs"] = [_pack_to_json(p, packs[p]) for p in order]
        return body

    def to_bytes(self, *, engine: Any = None) -> bytes:
        """The manifest as written: its canonical JSON with the checksum member in place.

        The checksum is the CRC-32C of the canonical JSON of every other field; as the file is
        that same text with ``"checksum"`` inserted where it sorts (after ``"blobs"``), a
        reader verifies it over the raw bytes without encoding the manifest again.
        """
        canonical = _canonical(self.body())
        at = canonical.index(b',"created_unix":')  # "checksum" sorts between "blobs" and it
        member = b',"checksum":"' + hexcrc(crc32c(canonical, engine=engine)).encode() + b'"'
        return canonical[:at] + member + canonical[at:]

    @classmethod
    def from_bytes(
        cls, data: bytes, *, path: str = "<manifest>", arrays: bool = False, engine: Any = None
    ) -> Manifest:
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
        if version not in READ_VERSIONS or type(version) is not int:
            raise IncompatibleCheckpointError(
                f"{path}: format version {_short(version)}; this recoverkit reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}"
            )
        stored = body.pop("checksum", None)
        if stored is None or stored != _raw_checksum(data, engine):  # not as written: encode to check
            try:
                found = hexcrc(crc32c(_canonical(body), engine=engine))
            except (ValueError, RecursionError) as e:
                raise IntegrityError(f"{path}: manifest cannot be checked ({_short(e)})", path=path) from None
        else:
            found = stored
        if stored != found:
            raise IntegrityError(
                f"{path}: manifest checksum mismatch (stored {_short(stored)}, computed {found})", path=path
            )
        try:
            with paused():  # 100k records: no generational rescans while building them
                manifest = cls._from_body(body, version)
        except (KeyError, TypeError, ValueError, OverflowError, RecursionError, MemoryError) as e:
            raise IntegrityError(f"{path}: malformed manifest ({_short(e)})", path=path) from None
        check_manifest(manifest, where=path, arrays=arrays)
        return manifest

    @classmethod
    def _from_body(cls, body: dict[str, Any], version: int) -> Manifest:
        """The manifest a parsed body describes (TypeError/ValueError when it is malformed)."""
        _fields(body, _MANIFEST_FIELDS, "manifest", optional=("held", "pickled", "user_meta", "packs"))
        if ("packs" in body) != (version == 2):
            raise ValueError("a version 2 manifest has packs, a version 1 manifest none")
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
        return cls(
            step=_int(body["step"], "step"),
            run_id=_str(body["run_id"], "run_id"),
            world_size=_int(body["world_size"], "world_size"),
            created_unix=float(created),
            pickled=pickled,
            files={_str(k, "file name"): _int(v, f"size of {k!r}") for k, v in _dict(body["files"], "files").items()},
            blobs=tuple(BlobRecord.from_json(b) for b in _list(body["blobs"], "blobs")),
            tensors=_tensors(_dict(body["tensors"], "tensors"), _list(body.get("packs", []), "packs")),
            user_meta=user_meta,
            held=None if held is None else tuple(_str(f, "held file") for f in _list(held, "held")),
        )

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


def _raw_checksum(data: bytes, engine: Any = None) -> str | None:
    """The checksum of a manifest written by :meth:`Manifest.to_bytes`, computed over its raw
    bytes without the checksum member; None when the file is not laid out that way."""
    at = data.find(_CHECKSUM_MEMBER)
    end = at + len(_CHECKSUM_MEMBER) + 9
    if at < 0 or data[end - 1 : end] != b'"':
        return None
    return hexcrc(crc32c(data[:at] + data[end:], engine=engine))


# ------------------------------------------------------------------ strict JSON parsing
_SHARD_FIELDS = frozenset({"rank", "file", "offset", "nbytes", "crc32c", "offsets", "shape"})
_BLOB_FIELDS = frozenset({"rank", "file", "offset", "nbytes", "crc32c", "encoding"})
_TENSOR_FIELDS = frozenset({"dtype", "shape", "shards", "alias_of"})
_STORED_FIELDS = frozenset({"dtype", "shape", "shards"})
_MANIFEST_FIELDS = frozenset({
    "format", "version", "step", "run_id", "created_unix", "world_size", "pickled", "files", "blobs",
    "tensors", "user_meta", "held", "packs",
})  # fmt: skip
_PACK_FIELDS = frozenset({"rank", "file", "offset", "nbytes", "crc32c", "count", "table"})
_TABLE_FIELDS = frozenset({"keys", "types", "type", "skip"})


# ------------------------------------------------------------------ packs (version 2)
def _pack_to_json(pack: PackRecord, members: list[tuple[str, TensorRecord]]) -> dict[str, Any]:
    """A pack as a manifest stores it: its region and one compressed table of its tensors.

    The table (JSON, xz-compressed, base64) holds columns: ``keys``; ``types`` (the distinct
    ``[dtype, shape, nbytes]``); ``type`` (each tensor's index in ``types``); ``skip`` (the
    bytes between the previous tensor's end, or the pack's start, and this one's). Tensors
    are listed in the order of their offsets.
    """
    members = sorted(members, key=lambda kt: (kt[1].shards[0].offset, kt[1].shards[0].nbytes))
    types: dict[tuple[str, tuple[int, ...], int], int] = {}
    keys, kinds, skips = [], [], []
    end = pack.offset
    for k, t in members:
        s = t.shards[0]
        if s.offsets != (0,) * len(t.shape) or s.shape != t.shape or s.rank != pack.rank or s.file != pack.file:
            raise ValueError(f"tensor {k!r}: only a whole tensor of the pack's rank and file is packed")
        keys.append(k)
        kinds.append(types.setdefault((t.dtype, t.shape, s.nbytes), len(types)))
        skips.append(s.offset - end)
        end = s.offset + s.nbytes
    table = {"keys": keys, "types": [[d, list(sh), n] for d, sh, n in types], "type": kinds, "skip": skips}
    raw = json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    packed = xz.compress(raw)
    return {
        "rank": pack.rank,
        "file": pack.file,
        "offset": pack.offset,
        "nbytes": pack.nbytes,
        "crc32c": pack.crc32c,
        "count": len(keys),
        "table": base64.b64encode(packed).decode("ascii"),
    }


def _tensors(plain: dict[str, Any], packs: list[Any]) -> dict[str, TensorRecord]:
    """Every tensor record: the plain ones, then each pack's, every key once."""
    tensors = {k: TensorRecord.from_json(k, t) for k, t in plain.items()}
    for i, d in enumerate(packs):
        what = f"pack {i}"
        _fields(d, _PACK_FIELDS, what)
        pack = PackRecord(
            rank=_int(d["rank"], "rank"),
            file=_str(d["file"], "file"),
            offset=_int(d["offset"], "offset"),
            nbytes=_int(d["nbytes"], "nbytes"),
            crc32c=_int(d["crc32c"], "crc32c"),
        )
        count = _int(d["count"], f"{what} count")
        table = _table(_str(d["table"], f"{what} table"), what)
        keys, types, kinds, skips = table["keys"], table["types"], table["type"], table["skip"]
        if not (type(keys) is list and type(kinds) is list and type(skips) is list and type(types) is list):
            raise TypeError(f"{what} table: keys, types, type and skip must be lists")
        if not len(keys) == len(kinds) == len(skips) == count:
            raise ValueError(f"{what} table: {len(keys)} keys, {len(kinds)} types, {len(skips)} skips, count {count}")
        shapes = []
        for t in types:
            if type(t) is not list or len(t) != 3:
                raise TypeError(f"{what} table: a type must be [dtype, shape, nbytes], got {_short(t)}")
            shapes.append((_str(t[0], "dtype"), _ints(t[1], "shape"), _int(t[2], "nbytes")))
        end, rank, file = pack.offset, pack.rank, pack.file
        for key, kind, skip in zip(keys, kinds, skips):
            if type(key) is not str or type(kind) is not int or type(skip) is not int:
                raise TypeError(f"{what} table: key {_short(key)}: a string key, an integer type and skip")
            if not 0 <= kind < len(shapes) or skip < 0:
                raise ValueError(f"{what} table: key {_short(key)}: type {kind} or skip {skip} out of range")
            if key in tensors:
                raise ValueError(f"duplicate tensor key {_short(key)}")
            dtype, shape, nbytes = shapes[kind]
            at = end + skip
            end = at + nbytes
            shard = ShardRecord(rank, file, at, nbytes, pack.crc32c, (0,) * len(shape), shape, pack)
            tensors[key] = TensorRecord(key, dtype, shape, (shard,))
    return tensors


def _table(text: str, what: str) -> dict[str, Any]:
    """A pack's table, decompressed within its bound and parsed strictly."""
    try:
        packed = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError(f"{what} table is not base64") from None
    raw = xz.inflate(packed, what=f"{what} table")
    table = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite)
    _fields(table, _TABLE_FIELDS, f"{what} table")
    return table


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
