"""Typed JSON for the non-tensor part of a state: exact round trips, no pickle by default.

Save data flow: capture -> flatten -> **encode(skeleton)** -> the rank's object blob in the
segment file / zarr group (checksummed like every other byte). Restore: blob -> **decode**
-> unflatten with the tensors the reader assembled.

The output is UTF-8 (in fact ASCII) JSON: ``{"codec": "recoverkit-json", "version": 1,
"root": ...}``. Values JSON already types exactly are stored as themselves: ``None``,
``bool``, ``str``, ``int`` within 64 bits, finite ``float`` (``-0.0`` included), ``list``, and
``dict`` whose keys are all ``str`` with none starting with ``"$"``. Every other value is a
one-key tagged object:

==============  ========================================================================
``$int``        an integer beyond 64 bits, as hex text
``$float``      nan / +-inf, as the 16 hex digits of the IEEE bit pattern (NaN payload kept)
``$complex``    ``[real, imag]``, each a float node
``$tuple``      a tuple; a namedtuple is stored (and comes back) as a plain tuple
``$dict``       ``[[key, value], ...]`` for any other keys, insertion order kept
``$odict``      an OrderedDict, same pairs; a state dict's ``_metadata`` goes in ``$metadata``
``$set``        a set; ``$frozenset`` a frozenset (elements in a canonical order)
``$bytes``      base64; ``$bytearray`` likewise
``$ndarray``    ``[dtype, shape, base64 of the C-order bytes]``, any dtype without objects
``$npscalar``   ``[dtype, base64]`` for numpy scalars (``np.float32(1)``, ``np.int64(2)`` ...)
``$dtype``      a torch dtype by name; ``$size`` a torch.Size; ``$device`` a torch.device
``$slice``      ``[start, stop, step]``; ``$range`` likewise
``$tensor``     a :class:`~recoverkit.state.flatten.TensorLeaf` key
``$pickle``     base64 pickle, only with ``allow_pickle=True`` on both sides
==============  ========================================================================

Decoding runs ``json.loads`` and this fixed tag table, nothing else: no import, no eval,
and no pickle unless the caller allowed it, so loading an untrusted checkpoint never runs
code. Damaged input raises :class:`~recoverkit.errors.IntegrityError`; a tag or version this
reader does not know raises :class:`~recoverkit.errors.IncompatibleCheckpointError`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import EncodeError, IncompatibleCheckpointError, IntegrityError, PickleNotAllowedError
from .dtypes import _BY_NAME, _QUANTIZED
from .flatten import TensorLeaf

__all__ = ["encode", "decode", "CODEC_NAME", "CODEC_VERSION"]

CODEC_NAME = "recoverkit-json"
CODEC_VERSION = 1
_INT64 = 1 << 63
_TORCH_DTYPES = {**_BY_NAME, **_QUANTIZED}
_TORCH_DTYPE_NAMES = {d: n for n, d in _TORCH_DTYPES.items()}


def encode(skeleton: Any, *, allow_pickle: bool = False) -> bytes:
    """Serialize a tensor-free tree (a ``flatten`` skeleton) to typed JSON bytes.

    Args:
        skeleton: the tree; tensors must already be :class:`TensorLeaf` placeholders.
        allow_pickle: store values of unsupported types as ``$pickle`` instead of failing.

    Raises:
        EncodeError: a value cannot be encoded; the message gives its path in the tree,
            e.g. ``state['sched']['lr_lambdas'][0]``, and its type.

    Example:
        >>> blob = encode({"step": 7, "betas": (0.9, 0.999), 0: float("nan")})
        >>> decode(blob)
        {'step': 7, 'betas': (0.9, 0.999), 0: nan}
    """
    try:
        root = _Encoder(allow_pickle).node(skeleton, "state")
    except RecursionError:
        raise EncodeError("state: the tree is nested too deeply to encode") from None
    doc = {"codec": CODEC_NAME, "version": CODEC_VERSION, "root": root}
    return json.dumps(doc, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode(
        "ascii"
    )


def decode(data: bytes, *, allow_pickle: bool = False) -> Any:
    """Rebuild the tree :func:`encode` wrote, with the same types and values.

    Args:
        data: the encoded bytes.
        allow_pickle: unpickle ``$pickle`` nodes (only for checkpoints you trust).

    Raises:
        PickleNotAllowedError: the data holds a pickled value and ``allow_pickle`` is False.
        IntegrityError: the bytes are not well-formed output of this codec.
        IncompatibleCheckpointError: another codec, a newer version, or an unknown tag.

    Example:
        >>> decode(encode({1: b"x", "s": {2.5}}))
        {1: b'x', 's': {2.5}}
    """
    try:
        doc = json.loads(
            bytes(data).decode("utf-8"), object_pairs_hook=_Obj, parse_constant=_no_constant
        )
    except (UnicodeDecodeError, ValueError) as e:
        raise IntegrityError(f"object state is not valid JSON: {e}") from None
    except RecursionError:
        raise IntegrityError("object state is nested too deeply") from None
    if type(doc) is not _Obj or not any(k == "codec" for k, _ in doc):
        raise IncompatibleCheckpointError(
            "object state has no codec header; not written by recoverkit"
        )
    header = dict(doc)
    if header.get("codec") != CODEC_NAME:
        raise IncompatibleCheckpointError(
            f"object state uses codec {header.get('codec')!r}, expected {CODEC_NAME!r}"
        )
    version = header.get("version")
    if type(version) is not int or version < 1:
        raise IntegrityError(f"object state has an invalid codec version {version!r}")
    if version > CODEC_VERSION:
        raise IncompatibleCheckpointError(
            f"object state uses codec version {version}; this recoverkit reads up to {CODEC_VERSION}"
        )
    if set(header) != {"codec", "version", "root"}:
        raise IntegrityError(
            f"object state header has fields {sorted(header)}, expected codec, version, root"
        )
    try:
        return _Decoder(allow_pickle).node(header["root"], "state")
    except RecursionError:
        raise IntegrityError("object state is nested too deeply") from None


class _Obj(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) pairs, so order and duplicates stay visible."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard constant {name}")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _float(x: float) -> Any:
    return x if math.isfinite(x) else {"$float": struct.pack(">d", x).hex()}


class _Encoder:
    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle

    def node(self, x: Any, path: str) -> Any:
        t = type(x)
        if x is None or t is bool or t is str:
            return x
        if t is int:
            return x if -_INT64 <= x < _INT64 else {"$int": hex(x)}
        if t is float:
            return _float(x)
        if t is list:
            return [self.node(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if t is dict:
            if all(type(k) is str and not k.startswith("$") for k in x):
                return {k: self.node(v, f"{path}[{k!r}]") for k, v in x.items()}
            return {"$dict": self._pairs(x, path)}
        if t is OrderedDict:
            out: dict[str, Any] = {"$odict": self._pairs(x, path)}
            metadata = getattr(x, "_metadata", None)
            if metadata is not None:
                out["$metadata"] = self.node(metadata, f"{path}._metadata")
            return out
        if isinstance(x, tuple) and (t is tuple or hasattr(x, "_fields")):
            return {"$tuple": [self.node(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if t is set or t is frozenset:
            items = [self.node(v, f"{path}{{element}}") for v in x]
            items.sort(key=lambda e: json.dumps(e, sort_keys=True))
            return {f"${t.__name__}": items}
        return self._scalar(x, path)

    def _scalar(self, x: Any, path: str) -> Any:
        t = type(x)
        if t is TensorLeaf:
            return {"$tensor": x.key}
        if t is complex:
            return {"$complex": [_float(x.real), _float(x.imag)]}
        if t is bytes or t is bytearray:
            return {f"${t.__name__}": _b64(bytes(x))}
        if t is np.ndarray or isinstance(x, np.generic):
            arr = (
                np.ascontiguousarray(x) if t is np.ndarray else np.asarray(x)
            )  # np.str_: array dtype fits
            dt = _np_dtype(arr.dtype, path)
            if dt is not None:
                data = _b64(arr.tobytes())
                return (
                    {"$ndarray": [dt, list(x.shape), data]}
                    if t is np.ndarray
                    else {"$npscalar": [dt, data]}
                )
        elif t is torch.dtype and x in _TORCH_DTYPE_NAMES:
            return {"$dtype": _TORCH_DTYPE_NAMES[x]}
        elif t is torch.Size:
            return {"$size": [int(d) for d in x]}
        elif t is torch.device:
            return {"$device": str(x)}
        elif t is slice:
            return {
                "$slice": [
                    self.node(getattr(x, n), f"{path}.{n}") for n in ("start", "stop", "step")
                ]
            }
        elif t is range:
            return {"$range": [x.start, x.stop, x.step]}
        elif isinstance(x, torch.Tensor):
            raise EncodeError(f"{path}: a tensor reached the codec; flatten() the tree first")
        if self.allow_pickle:
            try:
                return {"$pickle": _b64(pickle.dumps(x, protocol=4))}
            except Exception as e:
                raise EncodeError(f"{path}: cannot pickle {t!r}: {e}") from e
        what = f"{t!r} with dtype {x.dtype}" if isinstance(x, (np.ndarray, np.generic)) else repr(t)
        raise EncodeError(f"{path}: cannot encode {what} without pickle; pass allow_pickle=True")

    def _pairs(self, x: dict[Any, Any], path: str) -> list[list[Any]]:
        return [
            [self.node(k, f"{path}<key {k!r}>"), self.node(v, f"{path}[{k!r}]")]
            for k, v in x.items()
        ]


def _np_dtype(dt: np.dtype[Any], path: str) -> Any:
    """A numpy dtype as text (``'<u4'``) or field list; None if it cannot be raw bytes."""
    if dt.hasobject:
        return None
    spec = dt.str if dt.fields is None else dt.descr
    try:
        same = np.dtype(spec) == dt
    except Exception:
        return None
    if not same:  # aligned structs with padding, StringDType ...
        return None
    return spec if dt.fields is None else _Encoder(False).node(spec, f"{path}.dtype")


class _Decoder:
    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.tags: dict[str, Callable[[Any, str], Any]] = {
            "$int": self._int, "$float": self._float, "$complex": self._complex,
            "$tuple": lambda p, path: tuple(self._items(p, path)),
            "$dict": lambda p, path: self._dict(p, path, dict),
            "$set": lambda p, path: self._hashable(set, self._items(p, path), path),
            "$frozenset": lambda p, path: self._hashable(frozenset, self._items(p, path), path),
            "$bytes": lambda p, path: self._bytes(p, path),
            "$bytearray": lambda p, path: bytearray(self._bytes(p, path)),
            "$ndarray": self._ndarray, "$npscalar": self._npscalar,
            "$dtype": self._dtype, "$size": self._size, "$device": self._device,
            "$slice": lambda p, path: slice(*self._items(p, path, n=3)),
            "$range": self._range, "$tensor": self._tensor, "$pickle": self._pickle,
        }  # fmt: skip

    def node(self, j: Any, path: str) -> Any:
        if j is None or type(j) in (bool, int, float, str):
            return j
        if type(j) is list:
            return [self.node(v, f"{path}[{i}]") for i, v in enumerate(j)]
        if not j:
            return {}
        tag, payload = j[0]
        if not tag.startswith("$"):
            if any(k.startswith("$") for k, _ in j) or len({k for k, _ in j}) != len(j):
                raise IntegrityError(
                    f"{path}: malformed object (duplicate keys or a misplaced tag)"
                )
            return {k: self.node(v, f"{path}[{k!r}]") for k, v in j}
        if tag == "$odict" and [k for k, _ in j] in (["$odict"], ["$odict", "$metadata"]):
            out = self._dict(payload, path, OrderedDict)
            if len(j) == 2:
                out._metadata = self.node(j[1][1], f"{path}._metadata")
            return out
        handler = self.tags.get(tag)
        if handler is None:
            raise IncompatibleCheckpointError(
                f"{path}: unknown tag {tag!r} (written by a newer recoverkit?)"
            )
        if len(j) != 1:
            raise IntegrityError(
                f"{path}: tagged object {tag} has extra fields {[k for k, _ in j[1:]]}"
            )
        return handler(payload, path)

    def _bad(self, path: str, what: str, payload: Any) -> IntegrityError:
        return IntegrityError(f"{path}: malformed {what}: {str(payload)[:80]!r}")

    def _items(self, p: Any, path: str, n: int | None = None) -> list[Any]:
        if type(p) is not list or (n is not None and len(p) != n):
            raise self._bad(path, "sequence", p)
        return [self.node(v, f"{path}[{i}]") for i, v in enumerate(p)]

    def _hashable(self, kind: Callable[[list[Any]], Any], items: list[Any], path: str) -> Any:
        try:
            return kind(items)
        except TypeError:
            raise self._bad(path, "set (unhashable element)", items) from None

    def _dict(self, p: Any, path: str, kind: Callable[[], Any]) -> Any:
        out = kind()
        if type(p) is not list:
            raise self._bad(path, "mapping", p)
        for pair in p:
            if type(pair) is not list or len(pair) != 2:
                raise self._bad(path, "mapping entry", pair)
            key = self.node(pair[0], f"{path}<key>")
            try:
                out[key] = self.node(pair[1], f"{path}[{key!r}]")
            except TypeError:
                raise self._bad(path, "mapping key (unhashable)", key) from None
        return out

    def _str(self, p: Any, path: str, what: str) -> str:
        if type(p) is not str:
            raise self._bad(path, what, p)
        return p

    def _bytes(self, p: Any, path: str) -> bytes:
        try:
            return base64.b64decode(self._str(p, path, "base64"), validate=True)
        except binascii.Error:
            raise self._bad(path, "base64", p) from None

    def _int(self, p: Any, path: str) -> int:
        try:
            return int(self._str(p, path, "integer"), 16)
        except ValueError:
            raise self._bad(path, "integer", p) from None

    def _float(self, p: Any, path: str) -> float:
        try:
            return float(struct.unpack(">d", bytes.fromhex(self._str(p, path, "float")))[0])
        except (ValueError, struct.error):
            raise self._bad(path, "float", p) from None

    def _complex(self, p: Any, path: str) -> complex:
        re, im = self._items(p, path, n=2)
        if type(re) is not float or type(im) is not float:
            raise self._bad(path, "complex", p)
        return complex(re, im)

    def _np_dtype(self, p: Any, path: str) -> np.dtype[Any]:
        spec = p if type(p) is str else self.node(p, f"{path}.dtype")
        try:
            dt = np.dtype(spec)
        except Exception:  # numpy raises several types for a bad spec
            raise self._bad(path, "numpy dtype", p) from None
        if dt.hasobject:
            raise self._bad(path, "numpy dtype (objects are never decoded)", p)
        return dt

    def _ndarray(self, p: Any, path: str) -> np.ndarray[Any, Any]:
        if type(p) is not list or len(p) != 3 or type(p[1]) is not list:
            raise self._bad(path, "ndarray", p)
        dt, raw = self._np_dtype(p[0], path), self._bytes(p[2], path)
        shape = tuple(p[1])
        if not all(type(d) is int and d >= 0 for d in shape) or math.prod(
            shape
        ) * dt.itemsize != len(raw):
            raise self._bad(
                path, f"ndarray ({len(raw)} bytes for {dt} of shape {list(shape)})", p[1]
            )
        if not raw:
            return np.zeros(shape, dt)
        return np.frombuffer(bytearray(raw), dt).reshape(shape)

    def _npscalar(self, p: Any, path: str) -> Any:
        if type(p) is not list or len(p) != 2:
            raise self._bad(path, "numpy scalar", p)
        dt, raw = self._np_dtype(p[0], path), self._bytes(p[1], path)
        if len(raw) != dt.itemsize:
            raise self._bad(path, f"numpy scalar ({len(raw)} bytes for {dt})", p)
        return np.zeros((), dt)[()] if not raw else np.frombuffer(raw, dt)[0]

    def _dtype(self, p: Any, path: str) -> torch.dtype:
        dt = _TORCH_DTYPES.get(self._str(p, path, "dtype"))
        if dt is None:
            raise IncompatibleCheckpointError(f"{path}: unknown torch dtype {p!r}")
        return dt

    def _size(self, p: Any, path: str) -> torch.Size:
        if type(p) is not list or not all(type(d) is int for d in p):
            raise self._bad(path, "torch.Size", p)
        return torch.Size(p)

    def _device(self, p: Any, path: str) -> torch.device:
        try:
            return torch.device(self._str(p, path, "device"))
        except (RuntimeError, ValueError):
            raise self._bad(path, "device", p) from None

    def _range(self, p: Any, path: str) -> range:
        if type(p) is not list or len(p) != 3 or not all(type(v) is int for v in p) or p[2] == 0:
            raise self._bad(path, "range", p)
        return range(*p)

    def _tensor(self, p: Any, path: str) -> TensorLeaf:
        return TensorLeaf(self._str(p, path, "tensor key"))

    def _pickle(self, p: Any, path: str) -> Any:
        if not self.allow_pickle:
            raise PickleNotAllowedError(
                f"{path}: the checkpoint holds a pickled object; pass allow_pickle=True only if you trust it"
            )
        raw = self._bytes(p, path)
        return pickle.loads(raw)  # noqa: S301 - explicitly allowed by the caller
