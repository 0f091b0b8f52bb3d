"""Typed JSON for the non-tensor part of a state: exact round trips, no pickle by default.

Save data flow: capture -> flatten -> **encode(skeleton)** -> the rank's object blob in the
segment file / zarr group (checksummed like every other byte). Restore: blob -> **decode**
-> unflatten with the tensors the reader assembled.

The output is UTF-8 (in fact ASCII) JSON: ``{"codec": "recoverkit-json", "version": 1,
"root": ...}``; a document of :data:`COMPRESS_ABOVE` bytes or more is stored xz-compressed
(a state of 100k tensors has a tree of 3 MiB that compresses 50-fold), which ``decode``
recognises by the xz magic and inflates within bounds (:mod:`recoverkit.format.xz`). Values
JSON already types exactly are stored as themselves: ``None``,
``bool``, ``str``, ``int`` within 64 bits, finite ``float`` (``-0.0`` included), ``list``, and
``dict`` whose keys are all ``str`` with none starting with ``"$"``. Every other value is a
one-key tagged object:

==============  ========================================================================
``$int``        an integer beyond 64 bits (up to 2**8192), as hex text
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
``$param``      ``[key, requires_grad]``: the leaf of an ``nn.Parameter``
``$pickle``     base64 pickle, only with ``allow_pickle=True`` on both sides
==============  ========================================================================

Decoding runs ``json.loads`` and this fixed tag table, nothing else: no import, no eval,
and no pickle unless the caller allowed it, so loading an untrusted checkpoint never runs
code. The input is treated as hostile: every fault (not UTF-8 or not JSON, ``NaN`` or an
overflowing float, a duplicate key, a wrong type under a tag, an unknown tag, another codec
or version, nesting too deep, an integer beyond ``2**8192`` (or a plain JSON number beyond
64 bits), bad base64, an array whose
dtype, shape and bytes disagree) raises one :class:`~recoverkit.errors.IntegrityError`
whose one-line message names the node, and nothing is allocated beyond what the length of
the input justifies (an array's buffer is never sized from its shape alone). Only
``$pickle`` without permission raises :class:`~recoverkit.errors.PickleNotAllowedError`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import pickle
import re
import reprlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import EncodeError, IntegrityError, PickleNotAllowedError, RecoverkitError
from ..format import xz
from ..format.dtypes import quantized_by_name, storable_by_name
from .leaf import TensorLeaf

if TYPE_CHECKING:  # numpy and torch are imported by the tags that need them: a skeleton of
    import numpy as np  # plain values and tensor placeholders decodes without either
    import torch

__all__ = ["encode", "decode", "document", "CODEC_NAME", "CODEC_VERSION", "COMPRESS_ABOVE", "MAX_RATIO"]

CODEC_NAME = "recoverkit-json"
CODEC_VERSION = 1
#: documents this long or longer are stored xz-compressed
COMPRESS_ABOVE = 64 << 10
#: a compressed document inflates to at most this many times its size (plus 64 KiB):
#: what decoding allocates stays bounded by the length of the input
MAX_RATIO = xz.MAX_RATIO
_XZ_MAGIC = xz.MAGIC
_INT64 = 1 << 63
_MAX_INT_BITS = 1 << 13  # $int: up to 2048 hex digits, so str() of any decoded int works
_MAX_DEVICE_CHARS = 64
_HEX_INT = re.compile(r"-?0x[0-9a-f]+")
_HEX_FLOAT = re.compile(r"[0-9a-f]{16}")


@functools.cache
def _torch_dtypes() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    """The torch dtypes ``$dtype`` may name (storable and quantized), and their names."""
    by_name = {**storable_by_name(), **quantized_by_name()}
    return by_name, {d: n for n, d in by_name.items()}


# What a bug in a check, or numpy/torch refusing a value, may raise; reported as damage.
_FAULTS = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError,
           RuntimeError, struct.error, binascii.Error)  # fmt: skip


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
    data = json.dumps(doc, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
    if len(data) >= COMPRESS_ABOVE:
        data = xz.compress(data)
    return data


def decode(data: bytes, *, allow_pickle: bool = False) -> Any:
    """Rebuild the tree :func:`encode` wrote, with the same types and values.

    ``data`` is treated as hostile: anything but well-formed output of this codec raises
    :class:`IntegrityError` (never another exception type), before more memory than the
    length of ``data`` justifies is allocated.

    Args:
        data: the encoded bytes.
        allow_pickle: unpickle ``$pickle`` nodes (only for checkpoints you trust).

    Raises:
        PickleNotAllowedError: the data holds a pickled value and ``allow_pickle`` is False.
        IntegrityError: the bytes are not well-formed output of this codec (of this
            version), with a one-line message naming the node that is wrong.

    Example:
        >>> decode(encode({1: b"x", "s": {2.5}}))
        {1: b'x', 's': {2.5}}
    """
    try:
        raw = bytes(data)
        if raw.startswith(_XZ_MAGIC):
            raw = _inflate(raw)
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_Obj, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise IntegrityError(f"object state is not valid JSON: {_oneline(str(e))}") from None
    except RecursionError:
        raise IntegrityError("object state is nested too deeply") from None
    except TypeError as e:  # data is not bytes-like
        raise IntegrityError(f"object state is not bytes: {_oneline(str(e))}") from None
    header = _header(doc)
    decoder = _Decoder(allow_pickle, limit=len(raw))
    try:
        return decoder.node(header["root"], None)
    except RecursionError:
        raise IntegrityError("object state is nested too deeply") from None
    except RecoverkitError:
        raise
    except _FAULTS as e:
        raise IntegrityError(
            f"object state is malformed ({type(e).__name__}: {_oneline(str(e))})"
        ) from None


def document(data: bytes) -> bytes:
    """The typed-JSON text of an encoded blob (inflated within bounds if it is compressed),
    for tools that show the raw tree; raises IntegrityError like :func:`decode`."""
    raw = bytes(data)
    return _inflate(raw) if raw.startswith(_XZ_MAGIC) else raw


def _inflate(data: bytes) -> bytes:
    """An xz-compressed document, inflated within :data:`MAX_RATIO` of its size."""
    try:
        return xz.inflate(data, what="object state")
    except ValueError as e:
        raise IntegrityError(_oneline(str(e))) from None


def _header(doc: Any) -> dict[str, Any]:
    """The checked header ``{codec, version, root}`` of a parsed document."""
    if type(doc) is not _Obj or not any(k == "codec" for k, _ in doc):
        raise IntegrityError("object state has no codec header; not written by recoverkit")
    keys = [k for k, _ in doc]
    if sorted(keys) != ["codec", "root", "version"]:
        raise IntegrityError(
            f"object state header has fields {_short(keys, 120)}, expected codec, version, root once each"
        )
    header = dict(doc)
    if header["codec"] != CODEC_NAME:
        raise IntegrityError(
            f"object state uses codec {_short(header['codec'])}, expected {CODEC_NAME!r}"
        )
    version = header["version"]
    if type(version) is not int or version < 1:
        raise IntegrityError(f"object state has an invalid codec version {_short(version)}")
    if version > CODEC_VERSION:
        raise IntegrityError(
            f"object state uses codec version {version}; this recoverkit reads up to "
            f"{CODEC_VERSION} (written by a newer recoverkit, or damaged)"
        )
    return header


class _Obj(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) pairs, so order and duplicates stay visible."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard constant {name}")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _float(x: float) -> Any:
    return x if math.isfinite(x) else {"$float": struct.pack(">d", x).hex()}


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlong = 40


def _short(x: Any, limit: int = 80) -> str:
    """A bounded one-line repr of an untrusted value (never raises, never huge)."""
    try:
        if type(x) is int and x.bit_length() > 128:
            text = f"<int of {x.bit_length()} bits>"
        else:
            text = _repr.repr(x)
    except Exception:  # a value whose repr fails (digit limit, recursion ...)
        text = f"<{type(x).__name__}>"
    return _oneline(text if len(text) <= limit else text[: limit - 3] + "...")


def _oneline(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


class _Encoder:
    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle

    def node(self, x: Any, path: str) -> Any:
        t = type(x)
        if x is None or t is bool or t is str:
            return x
        if t is int:
            if -_INT64 <= x < _INT64:
                return x
            if x.bit_length() > _MAX_INT_BITS:
                raise EncodeError(
                    f"{path}: an integer of {x.bit_length()} bits; the codec stores up to {_MAX_INT_BITS}"
                )
            return {"$int": hex(x)}
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
            return {"$param": [x.key, x.requires_grad]} if x.parameter else {"$tensor": x.key}
        if t is complex:
            return {"$complex": [_float(x.real), _float(x.imag)]}
        if t is bytes or t is bytearray:
            return {f"${t.__name__}": _b64(bytes(x))}
        import numpy as np
        import torch

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
        elif t is torch.dtype and x in _torch_dtypes()[1]:
            return {"$dtype": _torch_dtypes()[1][x]}
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
            return {"$range": [self.node(v, path) for v in (x.start, x.stop, x.step)]}
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
    import numpy as np

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


# A node's place in the tree, built without formatting (only an error renders it):
# None is the root; otherwise (parent, kind, value) with kind "i" (list index), "k" (dict
# key) or "s" (literal text such as "._metadata").
_Path = Any


def _render(path: _Path) -> str:
    segs: list[str] = []
    while path is not None:
        path, kind, v = path
        segs.append(f"[{v}]" if kind == "i" else f"[{_short(v, 40)}]" if kind == "k" else v)
    segs.reverse()
    if len(segs) > 12:
        segs = segs[:4] + ["..."] + segs[-7:]
    return "state" + "".join(segs)


class _Decoder:
    def __init__(self, allow_pickle: bool, limit: int) -> None:
        self.allow_pickle = allow_pickle
        self.limit = limit  # the input's length: bounds what zero-byte items may claim
        self.tags: dict[str, Callable[[Any, _Path], Any]] = {
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
            "$range": self._range, "$tensor": self._tensor, "$param": self._param,
            "$pickle": self._pickle,
        }  # fmt: skip

    def node(self, j: Any, path: _Path) -> Any:
        t = type(j)
        if j is None or t is bool or t is str:
            return j
        if t is int:
            if not -_INT64 <= j < _INT64:  # the encoder writes these as $int
                raise self._bad(path, "number (beyond 64 bits)", j)
            return j
        if t is float:
            if not math.isfinite(j):  # a literal such as 1e999 overflows to inf
                raise self._bad(path, "number (not finite)", j)
            return j
        if t is list:
            return [self.node(v, (path, "i", i)) for i, v in enumerate(j)]
        if not j:
            return {}
        tag, payload = j[0]
        if not tag.startswith("$"):
            if any(k.startswith("$") for k, _ in j) or len({k for k, _ in j}) != len(j):
                raise IntegrityError(
                    f"{_render(path)}: malformed object (duplicate keys or a misplaced tag)"
                )
            return {k: self.node(v, (path, "k", k)) for k, v in j}
        if tag == "$odict" and [k for k, _ in j] in (["$odict"], ["$odict", "$metadata"]):
            out = self._dict(payload, path, OrderedDict)
            if len(j) == 2:
                out._metadata = self.node(j[1][1], (path, "s", "._metadata"))
            return out
        handler = self.tags.get(tag)
        if handler is None:
            raise IntegrityError(
                f"{_render(path)}: unknown tag {_short(tag, 40)} (damaged, or written by a newer recoverkit)"
            )
        if len(j) != 1:
            raise IntegrityError(
                f"{_render(path)}: tagged object {tag} has extra fields {_short([k for k, _ in j[1:]])}"
            )
        return handler(payload, path)

    def _bad(self, path: _Path, what: str, payload: Any) -> IntegrityError:
        return IntegrityError(f"{_render(path)}: malformed {what}: {_short(payload)}")

    def _items(self, p: Any, path: _Path, n: int | None = None) -> list[Any]:
        if type(p) is not list or (n is not None and len(p) != n):
            raise self._bad(path, "sequence", p)
        return [self.node(v, (path, "i", i)) for i, v in enumerate(p)]

    def _hashable(self, kind: Callable[[list[Any]], Any], items: list[Any], path: _Path) -> Any:
        try:
            out = kind(items)
        except TypeError:
            raise self._bad(path, "set (unhashable element)", items) from None
        if len(out) != len(items):
            raise self._bad(path, "set (duplicate element)", items)
        return out

    def _dict(self, p: Any, path: _Path, kind: Callable[[], Any]) -> Any:
        out = kind()
        if type(p) is not list:
            raise self._bad(path, "mapping", p)
        for pair in p:
            if type(pair) is not list or len(pair) != 2:
                raise self._bad(path, "mapping entry", pair)
            key = self.node(pair[0], (path, "s", "<key>"))
            try:
                if key in out:
                    raise self._bad(path, "mapping (duplicate key)", key)
            except TypeError:
                raise self._bad(path, "mapping key (unhashable)", key) from None
            out[key] = self.node(pair[1], (path, "k", key))
        return out

    def _str(self, p: Any, path: _Path, what: str) -> str:
        if type(p) is not str:
            raise self._bad(path, what, p)
        return p

    def _bytes(self, p: Any, path: _Path) -> bytes:
        try:
            return base64.b64decode(self._str(p, path, "base64"), validate=True)
        except (binascii.Error, ValueError):
            raise self._bad(path, "base64", p) from None

    def _int(self, p: Any, path: _Path) -> int:
        s = self._str(p, path, "integer")
        digits = len(s) - (3 if s.startswith("-") else 2)
        if digits > _MAX_INT_BITS // 4:
            raise IntegrityError(
                f"{_render(path)}: malformed integer: {digits} hex digits, the codec stores up to "
                f"{_MAX_INT_BITS // 4}"
            )
        if not _HEX_INT.fullmatch(s):
            raise self._bad(path, "integer", p)
        return int(s, 16)

    def _float(self, p: Any, path: _Path) -> float:
        if not _HEX_FLOAT.fullmatch(self._str(p, path, "float")):
            raise self._bad(path, "float", p)
        return float(struct.unpack(">d", bytes.fromhex(p))[0])

    def _complex(self, p: Any, path: _Path) -> complex:
        re_im = self._items(p, path, n=2)
        if not all(type(v) is float for v in re_im):
            raise self._bad(path, "complex", p)
        return complex(*re_im)

    def _np_dtype(self, p: Any, path: _Path) -> np.dtype[Any]:
        if type(p) is not str and type(p) is not list:
            raise self._bad(path, "numpy dtype", p)
        import numpy as np

        spec = p if type(p) is str else self.node(p, (path, "s", ".dtype"))
        try:
            dt = np.dtype(spec)
        except Exception:  # numpy raises several types for a bad spec
            raise self._bad(path, "numpy dtype", p) from None
        if dt.hasobject:
            raise self._bad(path, "numpy dtype (objects are never decoded)", p)
        if dt.subdtype is not None or (dt.itemsize == 0 and dt.kind in "SU"):
            raise self._bad(path, "numpy dtype (no array has it)", p)
        return dt

    def _ndarray(self, p: Any, path: _Path) -> np.ndarray[Any, Any]:
        if type(p) is not list or len(p) != 3 or type(p[1]) is not list:
            raise self._bad(path, "ndarray", p)
        import numpy as np

        shape = p[1]
        if len(shape) > 64 or not all(type(d) is int and d >= 0 for d in shape):
            raise self._bad(path, "ndarray shape", shape)
        dt, raw = self._np_dtype(p[0], path), self._bytes(p[2], path)
        numel = math.prod(shape)
        if math.prod(d for d in shape if d) * max(dt.itemsize, 1) >= _INT64:
            raise self._bad(path, "ndarray shape (too large for any array)", shape)
        if numel * dt.itemsize != len(raw) or (dt.itemsize == 0 and numel > self.limit):
            raise self._bad(
                path, f"ndarray ({len(raw)} bytes for {_short(str(dt), 40)} of shape", shape
            )
        if not raw:  # nothing to allocate: no elements, or elements of zero bytes
            return np.empty(tuple(shape), dt)
        return np.frombuffer(bytearray(raw), dt).reshape(shape)

    def _npscalar(self, p: Any, path: _Path) -> Any:
        if type(p) is not list or len(p) != 2:
            raise self._bad(path, "numpy scalar", p)
        dt, raw = self._np_dtype(p[0], path), self._bytes(p[1], path)
        if len(raw) != dt.itemsize:
            raise self._bad(path, f"numpy scalar ({len(raw)} bytes for {_short(str(dt), 40)})", p)
        import numpy as np

        return np.empty((), dt)[()] if not raw else np.frombuffer(raw, dt)[0]

    def _dtype(self, p: Any, path: _Path) -> torch.dtype:
        import torch

        dt = _torch_dtypes()[0].get(self._str(p, path, "dtype"))
        if dt is None:
            raise IntegrityError(
                f"{_render(path)}: unknown torch dtype {_short(p, 40)} (torch {torch.__version__})"
            )
        return dt

    def _size(self, p: Any, path: _Path) -> torch.Size:
        if type(p) is not list or not all(type(d) is int and -_INT64 <= d < _INT64 for d in p):
            raise self._bad(path, "torch.Size", p)
        import torch

        return torch.Size(p)

    def _device(self, p: Any, path: _Path) -> torch.device:
        if len(self._str(p, path, "device")) > _MAX_DEVICE_CHARS:
            raise self._bad(path, "device", p)
        import torch

        try:
            return torch.device(p)
        except (RuntimeError, ValueError, TypeError):
            raise self._bad(path, "device", p) from None

    def _range(self, p: Any, path: _Path) -> range:
        items = self._items(p, path, n=3)
        if not all(type(v) is int for v in items) or items[2] == 0:
            raise self._bad(path, "range", p)
        return range(*items)

    def _tensor(self, p: Any, path: _Path) -> TensorLeaf:
        return TensorLeaf(self._str(p, path, "tensor key"))

    def _param(self, p: Any, path: _Path) -> TensorLeaf:
        if type(p) is not list or len(p) != 2 or type(p[0]) is not str or type(p[1]) is not bool:
            raise self._bad(path, "parameter", p)
        return TensorLeaf(p[0], parameter=True, requires_grad=p[1])

    def _pickle(self, p: Any, path: _Path) -> Any:
        if not self.allow_pickle:
            raise PickleNotAllowedError(
                f"{_render(path)}: the checkpoint holds a pickled object; pass allow_pickle=True only if you trust it"
            )
        raw = self._bytes(p, path)
        try:
            return pickle.loads(raw)  # noqa: S301 - explicitly allowed by the caller
        except Exception as e:
            raise IntegrityError(
                f"{_render(path)}: the pickled value cannot be loaded ({type(e).__name__}: {_short(str(e), 120)})"
            ) from None
