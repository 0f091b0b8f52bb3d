"""The file ``torch.save`` writes, written with the standard library only.

Where it sits: the writing half of ``--format torch`` (``to_torch.py`` decides what goes in;
this module knows the file format). Nothing here imports torch, so exporting a checkpoint
does not pay for ``import torch`` (about a second of start-up).

The format (torch 2.x, read from ``torch/serialization.py``): a zip archive whose records
are stored uncompressed under one top-level folder, in this order:

* ``<name>/data.pkl``: the object tree, pickle protocol 2. A tensor is
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
  OrderedDict())``; for the dtypes without a typed storage class (``uint16``, ``float8_*``,
  ``bits*`` ...) it is ``_rebuild_tensor_v3(...)`` with the dtype as a last argument. A
  storage is a persistent id ``("storage", <storage class>, "<key>", "cpu", <numel>)``, the
  class ``torch.FloatStorage`` etc. (numel counted in elements) or
  ``torch.storage.UntypedStorage`` (numel counted in bytes). Storages are numbered in the
  order the pickler meets them; the unpickler shares one storage per key, and the pickle
  memo makes a tensor met twice one tensor.
* ``.format_version`` (``1``), ``.storage_alignment`` (``64``), ``byteorder``
  (``little``), then ``data/<key>`` with each storage's bytes, then ``version`` (``3``) and
  ``.data/serialization_id`` (40 decimal digits).

Every record's data starts at a multiple of 64 bytes (an ``FB`` extra field of ``Z``
padding, as torch's writer does, so ``torch.load(mmap=True)`` works); a record with data
has the "data descriptor" flag and a descriptor after its bytes, an empty one has neither;
the end of the archive is a zip64 end record, its locator and the classic end record.
Records of 4 GiB or more (and offsets beyond 4 GiB) use zip64 extra fields.

Example:
    >>> import io
    >>> plan = TorchFile()
    >>> t = plan.tensor("float32", (2,), source=b"\\x00\\x00\\x80?\\x00\\x00\\x00@")
    >>> buf = io.BytesIO()
    >>> plan.write(buf, {"w": t}, read=lambda source: source)
    >>> buf.getvalue()[:4]
    b'PK\\x03\\x04'
"""

from __future__ import annotations

import io
import pickle
import secrets
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

from ...format.dtypes import ITEMSIZE as _ITEMSIZE

__all__ = [
    "TorchFile",
    "TensorStub",
    "StorageStub",
    "LEGACY_STORAGE",
    "UNTYPED_STORAGE",
    "ITEMSIZE",
    "torch_savable",
    "ALIGNMENT",
]

ALIGNMENT = 64  # torch.serialization._get_storage_alignment()
_ZIP64_LIMIT = 0xFFFFFFFF

#: dtype -> the typed storage class torch pickles a tensor of that dtype with
LEGACY_STORAGE = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
    "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
    "complex128": "ComplexDoubleStorage", "complex64": "ComplexFloatStorage",
}  # fmt: skip
#: dtypes torch pickles with an untyped storage and ``_rebuild_tensor_v3`` (``torch.storage._new_dtypes()``)
UNTYPED_STORAGE = frozenset({
    "uint16", "uint32", "uint64", "complex32",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
})  # fmt: skip
#: bytes per element of every dtype a torch file can hold (from the one dtype table)
ITEMSIZE = {n: _ITEMSIZE[n] for n in _ITEMSIZE if n in LEGACY_STORAGE or n in UNTYPED_STORAGE}


def torch_savable(dtype: str) -> bool:
    """Whether ``torch.save`` can hold a tensor of ``dtype`` (by name; ``int4`` cannot)."""
    return dtype in LEGACY_STORAGE or dtype in UNTYPED_STORAGE


class _Global:
    """A module-level name pickled by reference (``GLOBAL module name``) without importing
    the module: the standard pickler imports it to check the name, which would import torch."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # the pickler accepts only callables in a reduce
        raise TypeError(f"{self.module}.{self.name} is a reference to be pickled, not called here")


class StorageStub:
    """A storage of the file: its dtype and size, and where its bytes come from.

    ``source`` is handed back to the ``read`` callback of :meth:`TorchFile.write` when the
    bytes are written; ``key`` is set when the pickler first meets the storage.
    """

    __slots__ = ("dtype", "nbytes", "source", "key")

    def __init__(self, dtype: str, nbytes: int, source: Any) -> None:
        self.dtype, self.nbytes, self.source = dtype, nbytes, source
        self.key: str | None = None


class TensorStub:
    """A contiguous tensor of the file: a whole storage viewed with ``shape``."""

    __slots__ = ("storage", "shape", "requires_grad")

    def __init__(
        self, storage: StorageStub, shape: tuple[int, ...], requires_grad: bool = False
    ) -> None:
        self.storage, self.shape, self.requires_grad = storage, shape, requires_grad


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


class _Pickler(pickle._Pickler):  # type: ignore[misc,name-defined]
    """Protocol-2 pickler writing tensors and storages as torch does, globals unchecked."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: BinaryIO, plan: TorchFile) -> None:
        super().__init__(file, protocol=2)
        self.plan = plan

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not StorageStub:
            return None
        plan = self.plan
        if obj.key is None:
            obj.key = str(len(plan.storages))
            plan.storages.append(obj)
        if obj.dtype in LEGACY_STORAGE:
            kind, numel = (
                plan.global_("torch", LEGACY_STORAGE[obj.dtype]),
                obj.nbytes // ITEMSIZE[obj.dtype],
            )
        else:
            kind, numel = plan.global_("torch.storage", "UntypedStorage"), obj.nbytes
        return ("storage", kind, obj.key, "cpu", numel)

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not TensorStub:
            return NotImplemented
        args: tuple[Any, ...] = (
            obj.storage,
            0,
            obj.shape,
            _contiguous_stride(obj.shape),
            obj.requires_grad,
            OrderedDict(),
        )
        if obj.storage.dtype in LEGACY_STORAGE:
            return self.plan.global_("torch._utils", "_rebuild_tensor_v2"), args
        return self.plan.global_("torch._utils", "_rebuild_tensor_v3"), (
            *args,
            self.plan.global_("torch", obj.storage.dtype),
        )

    def _save_global(self, obj: _Global) -> None:
        # the pure-Python pickler's own methods (typeshed does not describe pickle._Pickler)
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    dispatch[_Global] = _save_global  # type: ignore[assignment]


class TorchFile:
    """Plan and write one torch file: make stubs with :meth:`tensor`, put them anywhere in
    an object tree, then :meth:`write` the tree; each storage's bytes are asked for (and
    may be dropped) one at a time, in file order."""

    def __init__(self) -> None:
        self.storages: list[StorageStub] = []
        self._globals: dict[tuple[str, str], _Global] = {}

    def global_(self, module: str, name: str) -> _Global:
        g = self._globals.get((module, name))
        if g is None:
            g = self._globals[(module, name)] = _Global(module, name)
        return g

    def tensor(
        self, dtype: str, shape: Iterable[int], *, source: Any, requires_grad: bool = False
    ) -> TensorStub:
        """A stub for a contiguous tensor whose bytes ``read(source)`` will give.

        Raises:
            ValueError: ``torch.save`` cannot hold ``dtype`` (see :func:`torch_savable`).
        """
        if not torch_savable(dtype):
            raise ValueError(f"a torch file cannot hold {dtype} tensors (torch.save refuses them)")
        shape = tuple(int(d) for d in shape)
        numel = 1
        for d in shape:
            numel *= d
        return TensorStub(StorageStub(dtype, numel * ITEMSIZE[dtype], source), shape, requires_grad)

    def pickle(self, tree: Any) -> bytes:
        """``data.pkl`` of ``tree`` (numbers the storages it holds, in the order met)."""
        buf = io.BytesIO()
        _Pickler(buf, self).dump(tree)
        return buf.getvalue()

    def write(
        self,
        out: BinaryIO,
        tree: Any,
        *,
        read: Callable[[Any], Any],
        archive: str = "archive",
        progress: Callable[[int], None] | None = None,
        zip64_limit: int = _ZIP64_LIMIT,
    ) -> int:
        """Write ``tree`` as a torch file to the binary stream ``out``; returns the bytes of
        tensor data written. ``read(source)`` gives one storage's bytes (any object with the
        buffer protocol, exactly the storage's size); ``zip64_limit`` (tests only) is the
        size from which records and offsets are written as zip64."""
        data_pkl = self.pickle(tree)
        zw = _ZipWriter(out, archive, zip64_limit)
        zw.record("data.pkl", data_pkl)
        zw.record(".format_version", b"1")
        zw.record(".storage_alignment", str(ALIGNMENT).encode())
        zw.record("byteorder", b"little")
        total = 0
        for st in self.storages:
            data = memoryview(read(st.source)).cast("B")
            if data.nbytes != st.nbytes:
                raise ValueError(
                    f"storage {st.key}: got {data.nbytes} bytes for a {st.dtype} storage of {st.nbytes}"
                )
            zw.record(f"data/{st.key}", data)
            total += data.nbytes
            if progress is not None:
                progress(data.nbytes)
            del data
        zw.record("version", b"3\n")
        zw.record(".data/serialization_id", str(secrets.randbelow(10**40)).zfill(40).encode())
        zw.finish()
        return total


class _ZipWriter:
    """Stored (uncompressed) zip records laid out as torch's writer lays them out."""

    def __init__(self, out: BinaryIO, archive: str, zip64_limit: int) -> None:
        self.out, self.prefix, self.limit = out, archive + "/", zip64_limit
        self.pos = 0
        self.central: list[bytes] = []

    def _write(self, b: bytes | memoryview) -> None:
        mv = memoryview(b)
        while mv.nbytes:  # a raw stream may take less than asked for
            n = self.out.write(mv)
            if n is None:  # pragma: no cover - non-blocking streams are not supported
                raise OSError("short write to a non-blocking stream")
            mv = mv[n:]
            self.pos += n

    def record(self, name: str, data: bytes | memoryview) -> None:
        fname = (self.prefix + name).encode()
        size = memoryview(data).nbytes
        offset = self.pos
        big = size >= self.limit
        flags = 0x0800 | (0x0008 if size else 0)
        local_extra = struct.pack("<HHQQ", 0x0001, 16, 0, 0) if big else b""
        start = offset + 30 + len(fname) + len(local_extra) + 4
        pad = -start % ALIGNMENT
        local_extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
        sizes32 = 0xFFFFFFFF if big else 0
        self._write(
            struct.pack(
                "<4sHHHHHIIIHH",
                b"PK\x03\x04",
                0,
                flags,
                0,
                0,
                0,
                0,
                sizes32,
                sizes32,
                len(fname),
                len(local_extra),
            )
            + fname
            + local_extra
        )
        crc = zlib.crc32(data) if size else 0
        self._write(data)
        if size:
            if big:
                self._write(struct.pack("<4sIQQ", b"PK\x07\x08", crc, size, size))
            else:
                self._write(struct.pack("<4sIII", b"PK\x07\x08", crc, size, size))
        extra, csize = b"", size
        if big:
            extra += struct.pack("<QQ", size, size)
            csize = 0xFFFFFFFF
        cofs = offset
        if offset >= self.limit:
            extra += struct.pack("<Q", offset)
            cofs = 0xFFFFFFFF
        if extra:
            extra = struct.pack("<HH", 0x0001, len(extra)) + extra
        self.central.append(
            struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0, 0, flags, 0, 0, 0, crc, csize, csize,
                        len(fname), len(extra), 0, 0, 0, 0, cofs)
            + fname
            + extra
        )  # fmt: skip

    def finish(self) -> None:
        cd_start = self.pos
        for entry in self.central:
            self._write(entry)
        cd_size = self.pos - cd_start
        n = len(self.central)
        eocd64 = self.pos
        self._write(
            struct.pack(
                "<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 45, 0, 0, n, n, cd_size, cd_start
            )
        )
        self._write(struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1))
        n16 = min(n, 0xFFFF)
        self._write(
            struct.pack(
                "<4sHHHHIIH",
                b"PK\x05\x06",
                0,
                0,
                n16,
                n16,
                min(cd_size, 0xFFFFFFFF),
                min(cd_start, 0xFFFFFFFF),
                0,
            )
        )
