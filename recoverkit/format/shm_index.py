"""The index of one shared-memory snapshot: what makes a slot's bytes a snapshot.

Where it sits: the shared-memory tier (``staging/shm_tier``) and the peer replicator copy
one rank's staged step into a slot of ``storage/shm`` (``slot-K.data``), then write this
index next to it (``slot-K.index``), last and atomically. A slot without a valid index is
torn (its writer died mid-copy) and is never selected. The index is one rank's *commit
report* for one step, so a reader turns it into a manifest with
``distributed.commit.build_manifest`` (records + meta of every rank) and the one gate,
``format/validate.py``, checks it like any other manifest::

    {"format": "recoverkit-shm-index", "version": 1, "step": S, "run_id": "...",
     "world_size": W, "rank": R, "data_bytes": N,
     "records": {"rank": R, "blob": {...}, "shards": [[key, {...}], ...], "files": {F: N}},
     "meta": {"tensors": {key: [dtype, shape]}, "aliases": {key: {...}}},
     "self_contained": true}
    <8 hex digits: CRC-32C of the JSON line above>

``self_contained`` (optional, default true) says whether the rank restores from this
snapshot alone (``SavePlan.self_contained``: no tensor it needs was written by another
rank), so one rank's memory can restore it in a job of several ranks.

Every record (blob and shards) names the file ``F = rank-RRRRR.data`` (the owner's bytes,
whatever slot holds them) and lies inside its ``N`` bytes.

The index is read from memory another process wrote, so :func:`decode_index` parses it as
hostile input: a size cap before anything is parsed, strict JSON (no duplicate keys, NaN or
floats where integers belong), its own CRC, sane step / rank / world / sizes, every record
parsed by the manifest's own strict parsers, every extent inside ``data_bytes``, packs
refused. Any fault is an :class:`~recoverkit.errors.IntegrityError` naming the file and
what is wrong.

Example:
    >>> from recoverkit.format.manifest import BlobRecord
    >>> records = {"rank": 0, "blob": BlobRecord(0, "rank-00000.data", 0, 4, 7).to_json(),
    ...            "shards": [], "files": {"rank-00000.data": 4}}  # RankRecords.to_json()
    >>> raw = make_index(step=3, run_id="r", world_size=1, rank=0, records=records,
    ...                  shards_meta=(), aliases={}, data_bytes=4)
    >>> decode_index(raw, path="slot-0.index").step
    3
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote  # json.dumps of one str, in C
from typing import Any, cast

from ..errors import IntegrityError
from .checksum import crc32c, hexcrc
from .manifest import BlobRecord, ShardRecord, TensorRecord, _short, _unique_keys

__all__ = [
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "MAX_DATA_BYTES",
    "MAX_INDEX_BYTES",
    "ShmIndex",
    "data_file",
    "decode_index",
    "encode_index",
    "make_index",
]

INDEX_FORMAT = "recoverkit-shm-index"
INDEX_VERSION = 1
#: the largest index read (a million records are a few hundred MiB); checked before parsing
MAX_INDEX_BYTES = 512 << 20
#: the largest snapshot one slot may claim to hold (4 TiB): a hostile ``data_bytes`` never
#: sizes a mapping beyond it (the real file's size is checked against it too)
MAX_DATA_BYTES = 1 << 42
MAX_STEP = 1 << 62
MAX_WORLD = 1 << 20
MAX_RUN_ID = 256
_FIELDS = frozenset({"format", "version", "step", "run_id", "world_size", "rank", "data_bytes", "records", "meta"})
_OPTIONAL = frozenset({"self_contained"})
_RECORD_FIELDS = frozenset({"rank", "blob", "shards", "files"})
_META_FIELDS = frozenset({"tensors", "aliases"})
_HEX8 = re.compile(rb"[0-9a-f]{8}")


def data_file(rank: int) -> str:
    """The file name every record of rank ``rank``'s index names.

    Example:
        >>> data_file(3)
        'rank-00003.data'
    """
    return f"rank-{rank:05d}.data"


@dataclass(frozen=True)
class ShmIndex:
    """A decoded, validated index (see the module docstring).

    ``meta`` is exactly the mapping ``distributed.commit.build_manifest`` takes next to the
    records (``{"tensors": ..., "aliases": ...}``); ``shards`` are ``(key, record)`` pairs in
    the order written.
    """

    step: int
    run_id: str
    world_size: int
    rank: int
    data_bytes: int
    blob: BlobRecord
    shards: tuple[tuple[str, ShardRecord], ...]
    files: Mapping[str, int]
    meta: Mapping[str, Any]
    self_contained: bool = True

    @property
    def file(self) -> str:
        return data_file(self.rank)


def make_index(
    *,
    step: int,
    run_id: str,
    world_size: int,
    rank: int,
    records: Any,
    shards_meta: Iterable[Any] | Mapping[str, Any],
    aliases: Mapping[str, Any],
    data_bytes: int,
    self_contained: bool = True,
) -> bytes:
    """The bytes of an index, for writers (the shm tier, the replicator's receiver).

    Args:
        records: the rank's records (a ``storage.base.RankRecords``: ``rank``, ``blob``,
            ``shards``, ``files``; or its JSON), every one naming :func:`data_file` of
            ``rank`` inside ``data_bytes``.
        shards_meta: the shards the records answer (objects with ``key``, ``dtype`` and
            ``global_shape``, e.g. planned shards), or the ``meta["tensors"]`` mapping itself.
        aliases: key -> ``TensorRecord`` (or its JSON) of the rank's aliases.
        self_contained: the rank restores from this snapshot alone (see the module docstring).
    """
    return encode_index(
        step=step, run_id=run_id, world_size=world_size, rank=rank, records=records, shards_meta=shards_meta,
        aliases=aliases, data_bytes=data_bytes, self_contained=self_contained,
    )[0]


def encode_index(
    *,
    step: int,
    run_id: str,
    world_size: int,
    rank: int,
    records: Any,
    shards_meta: Iterable[Any] | Mapping[str, Any],
    aliases: Mapping[str, Any],
    data_bytes: int,
    self_contained: bool = True,
) -> tuple[bytes, ShmIndex | None]:
    """:func:`make_index`'s bytes, and the index they decode to when ``records`` is a
    records object (None for records given as JSON): a writer that built the index itself
    commits it without parsing its own bytes back. Records objects are encoded record by
    record (a snapshot of 100k small tensors is one index of ~17 MB, every step)."""
    if isinstance(shards_meta, Mapping):
        tensors = {str(k): [str(v[0]), [int(x) for x in v[1]]] for k, v in shards_meta.items()}
    else:
        tensors = {s.key: [s.dtype, list(s.global_shape)] for s in cast(Iterable[Any], shards_meta)}
    meta = {
        "tensors": tensors,
        "aliases": {k: (t.to_json() if isinstance(t, TensorRecord) else t) for k, t in aliases.items()},
    }
    head: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "step": step,
        "run_id": run_id,
        "world_size": world_size,
        "rank": rank,
        "data_bytes": data_bytes,
    }
    if not self_contained:
        head["self_contained"] = False
    dump = functools.partial(json.dumps, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    if isinstance(records, Mapping):
        recs, index = dump(records), None
    else:
        recs = _records_json(records, dump)
        index = ShmIndex(
            step=step, run_id=run_id, world_size=world_size, rank=rank, data_bytes=data_bytes, blob=records.blob,
            shards=tuple(records.shards), files=dict(records.files), meta=meta, self_contained=self_contained,
        )
    text = (dump(head)[:-1] + ',"records":' + recs + ',"meta":' + dump(meta) + "}").encode("ascii")
    return text + b"\n" + hexcrc(crc32c(text))[2:].encode("ascii") + b"\n", index


def _records_json(records: Any, dump: Callable[[Any], str]) -> str:
    """``dump(records.to_json())``, record by record without a dict per record."""
    files: dict[str, str] = {}
    parts = []
    for key, s in records.shards:
        if s.pack is not None:
            raise ValueError(f"shard {key!r}: a slot holds no packs")
        f = files.get(s.file)
        if f is None:
            f = files[s.file] = _quote(s.file)
        parts.append(
            f'[{_quote(key)},{{"rank":{s.rank:d},"file":{f},"offset":{s.offset:d},"nbytes":{s.nbytes:d},'
            f'"crc32c":{s.crc32c:d},"offsets":[{",".join(map(str, s.offsets))}],'
            f'"shape":[{",".join(map(str, s.shape))}]}}]'
        )
    return (
        f'{{"rank":{records.rank:d},"blob":{dump(records.blob.to_json())},"shards":[{",".join(parts)}],'
        f'"files":{dump(records.files)}}}'
    )


def decode_index(data: bytes | memoryview, *, path: str) -> ShmIndex:
    """Parse and validate an index as hostile input; IntegrityError naming ``path`` and the
    fault otherwise (see the module docstring for every check)."""
    size = len(data)
    if size > MAX_INDEX_BYTES:
        raise IntegrityError(f"{path}: {size} bytes, more than an index may have ({MAX_INDEX_BYTES})", path=path)
    raw = bytes(data)
    if len(raw) < 11 or raw[-1:] != b"\n" or raw[-10:-9] != b"\n":
        raise IntegrityError(f"{path}: not a shared-memory index (truncated, or no checksum line)", path=path)
    text, stored = raw[:-10], raw[-9:-1]
    if not _HEX8.fullmatch(stored):
        raise IntegrityError(f"{path}: checksum line {_short(stored)} is not 8 hex digits", path=path)
    want = int(stored, 16)
    found = crc32c(text)
    if found != want:
        raise IntegrityError(f"{path}: index checksum mismatch (stored {hexcrc(want)}, computed {hexcrc(found)})", path=path)
    try:
        body = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_refuse, parse_float=_refuse)
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError) as e:
        raise IntegrityError(f"{path}: not valid JSON ({_short(e)})", path=path) from None
    try:
        return _index(body)
    except IntegrityError as e:
        raise IntegrityError(f"{path}: {e}", path=path) from None
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError, MemoryError) as e:
        raise IntegrityError(f"{path}: malformed index ({_short(e)})", path=path) from None


def _index(body: Any) -> ShmIndex:
    _exact(body, _FIELDS, "index", optional=_OPTIONAL)
    self_contained = body.get("self_contained", True)
    if type(self_contained) is not bool:
        raise IntegrityError(f"self_contained must be true or false, got {_short(self_contained)}")
    if body["format"] != INDEX_FORMAT or body["version"] != INDEX_VERSION or type(body["version"]) is not int:
        raise IntegrityError(
            f"not a {INDEX_FORMAT} version {INDEX_VERSION} (format {_short(body['format'])}, "
            f"version {_short(body['version'])})"
        )
    step = _bounded(body["step"], "step", MAX_STEP)
    world = _bounded(body["world_size"], "world_size", MAX_WORLD, low=1)
    rank = _bounded(body["rank"], "rank", world - 1)
    data_bytes = _bounded(body["data_bytes"], "data_bytes", MAX_DATA_BYTES)
    run_id = body["run_id"]
    if type(run_id) is not str or len(run_id) > MAX_RUN_ID or "\x00" in run_id:
        raise IntegrityError(f"run_id {_short(run_id)} is not a string of at most {MAX_RUN_ID} characters")
    file = data_file(rank)
    rec = body["records"]
    _exact(rec, _RECORD_FIELDS, "records")
    if rec["rank"] != rank or type(rec["rank"]) is not int:
        raise IntegrityError(f"records of rank {_short(rec['rank'])} in the index of rank {rank}")
    files = rec["files"]
    if type(files) is not dict or files != {file: data_bytes} or type(files[file]) is not int:
        raise IntegrityError(f"records list files {_short(files)}, expected {{{file!r}: {data_bytes}}}")
    blob = BlobRecord.from_json(rec["blob"])
    _extent(blob.rank, blob.file, blob.offset, blob.nbytes, blob.crc32c, "the blob", rank, file, data_bytes)
    shards_json = rec["shards"]
    if type(shards_json) is not list:
        raise TypeError("records' shards must be a list")
    meta = body["meta"]
    _exact(meta, _META_FIELDS, "meta")
    tensors, aliases = meta["tensors"], meta["aliases"]
    if type(tensors) is not dict or type(aliases) is not dict:
        raise TypeError("meta's tensors and aliases must be JSON objects")
    shards: list[tuple[str, ShardRecord]] = []
    for pair in shards_json:
        if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
            raise TypeError(f"a shard must be [key, record], got {_short(pair)}")
        key = pair[0]
        s = ShardRecord.from_json(pair[1])  # strict; a pack is refused (slots hold no packs)
        _extent(s.rank, s.file, s.offset, s.nbytes, s.crc32c, f"shard {_short(key)}", rank, file, data_bytes)
        kind = tensors.get(key)
        if type(kind) is not list or len(kind) != 2 or type(kind[0]) is not str or type(kind[1]) is not list:
            raise IntegrityError(f"shard {_short(key)} has no [dtype, shape] in meta's tensors")
        if any(type(x) is not int or x < 0 for x in kind[1]):
            raise IntegrityError(f"tensor {_short(key)}: shape {_short(kind[1])} is not a list of sizes")
        shards.append((key, s))
    for k, t in aliases.items():
        if TensorRecord.from_json(k, t).alias_of is None:
            raise IntegrityError(f"alias {_short(k)} names no tensor it aliases")
    return ShmIndex(
        step=step, run_id=run_id, world_size=world, rank=rank, data_bytes=data_bytes, blob=blob,
        shards=tuple(shards), files={file: data_bytes}, meta={"tensors": tensors, "aliases": aliases},
        self_contained=self_contained,
    )


def _extent(
    owner: int, file: str, offset: int, nbytes: int, crc: int, what: str, rank: int, expect: str, size: int
) -> None:
    if owner != rank or file != expect:
        raise IntegrityError(f"{what} names rank {owner} file {_short(file)}, expected rank {rank} file {expect!r}")
    if offset < 0 or nbytes < 0 or offset + nbytes > size:
        raise IntegrityError(f"{what}: bytes [{offset}, {offset + nbytes}) lie outside the {size} data bytes")
    if not 0 <= crc < 1 << 32:
        raise IntegrityError(f"{what}: crc32c {crc} is not a 32-bit checksum")


def _exact(d: Any, fields: frozenset[str], what: str, *, optional: frozenset[str] = frozenset()) -> None:
    if type(d) is not dict:
        raise TypeError(f"{what} must be a JSON object, got {type(d).__name__}")
    if d.keys() - optional != fields:
        missing, extra = sorted(fields - d.keys()), sorted(d.keys() - fields - optional)
        raise ValueError(f"{what} fields: missing {missing}, unknown {[_short(k) for k in extra[:4]]}")


def _bounded(v: Any, what: str, high: int, *, low: int = 0) -> int:
    if type(v) is not int:
        raise IntegrityError(f"{what} must be an integer, got {_short(v)}")
    if not low <= v <= high:
        raise IntegrityError(f"{what} {_short(v)} is out of range [{low}, {high}]")
    return v


def _refuse(text: str) -> Any:
    raise ValueError(f"number {_short(text)} is not an integer")
