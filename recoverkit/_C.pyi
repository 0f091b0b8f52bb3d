"""Type stubs of the native copy/IO engine ``recoverkit._C`` (C++17, pybind11).

``recoverkit._fallback`` implements the same names in Python; ``recoverkit._native.engine``
is whichever was selected. Every blocking call releases the GIL. Errors are Python
exceptions: ``ValueError`` for bad arguments, ``recoverkit.errors.PoolExhaustedError``,
``CopyError``, ``IntegrityError`` (checksum mismatch, truncation, a segment that is a
symlink or not a regular file, a CRC that is not in [0, 2**32)), and ``OSError`` with the
errno and path for I/O failures (ENOSPC, EIO, short writes).

Integers: every size, offset, pointer and count is an integer (``TypeError`` otherwise);
a negative one is ``ValueError`` and one that does not fit in a signed 64-bit integer (or,
for ``device``, a C int) is ``OverflowError``. A CRC argument outside [0, 2**32) is
``ValueError``. Paths are path-likes; a path with a NUL byte is ``ValueError``.

Raw pointers (``crc32c_ptr``, ``CopyEngine.submit``, ``write_segment``, ``read_segment``):
before any byte is touched, every host range ``[ptr, ptr + nbytes)`` is checked to be
*mapped* (``msync(MS_ASYNC)``: one system call per range, or per run of ranges sharing
pages, whatever the length; about 0.1-0.3 us). A range with an unmapped page is
``OSError(errno.EFAULT, "<call>: <arg> [0x.., 0x..) (n bytes) is not mapped memory ...")``
on every path, with or without ``crc``, buffered or O_DIRECT, and no file is created.
What remains the caller's contract, because the check cannot see it at a cost the save
path can afford:

* pages that are mapped but not readable (``PROT_NONE`` guard pages, address ranges that
  are only reserved, such as a CUDA device pointer passed as a host pointer), and
  destinations that are mapped read-only. Paths where the kernel reads or writes the
  memory (buffered ``write_segment``, which writes each piece before it checksums it, and
  ``read_segment``) report those as ``OSError(EFAULT)`` too; the copy engine, the O_DIRECT
  bounce copies and ``crc32c_ptr`` fault (SIGSEGV).
* the memory stays mapped and the right size until the call returns (for
  ``CopyEngine.submit``: until the handle is done): nothing else frees or unmaps it meanwhile.
* a destination of ``nbytes`` really is the caller's buffer of at least ``nbytes`` bytes: the
  engine cannot know the size of the object behind a pointer.
"""

from typing import Any

BACKEND: str  # "native"

def crc32c(data: Any, value: int = 0) -> int:
    """CRC-32C of a C-contiguous buffer, extending ``value``."""

def crc32c_ptr(ptr: int, nbytes: int, value: int = 0) -> int:
    """CRC-32C of ``nbytes`` at a raw address; OSError(EFAULT) when a page of the range is
    not mapped (see the module docstring for what stays the caller's contract)."""

def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC of A+B from the CRCs of A and B and the length of B."""

def hardware_crc32c() -> bool:
    """True when the SSE4.2 instruction is used (software slicing-by-8 otherwise)."""

def cuda_available() -> bool:
    """True when a CUDA driver was found at run time (loaded dynamically)."""

class StagingPool:
    """One page-aligned arena; first-fit, coalescing slot allocation; optional mlock and
    CUDA host registration."""

    def __init__(
        self, capacity_bytes: int, *, alignment: int = 4096, lock_memory: bool = False,
        register_cuda: bool = True,
    ) -> None: ...
    def alloc(self, nbytes: int) -> int:
        """An aligned offset; PoolExhaustedError when no hole is large enough."""
    def free(self, offset: int) -> None: ...
    def address(self, offset: int) -> int: ...
    def view(self, offset: int, nbytes: int) -> memoryview: ...
    def close(self) -> None: ...
    def __enter__(self) -> StagingPool: ...
    def __exit__(self, *exc: object) -> None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def high_water(self) -> int: ...
    @property
    def alignment(self) -> int: ...
    @property
    def locked(self) -> bool: ...
    @property
    def cuda_registered(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def base_ptr(self) -> int: ...

class CopyHandle:
    def wait(self, timeout_s: float | None = None) -> bool: ...
    def done(self) -> bool: ...
    @property
    def error(self) -> str | None: ...
    def result(self, timeout_s: float | None = None) -> int:
        """The CRC-32C of the copied bytes; CopyError if the copy failed, TimeoutError."""
    @property
    def crc32c(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def elapsed_s(self) -> float: ...

class CopyEngine:
    """N worker threads copying ``(src, nbytes) -> dst`` in chunks with CRC on the fly;
    device sources (``device >= 0``) copy asynchronously on a dedicated stream ordered after
    an event recorded on ``stream``."""

    def __init__(self, num_threads: int = 2, chunk_bytes: int = 8 << 20) -> None: ...
    def submit(
        self, src_ptr: int, dst_ptr: int, nbytes: int, *, crc: bool = True, device: int = -1,
        stream: int = 0,
    ) -> CopyHandle:
        """Queues a copy. OSError(EFAULT) at once when a page of ``dst_ptr``'s range, or of
        ``src_ptr``'s for a host source, is not mapped; a device source is the driver's to
        check (the copy fails with its error). Both ranges must stay valid until the handle
        is done."""
    def close(self) -> None: ...
    def stats(self) -> dict[str, int]: ...

def write_segment(path: str, items: list[tuple[int, int, int]], *, direct: bool = False,
                  fsync: bool = True, crc: bool = False) -> list[int] | None:
    """Writes ``(file_offset, src_ptr, nbytes)`` items with pwrite (optionally O_DIRECT,
    through writer threads) and fsyncs; every return code checked. With ``crc=True``
    returns each item's CRC-32C (in ``items`` order), computed in the same pass.

    Before the file is opened: items must not overlap (ValueError) nor end past the largest
    file offset (OverflowError), and every source range must be mapped (OSError(EFAULT)).
    The file is created (mode 0644) or rewritten without following a symlink and without
    blocking: a symlink is OSError(ELOOP), a FIFO without a reader or a socket
    OSError(ENXIO), any other file that is not regular OSError(EINVAL), a regular file with
    other hard links OSError(EMLINK); each names the path and is refused before anything
    is truncated or written."""

def read_segment(path: str, items: list[tuple[int, int, int, int]]) -> list[int]:
    """Reads ``(file_offset, dst_ptr, nbytes, expected_crc)`` items and returns their
    CRC-32Cs. Every item is verified: ``expected_crc`` must be an integer in [0, 2**32)
    (IntegrityError naming the file otherwise; there is no "unchecked" value).

    Before any byte is read: the file is opened with O_NOFOLLOW and O_NONBLOCK (a symlink is
    IntegrityError, a FIFO never blocks), it must be a regular file (IntegrityError), every
    item's region ``[file_offset, file_offset + nbytes)`` must lie inside its size
    (IntegrityError naming the path, the region and the size), and every destination range
    must be mapped (OSError(EFAULT)). A checksum mismatch is IntegrityError; a short read is
    never a success."""
