"""Restore straight into the live tensors from a step a tier holds in memory.

The in-place path of restore, used when a tier serves a step's bytes as memory
(:meth:`~recoverkit.storage.base.ReadableTier.memory_view`: a host snapshot, shared memory,
bytes fetched from a peer)::

    reader (read_state, in place)  every whole tensor whose pieces all lie in memory becomes a
                                   PendingTensor: views of its pieces, no allocation, no copy
    verify                         every region's CRC-32C, on several threads, before
                                   read_state returns (a fault is the step's IntegrityError;
                                   nothing was applied); skipped for the views of a tier that
                                   checked them itself (ReadableTier.views_verified)
    apply (restore.apply)          resolve: each PendingTensor meets its live target (a module
                                   parameter or buffer, a torch optimizer's state tensor, a
                                   plain tensor of the state); one of the same dtype and shape,
                                   contiguous, on the CPU or a GPU, takes the bytes in place:
                                   the target itself stands in the tree, so the state's checks
                                   see it and load_state_dict has nothing left to copy. An
                                   optimizer without that state yet (a restarted process's
                                   fresh one) gets new targets built from the record, of the
                                   dtype, shape and device torch would keep (state_target):
                                   the bytes land in them once. Every other PendingTensor
                                   becomes a new tensor (today's path)
                    state.check    every target fits, or nothing changes
                    copy           view -> target storage (the tier's copy engine on several
                                   threads for CPU targets; torch copy_ for small pieces, and
                                   host -> device for a GPU target), then load_state_dict

So a restore from memory costs one CRC pass and one copy of the bytes, into memory that is
already there (the copy path allocated and page-faulted a new tensor per piece, then copied
again in load_state_dict); for a fresh optimizer's state, into new memory whose pages the
engine's threads fault in as they copy. Restore stays all or nothing (invariant 6): every
CRC, then every check, then the first byte (new targets are seen by nobody before that).

A tree read in place holds PendingTensors until :func:`resolve` runs: it is for restore
(``apply_restored``), never handed to a user. Between the CRC pass and the copy the tier must
keep the step (a Checkpointer's restore settles its saves first, so no snapshot is given up
meanwhile; a shared-memory view pins its slot).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .. import _native
from ..errors import IntegrityError
from ..format.checksum import hexcrc
from ..format.dtypes import dtype_from_name, from_bytes, itemsize
from ..format.manifest import PackRecord, ShardRecord, TensorRecord
from ..storage.base import ReadableTier
from .reader import slab_layout

__all__ = [
    "Copy",
    "PendingTensor",
    "Unit",
    "collect",
    "copy_all",
    "materialize",
    "resolve",
    "state_target",
    "tier_engine",
    "verify",
    "views_verified",
    "worker_threads",
]

#: bytes one CRC task covers (a large region is split, a run of small ones grouped)
CHUNK_BYTES = 8 << 20
#: below this many bytes in all, one thread checks everything
PARALLEL_BYTES = 16 << 20
MAX_THREADS = 8
#: a tensor at least this large is copied by the native engine (smaller: torch copy_)
ENGINE_BYTES = 256 << 10
#: the engine's piece size for a target in new memory: the threads fault its pages in
#: small steps side by side (less CPU than 8 MiB pieces or torch's copy_ there)
NEW_MEMORY_CHUNK_BYTES = 256 << 10


@dataclass(frozen=True)
class Unit:
    """One checksummed region in memory: a shard, or the pack that holds packed shards."""

    view: memoryview  # read-only, format "B", exactly the region's bytes
    crc32c: int
    what: str  # for messages: the tensor key and the region
    #: the tier already checked these bytes against ``crc32c`` (``ReadableTier.views_verified``):
    #: :func:`verify` skips the unit
    verified: bool = False


class PendingTensor:
    """A tensor of the step whose bytes lie in a tier's memory: views of its pieces, verified
    by :func:`verify` before restore uses them, copied once into the live target
    (:meth:`copy_into`) or into a new tensor (:meth:`materialize`).

    ``pieces`` are ``(byte offset in the tensor, view)``, tiling its bytes in C order.
    ``parameter``: None, or the ``requires_grad`` of the ``nn.Parameter`` it was saved as
    (a new tensor made of it is wrapped the same way).
    """

    __slots__ = ("key", "dtype", "shape", "nbytes", "pieces", "engine", "parameter", "into_new", "_tensor")

    def __init__(
        self,
        key: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        pieces: list[tuple[int, memoryview]],
        *,
        engine: Any = None,
    ) -> None:
        self.key, self.dtype, self.shape, self.pieces = key, dtype, shape, pieces
        self.nbytes = sum(v.nbytes for _, v in pieces)
        self.engine = engine  # the tier's engine (None: the process-wide one)
        self.parameter: bool | None = None
        self.into_new = False  # its target is new memory (state_target): never touched yet
        self._tensor: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"<PendingTensor {self.key!r} {list(self.shape)} {self.dtype}>"

    def fits(self, target: Any) -> bool:
        """Whether the bytes can land in ``target`` as they are: a dense contiguous tensor
        (or Parameter) of the same dtype and shape, on the CPU or a GPU."""
        return (
            type(target) in (torch.Tensor, torch.nn.Parameter)
            and target.dtype == self.dtype
            and tuple(target.shape) == self.shape
            and target.layout == torch.strided
            and target.device.type in ("cpu", "cuda")
            and target.is_contiguous()
            and not target.is_conj()
            and not target.is_neg()
            and not target.is_inference()
            and _nbytes_of(target) == self.nbytes
        )

    def copy_into(self, target: torch.Tensor) -> None:
        """Copy the (verified) bytes into ``target``, which :meth:`fits`."""
        dst = _byte_view(target)
        if dst is None or dst.numel() != self.nbytes:
            raise ValueError(
                f"{self.key!r}: {self.nbytes} bytes do not fit the target {list(target.shape)} {target.dtype}"
            )
        self._copy_to(dst)

    def materialize(self) -> torch.Tensor:
        """A new tensor holding the bytes (one per PendingTensor: aliases stay shared)."""
        if self._tensor is None:
            buf = torch.empty(self.nbytes, dtype=torch.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # frombuffer of read-only memory
                self._copy_to(buf)
            out = from_bytes(buf, self.dtype, self.shape)
            if self.parameter is not None:
                out = torch.nn.Parameter(out, requires_grad=self.parameter)
            self._tensor = out
        return self._tensor

    def _copy_to(self, dst: torch.Tensor) -> None:
        with torch.no_grad():
            for off, view in self.pieces:
                dst[off : off + view.nbytes].copy_(_source(view))


#: a planned in-place copy: the live target and what lands in it
Copy = tuple[torch.Tensor, PendingTensor]


# --------------------------------------------------------------------------- reader side
def collect(
    tier: ReadableTier, step: int, rec: TensorRecord, units: dict[tuple[str, int, int], Unit]
) -> PendingTensor | None:
    """The PendingTensor of ``rec`` when every piece of it lies in ``tier``'s memory and the
    pieces are whole rows in order (slabs along dim 0, as saves split tensors), else None
    (the copy path reads it). The regions to verify are added to ``units`` (one per shard,
    or per pack for packed shards)."""
    layout = slab_layout(step, rec)
    if layout is None or rec.nbytes == 0 or rec.nbytes != _numel(rec.shape) * itemsize(rec.dtype):
        return None  # (a size that does not match is the copy path's to report)
    row_bytes, slabs = layout
    pieces: list[tuple[int, memoryview]] = []
    for start, _rows, shard in slabs:
        view = _piece_view(tier, step, rec.key, shard, units)
        if view is None:
            return None
        pieces.append((start * row_bytes, view))
    return PendingTensor(
        rec.key, dtype_from_name(rec.dtype), tuple(rec.shape), pieces, engine=tier_engine(tier)
    )


def tier_engine(tier: ReadableTier) -> Any:
    """The engine ``tier`` computes with (its own ``engine``, or its file system's), or None
    for the process-wide one: the CRC pass and the copies of a restore use the engine the
    Checkpointer was given."""
    engine = getattr(tier, "engine", None)
    return engine if engine is not None else getattr(getattr(tier, "fs", None), "engine", None)


def _piece_view(
    tier: ReadableTier,
    step: int,
    key: str,
    shard: ShardRecord,
    units: dict[tuple[str, int, int], Unit],
) -> memoryview | None:
    """The view of one shard's bytes, its checksummed region noted in ``units``."""
    region: ShardRecord | PackRecord = shard.pack if shard.pack is not None else shard
    ident = (region.file, region.offset, region.nbytes)
    unit = units.get(ident)
    if unit is None:
        try:  # a region the tier refuses is a fault of the step (skipped), not a crash
            view = tier.memory_view(step, region)
            if view is None:
                return None
            view = _bytes_of(view, region.nbytes, f"{tier.describe(step)}: {key!r}")
        except ValueError as e:
            raise IntegrityError(f"{tier.describe(step)}: {key!r}: {e}") from e
        what = f"{key!r} {'pack' if region is not shard else 'region'} at {region.offset} ({region.nbytes} bytes)"
        unit = units[ident] = Unit(view, region.crc32c, what, verified=views_verified(tier))
    if region is shard:
        return unit.view
    start = shard.offset - region.offset
    if start < 0 or start + shard.nbytes > region.nbytes:  # validate.py checks packs; hostile still
        raise IntegrityError(
            f"{tier.describe(step)}: {key!r} at {shard.offset} (+{shard.nbytes}) lies outside its pack "
            f"at {region.offset} (+{region.nbytes})"
        )
    return unit.view[start : start + shard.nbytes]


def views_verified(tier: ReadableTier) -> bool:
    """Whether ``tier`` promises that its memory views were CRC-checked already
    (:attr:`ReadableTier.views_verified`, exactly True; anything else: no)."""
    return getattr(tier, "views_verified", False) is True


def _bytes_of(view: memoryview, nbytes: int, what: str) -> memoryview:
    """``view`` as flat read-only bytes, after checking it holds exactly ``nbytes``."""
    if not isinstance(view, memoryview) or not view.c_contiguous or view.nbytes != nbytes:
        size = view.nbytes if isinstance(view, memoryview) else type(view).__name__
        raise ValueError(f"{what}: the tier's memory view holds {size} bytes, the record {nbytes}")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view.toreadonly()


def verify(units: Sequence[Unit], *, engine: Any = None, threads: int | None = None) -> None:
    """Check every unit's CRC-32C (large ones split into chunks, small ones grouped, on up to
    ``threads`` threads: the engine's CRC releases the GIL); raise IntegrityError naming the
    regions that do not match. Nothing is written anywhere. A unit marked ``verified`` (its
    tier checked the bytes already, :attr:`ReadableTier.views_verified`) is not checked again.

    Example:
        >>> from recoverkit.format.checksum import crc32c
        >>> data = memoryview(b"123456789")
        >>> verify([Unit(data, crc32c(data), "x")])
        >>> verify([Unit(data, 0, "'x' region at 0 (9 bytes)")])
        Traceback (most recent call last):
        ...
        recoverkit.errors.IntegrityError: 1 region(s) in memory fail their checksum: 'x' region at 0 (9 bytes) has crc 0xe3069283, expected 0x00000000
    """
    eng = _native.resolve(engine)
    tasks: list[list[tuple[int, int, int]]] = []  # per task: (unit, start, end)
    task: list[tuple[int, int, int]] = []
    filled = total = 0
    for i, unit in enumerate(units):
        if unit.verified:
            continue
        n = unit.view.nbytes
        total += n
        for start in range(0, n, CHUNK_BYTES):
            end = min(n, start + CHUNK_BYTES)
            task.append((i, start, end))
            filled += end - start
            if filled >= CHUNK_BYTES:
                tasks.append(task)
                task, filled = [], 0
    if task:
        tasks.append(task)

    def run(parts: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
        return [(i, s, e, int(eng.crc32c(units[i].view[s:e]))) for i, s, e in parts]

    n_threads = threads if threads is not None else worker_threads()
    if total < PARALLEL_BYTES or n_threads <= 1 or len(tasks) <= 1:
        results = [run(t) for t in tasks]
    else:
        with ThreadPoolExecutor(
            min(n_threads, len(tasks)), thread_name_prefix="recoverkit-crc"
        ) as pool:
            results = list(pool.map(run, tasks))
    found = [0] * len(units)
    for parts in results:  # tasks and their parts are in unit order, then offset order
        for i, s, e, crc in parts:
            found[i] = crc if s == 0 else int(eng.crc32c_combine(found[i], crc, e - s))
    bad = [(u, f) for u, f in zip(units, found) if not u.verified and f != u.crc32c]
    if bad:
        shown = "; ".join(
            f"{u.what} has crc {hexcrc(f)}, expected {hexcrc(u.crc32c)}" for u, f in bad[:3]
        )
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise IntegrityError(
            f"{len(bad)} region(s) in memory fail their checksum: {shown}{more}"
        )


def worker_threads() -> int:
    """Threads the CRC pass and the engine copies use: the CPUs this process may run on,
    at most :data:`MAX_THREADS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


# --------------------------------------------------------------------------- apply side
def resolve(state: Mapping[str, Any], captured: MutableMapping[str, Any]) -> list[Copy]:
    """Pair every PendingTensor of ``captured`` with its live target in ``state`` (entries
    already unwrapped of DDP and Replicated), or turn it into a new tensor.

    A pair puts the target itself in ``captured`` where the PendingTensor was (the state's
    checks then see a tensor of the saved dtype and shape, and ``load_state_dict`` finds
    nothing to copy or cast) and is returned, for :func:`copy_all` once every check passed.
    Targets in place: a module's parameters and buffers (``state_dict(keep_vars=True)``), the
    state tensors of a torch optimizer (its own ``load_state_dict``; saved parameter ids
    mapped to live parameters by position in the groups, as torch maps them), a plain tensor
    entry. Anything else (other Stateful objects, plain values, random streams, a target of
    another dtype or shape) gets a new tensor, as the copy path gives it. Afterwards
    ``captured`` holds no PendingTensor.
    """
    copies: dict[int, Copy] = {}  # by target: the last one loaded wins, as with load_state_dict
    for name in list(captured):
        target, value = state.get(name), captured[name]
        if isinstance(target, torch.nn.Module) and isinstance(value, dict):
            live: Mapping[str, Any] | None = None  # asked for only if something may go in place
            for k, v in value.items():
                if isinstance(v, PendingTensor):
                    live = target.state_dict(keep_vars=True) if live is None else live
                    value[k] = _pair(v, live.get(k), copies)
                else:
                    value[k] = materialize(v)
        elif (
            isinstance(target, torch.optim.Optimizer)
            and type(target).load_state_dict is torch.optim.Optimizer.load_state_dict
            and isinstance(value, dict)
        ):
            _pair_optimizer(target, value, copies)
        elif isinstance(target, torch.Tensor) and isinstance(value, PendingTensor):
            captured[name] = _pair(value, target, copies)
        else:
            captured[name] = materialize(value)
    return list(copies.values())


def _pair(pending: PendingTensor, target: Any, copies: dict[int, Copy]) -> Any:
    if pending.fits(target):
        copies[id(target)] = (target, pending)
        return target
    return pending.materialize()


def _pair_new(pending: PendingTensor, param: Any, key: Any, copies: dict[int, Copy]) -> Any:
    """A new target for an optimizer state entry (:func:`state_target`), one per
    PendingTensor (an alias gets the same tensor), else a materialised tensor."""
    if pending._tensor is None:
        target = state_target(pending, param, key)
        if target is None:
            return pending.materialize()
        pending._tensor = target  # its bytes land in copy_all, before the first load
        pending.into_new = True
        copies[id(target)] = (target, pending)
    return pending._tensor


def _pair_optimizer(
    opt: torch.optim.Optimizer, value: dict[Any, Any], copies: dict[int, Copy]
) -> None:
    saved_state, groups = value.get("state"), value.get("param_groups")
    live_of: dict[Any, Any] = {}
    if isinstance(groups, list) and len(groups) == len(opt.param_groups):
        for saved, group in zip(groups, opt.param_groups):
            ids = saved.get("params") if isinstance(saved, dict) else None
            if not isinstance(ids, list) or len(ids) != len(group["params"]):
                live_of = {}  # does not match: state.check says why; nothing goes in place
                break
            live_of.update((i, p) for i, p in zip(ids, group["params"]) if type(i) is int)
    if isinstance(saved_state, dict):
        for pid, per_param in saved_state.items():
            param = live_of.get(pid) if type(pid) is int else None
            live = opt.state.get(param) if param is not None else None  # never creates an entry
            if isinstance(per_param, dict) and param is not None:
                live = live if isinstance(live, dict) else {}  # a fresh optimizer: no state yet
                for k, v in per_param.items():
                    if not isinstance(v, PendingTensor):
                        per_param[k] = materialize(v)
                    elif v.fits(live.get(k)):
                        per_param[k] = _pair(v, live.get(k), copies)
                    else:
                        per_param[k] = _pair_new(v, param, k, copies)
            else:
                saved_state[pid] = materialize(per_param)
    for k, v in value.items():
        if k != "state":
            value[k] = materialize(v)


def state_target(pending: PendingTensor, param: Any, key: Any) -> torch.Tensor | None:
    """A new, empty tensor for a torch optimizer's state entry ``key`` of ``param`` that
    ``load_state_dict`` keeps as it is, or None (the entry is materialised, then cast by
    torch as before).

    torch casts a state tensor to its parameter's dtype (a floating-point parameter) and
    device (every parameter), and leaves ``step`` alone unless the group is fused or
    capturable: so a tensor of the saved dtype and shape on the parameter's device, when the
    cast would not change the dtype, is exactly what torch would keep. Building it here lets
    the verified bytes land in it once, after every check (the engine's threads fault its
    pages in as they copy; a GPU parameter's state goes host -> device directly), where
    before it was materialised as a CPU tensor before the checks and, for a GPU parameter,
    moved to the device again by ``load_state_dict``. Its size is the record's, whose bytes
    the tier holds (``collect`` checked the record's shape against them).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2, 3))
        >>> moment = PendingTensor("m", torch.float32, (2, 3), [(0, memoryview(bytes(24)))])
        >>> state_target(moment, p, "exp_avg").shape, state_target(moment, p, "step")
        (torch.Size([2, 3]), None)
        >>> state_target(moment, p.double(), "exp_avg") is None  # torch would cast it
        True
    """
    if key == "step" or not isinstance(param, torch.Tensor) or type(param) not in (torch.Tensor, torch.nn.Parameter):
        return None
    if param.layout != torch.strided or param.device.type not in ("cpu", "cuda"):
        return None
    if param.is_floating_point() and param.dtype != pending.dtype:
        return None  # torch casts: the copy path's new tensor, cast by load_state_dict
    return torch.empty(pending.shape, dtype=pending.dtype, device=param.device)


def materialize(tree: Any) -> Any:
    """``tree`` with every PendingTensor replaced by a new tensor (containers as unflatten
    builds them: dict values and lists changed in place, tuples rebuilt)."""
    if isinstance(tree, PendingTensor):
        return tree.materialize()
    if isinstance(tree, dict):
        for k, v in tree.items():
            if isinstance(v, (PendingTensor, dict, list, tuple)):
                tree[k] = materialize(v)
        return tree
    if type(tree) is list:
        tree[:] = [materialize(v) for v in tree]
        return tree
    if isinstance(tree, tuple) and _holds_pending(tree):
        # imported here: loading the submodule ``state.flatten`` shadows the package's lazy
        # ``flatten`` function with the module (plan.py imports the function), and this
        # module is imported early (recovery), before any save planned
        from ..state.flatten import rebuild_container

        return rebuild_container(tree, [materialize(v) for v in tree])
    return tree


def _holds_pending(items: Iterable[Any]) -> bool:
    for v in items:
        if isinstance(v, PendingTensor):
            return True
        if isinstance(v, dict) and _holds_pending(v.values()):
            return True
        if isinstance(v, (list, tuple)) and _holds_pending(v):
            return True
    return False


def copy_all(copies: Sequence[Copy]) -> None:
    """Land every planned copy (after every check passed).

    Large pieces bound for CPU targets go through the native copy engine of the tier they
    came from (a private copier of up to :data:`MAX_THREADS` threads, closed on return;
    streaming stores, no CRC: the bytes were verified), the rest through torch's ``copy_``
    (host -> device for a GPU target). A target in new memory (a fresh optimizer's state,
    :func:`state_target`) is copied in :data:`NEW_MEMORY_CHUNK_BYTES` pieces, queued after
    the live targets' ones: the first touch of each page faults it in, and small pieces side
    by side cost the least CPU there (measured in new processes on 176 MiB of new memory,
    CPU time: 256 KiB pieces ~100 ms, 8 MiB pieces ~120 ms, torch's ``copy_`` ~140 ms).
    """
    if not copies:
        return
    eng = _native.resolve(copies[0][1].engine)
    threads = worker_threads()
    by_engine = (
        getattr(eng, "BACKEND", "") == "native"
        and threads > 1
        and sum(p.nbytes for t, p in copies if t.device.type == "cpu") >= PARALLEL_BYTES
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer of read-only memory: only read
        if not by_engine:
            for target, pending in copies:
                pending.copy_into(target)
            return
        copier = eng.CopyEngine(threads)
        try:
            handles: list[Any] = []
            live: list[tuple[torch.Tensor, PendingTensor, int]] = []  # (target bytes, pending, piece size)
            new: list[tuple[torch.Tensor, PendingTensor, int]] = []
            for target, pending in copies:
                dst = _byte_view(target)
                if target.device.type != "cpu" or dst is None or pending.nbytes < ENGINE_BYTES:
                    pending.copy_into(target)
                elif pending.into_new:
                    new.append((dst, pending, NEW_MEMORY_CHUNK_BYTES))
                else:
                    live.append((dst, pending, CHUNK_BYTES))
            for dst, pending, chunk in live + new:
                base = int(dst.data_ptr())
                for off, view in pending.pieces:
                    src = int(_source(view).data_ptr()) if view.nbytes else 0
                    for at in range(0, view.nbytes, chunk):  # chunks: every thread takes part
                        n = min(chunk, view.nbytes - at)
                        handles.append(copier.submit(src + at, base + off + at, n, crc=False))
            for h in handles:
                h.result()
        finally:
            copier.close()


def _byte_view(t: torch.Tensor) -> torch.Tensor | None:
    """A flat uint8 view of a contiguous tensor's bytes on its device, or None."""
    try:
        flat = t.detach().reshape(-1)
        return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    except RuntimeError:
        return None


def _nbytes_of(t: torch.Tensor) -> int | None:
    view = _byte_view(t)
    return None if view is None else int(view.numel())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _source(view: memoryview) -> torch.Tensor:
    """A uint8 CPU tensor over ``view`` (no copy; never written)."""
    return torch.frombuffer(view, dtype=torch.uint8)
