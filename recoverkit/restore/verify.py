"""A full checksum pass over committed steps: every piece and every blob, every fault named.

Restore already verifies every byte it reads, but it stops at the first fault and reads only
what one rank needs. This pass reads *everything* a step holds and reports *every* fault:
the file, the tensor (or blob), and the expected versus found value (CRC-32C, size).

Node-local steps are read straight from their segment files in bounded chunks (the CRC is
extended chunk by chunk, so memory stays at one chunk whatever the piece size); other tiers
go through :meth:`ReadableTier.read` one record at a time. A ``progress`` callback receives
the bytes checked so far, for progress bars.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ..errors import CheckpointNotFoundError, IncompatibleCheckpointError, IntegrityError
from ..format.checksum import crc32c, hexcrc
from ..format.manifest import MANIFEST_NAME, Manifest, PackRecord
from ..storage.base import ReadableTier, Region
from ..storage.fs import open_regular
from ..storage.local import LocalTier
from .reader import check_blob

__all__ = ["Fault", "StepReport", "VerifyReport", "verify_steps", "verify_step", "step_bytes"]

CHUNK = 8 << 20  # bytes read per syscall on the local fast path

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Fault:
    """One thing that is wrong with a step.

    Attributes:
        step: the step.
        path: the damaged file (or manifest), as a path or URL.
        item: what lives there: ``tensor 'model/w' [offsets]``, ``blob of rank 0``, ``manifest``.
        expected: what the manifest records (a checksum or a size).
        found: what is there.
    """

    step: int
    path: str
    item: str
    expected: str
    found: str

    @property
    def message(self) -> str:
        return f"{self.path}: {self.item}: expected {self.expected}, found {self.found}"

    def to_json(self) -> dict[str, object]:
        return {"step": self.step, "path": self.path, "item": self.item, "expected": self.expected,
                "found": self.found, "message": self.message}


@dataclass
class StepReport:
    """The outcome of verifying one step."""

    step: int
    where: str
    nbytes: int = 0
    pieces: int = 0
    faults: list[Fault] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults

    def to_json(self) -> dict[str, object]:
        return {"step": self.step, "where": self.where, "ok": self.ok, "nbytes": self.nbytes,
                "pieces": self.pieces, "faults": [f.to_json() for f in self.faults]}


@dataclass
class VerifyReport:
    """The outcome of a whole pass: one report per step, bytes and time."""

    steps: list[StepReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.steps)

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "nbytes": self.nbytes, "seconds": self.seconds,
                "gb_per_s": self.gb_per_s, "steps": [s.to_json() for s in self.steps]}


def step_bytes(manifest: Manifest) -> int:
    """Bytes a full pass over ``manifest`` reads (each stored piece once)."""
    return sum(r.nbytes for r, _ in _records(manifest))


def verify_steps(
    tier: ReadableTier, steps: Sequence[int], *, progress: Progress | None = None
) -> VerifyReport:
    """Verify every listed step of ``tier``; never raises for a damaged step, reports it."""
    report = VerifyReport()
    t0 = time.perf_counter()
    for step in steps:
        report.steps.append(verify_step(tier, step, progress=progress))
    report.seconds = time.perf_counter() - t0
    return report


def verify_step(tier: ReadableTier, step: int, *, progress: Progress | None = None) -> StepReport:
    """Check the manifest, the files' sizes and the CRC-32C of every piece and blob of ``step``."""
    where = tier.describe(step)
    report = StepReport(step, where)
    manifest = _load_manifest(tier, step, report)
    if manifest is None:
        return report
    if isinstance(tier, LocalTier):
        _check_sizes(tier, step, manifest, report)
        checker: Callable[[Region, str], Fault | None] = _local_checker(tier, step, progress)
    else:
        checker = _tier_checker(tier, step, progress)
    for rec, item in _records(manifest):
        report.pieces += 1
        report.nbytes += rec.nbytes
        fault = checker(rec, item)
        if fault is not None:
            report.faults.append(fault)
    _check_blobs(tier, step, manifest, report)
    return report


def _check_blobs(tier: ReadableTier, step: int, manifest: Manifest, report: StepReport) -> None:
    """Every blob whose bytes passed must also decode, naming only tensors the step holds."""
    damaged = {f.item for f in report.faults}
    for b in manifest.blobs:
        item = f"object state (blob) of rank {b.rank}"
        if item in damaged:
            continue
        buf = bytearray(b.nbytes)  # bounded: validated against the file's real size
        try:
            tier.read(step, [(b, buf)])
            check_blob(manifest, b.rank, bytes(buf))
        except (IntegrityError, OSError) as e:
            report.faults.append(Fault(step, f"{report.where}/{b.file}", item, "an object tree that decodes", str(e)))


def _load_manifest(tier: ReadableTier, step: int, report: StepReport) -> Manifest | None:
    """The step's manifest (self-checksum and version checked), or None with a fault noted."""
    try:
        if isinstance(tier, LocalTier):
            path = os.path.join(tier.step_path(step), MANIFEST_NAME)
            try:
                data = tier.fs.read_file(path)
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{path}: no such file") from None
            manifest = Manifest.from_bytes(data, path=path, engine=tier.fs.engine)
            if manifest.step != step:
                raise IntegrityError(f"{path}: manifest is for step {manifest.step}, directory says {step}")
            return manifest
        return tier.manifest(step)
    except (IntegrityError, IncompatibleCheckpointError, OSError) as e:
        report.faults.append(Fault(step, report.where + "/" + MANIFEST_NAME, "manifest", "a valid manifest", str(e)))
        return None


def _check_sizes(tier: LocalTier, step: int, manifest: Manifest, report: StepReport) -> None:
    """A missing or resized segment file is a fault of its own (truncation shows here first)."""
    where = tier.step_path(step)
    for name, size in sorted(manifest.files.items()):
        path = os.path.join(where, name)
        try:
            found = tier.fs.size(path)
        except (OSError, IntegrityError) as e:  # not a regular file (a symlink, a FIFO, ...)
            report.faults.append(Fault(step, path, "file", f"{size} bytes", str(e)))
            continue
        if found is None:
            report.faults.append(Fault(step, path, "file", f"{size} bytes", "no such file"))
            continue
        if found != size:
            report.faults.append(Fault(step, path, "file size", f"{size} bytes", f"{found} bytes"))


def _records(manifest: Manifest) -> Iterator[tuple[Region, str]]:
    """Every stored record once: blobs, then each tensor's shards (aliases hold none); the
    shards of a pack through their pack, once."""
    for b in sorted(manifest.blobs, key=lambda b: b.rank):
        yield b, f"object state (blob) of rank {b.rank}"
    packs: dict[PackRecord, list[str]] = {}
    for key in sorted(manifest.tensors):
        rec = manifest.tensors[key]
        for s in rec.shards:
            if s.pack is not None:
                packs.setdefault(s.pack, []).append(key)
                continue
            yield s, f"tensor {key!r} shard offsets={list(s.offsets)} shape={list(s.shape)} ({rec.dtype})"
    for pack, keys in sorted(packs.items(), key=lambda pk: (pk[0].rank, pk[0].offset)):
        more = f" ... {keys[-1]!r}" if len(keys) > 1 else ""
        yield pack, f"pack of {len(keys)} tensor(s) {keys[0]!r}{more} at {pack.offset}"


def _local_checker(
    tier: LocalTier, step: int, progress: Progress | None
) -> Callable[[Region, str], Fault | None]:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    where = tier.step_path(step)

    def check(rec: Region, item: str) -> Fault | None:
        path = os.path.join(where, rec.file)
        try:
            fd, _ = open_regular(path, os.O_RDONLY, _refuse)
        except (OSError, IntegrityError) as e:
            _advance(progress, rec.nbytes)
            return Fault(step, path, item, f"crc32c {hexcrc(rec.crc32c)}", f"unreadable ({e})")
        try:
            crc, got = 0, 0
            while got < rec.nbytes:
                n = os.preadv(fd, [view[: min(CHUNK, rec.nbytes - got)]], rec.offset + got)
                if n == 0:
                    break
                crc = crc32c(view[:n], crc, engine=tier.fs.engine)
                got += n
                _advance(progress, n)
        finally:
            os.close(fd)
        if got < rec.nbytes:
            _advance(progress, rec.nbytes - got)
            return Fault(step, path, item, f"bytes [{rec.offset}, {rec.offset + rec.nbytes})",
                         f"the file ends at {rec.offset + got} (truncated)")
        if crc != rec.crc32c:
            return Fault(step, path, item, f"crc32c {hexcrc(rec.crc32c)}", f"crc32c {hexcrc(crc)}")
        return None

    return check


def _tier_checker(
    tier: ReadableTier, step: int, progress: Progress | None
) -> Callable[[Region, str], Fault | None]:
    def check(rec: Region, item: str) -> Fault | None:
        buf = bytearray(rec.nbytes)
        try:
            tier.read(step, [(rec, buf)])
        except (IntegrityError, OSError) as e:
            return Fault(step, f"{tier.describe(step)}/{rec.file}", item, f"crc32c {hexcrc(rec.crc32c)}", str(e))
        finally:
            _advance(progress, rec.nbytes)
        return None

    return check


def _refuse(path: str, kind: str) -> IntegrityError:
    return IntegrityError(f"{path} is {kind}, not a regular file", path=path)


def _advance(progress: Progress | None, n: int) -> None:
    if progress is not None and n:
        progress(n)
