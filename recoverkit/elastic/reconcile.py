"""After a regroup, make the survivors agree on the last completed step before redoing one.

Where it sits: :class:`~recoverkit.elastic.trainer.ElasticTrainer` calls :func:`reconcile`
on every survivor right after :func:`~recoverkit.distributed.regroup.regroup` formed the new
default group, before the step is redone with the new assignment.

Why: the survivors of a lost rank may disagree on whether step ``k`` completed. A collective
does not complete on every rank at the same instant: a rank may have received the last of
its reduced gradient, stepped its optimizer and entered step ``k+1`` before the failure
reached the others, whose step ``k`` collective then failed. That rank's step ``k`` is
correct (its reduction had every contribution); the others must not redo ``k`` on their
own, or the replicas would part for good.

The flow (every rank of the new group, every collective bounded by ``timeout_s`` and given up
when ``abort``, the trainer's heartbeat, sees a member lost meanwhile)::

    all_gather (steps_done, epoch, step, generation)   each survivor's position
      all equal                      -> nothing to do
      spread > 1 step, generations
      differ, or the ranks ahead
      disagree on the data position  -> RegroupError(reason="diverged") on every rank
      else: source = the lowest rank among those ahead
        source: capture {model, optimizer, trainer} -> flatten -> typed-JSON skeleton +
                tensor table (key, dtype, shape, alias) + one payload of the tensors'
                bytes (16-byte aligned) and its CRC32C
        broadcast (header size, payload size)   checked against the caps
        broadcast header                        ranks behind and ahead decode it as hostile
                input (codec) and validate the table (storable dtypes, shapes, offsets,
                sizes summing to the announced payload, itself within ``max_bytes``)
                before the payload is allocated
        broadcast payload                       ranks behind check its CRC32C, then
                :func:`~recoverkit.state.stateful.apply` (every part checked before
                anything changes)
      after each broadcast an all-gather of (ok): a rank that refused what it got
      raises RegroupError(reason="diverged") on every rank before the next broadcast, so
      no collective is left unmatched and no rank redoes the step alone

A collective that fails midway (a second peer lost) leaves every rank either untouched or
wholly at the source's position: a rank behind applies only after the whole payload arrived,
its CRC32C matched and :func:`~recoverkit.state.stateful.apply` checked every part; the
collectives after that (the last outcome all-gather) change nothing. So the trainer may
re-form and reconcile again (the spread stays at most one step). A rank whose own part
failed (a refused header, a failed apply) raises RegroupError even if the outcome all-gather
fails too.

Ranks ahead other than the source receive the broadcast too but keep their own state
(identical to the source's); every rank takes part in every collective, so nobody waits on a
rank that went on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..distributed.global_grad import POLL_S, Abort, wait_collective
from ..errors import IntegrityError, RecoverkitError, RegroupError
from ..format.checksum import crc32c, hexcrc
from ..format.dtypes import dtype_name, from_bytes, itemsize, storable_by_name, to_bytes_view
from ..state.codec import decode, encode
from ..state.flatten import flatten, unflatten
from ..state.stateful import apply, capture
from .waits import lost_peer

__all__ = ["Reconciled", "reconcile", "HEADER_MAX_BYTES"]

#: the largest skeleton + tensor table a rank accepts from a peer
HEADER_MAX_BYTES = 64 << 20
_ALIGN = 16
_MAX_DIMS = 64
_MAX_KEY = 4096
_POSITION = ("steps_done", "epoch", "step", "generation")


@dataclass(frozen=True)
class Reconciled:
    """What :func:`reconcile` did on this rank.

    Attributes:
        steps_done: the agreed number of completed steps (the maximum over the survivors).
        source: the rank (in the new group) whose state the others took; ``None`` when every
            survivor had completed the same steps.
        behind: the ranks that were one step behind and took the source's state.
        nbytes: payload bytes broadcast (0 when nothing was sent).
        seconds: how long the agreement (and the transfer) took here.
    """

    steps_done: int
    source: int | None = None
    behind: tuple[int, ...] = ()
    nbytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Waits:
    """How every collective of one agreement is waited for: at most ``timeout_s``, and given
    up once ``abort`` (asked every ``poll_s``) names a reason (the trainer's heartbeat: a
    member lost meanwhile)."""

    timeout_s: float
    abort: Abort | None = None
    poll_s: float = POLL_S

    def __call__(self, work: Any, what: str) -> None:
        try:
            wait_collective(work, f"reconcile: {what}", timeout_s=self.timeout_s, abort=self.abort, poll_s=self.poll_s)
        except RecoverkitError:  # given up (the heartbeat, the timeout): a lost peer already
            raise
        except RuntimeError as e:  # the backend's error: a peer's reset, the group's timeout
            raise lost_peer(f"reconcile: {what}", e) from e


def _gather(values: list[int], wait: _Waits, what: str) -> list[list[int]]:
    world = dist.get_world_size()
    mine = torch.tensor(values, dtype=torch.int64)
    out = [torch.zeros_like(mine) for _ in range(world)]
    wait(dist.all_gather(out, mine, async_op=True), what)
    return [[int(v) for v in t.tolist()] for t in out]


def _broadcast(t: torch.Tensor, src: int, wait: _Waits, what: str) -> None:
    wait(dist.broadcast(t, src, async_op=True), what)


def _pad(n: int) -> int:
    return -n % _ALIGN


def _pack(state: Mapping[str, Any]) -> tuple[bytes, torch.Tensor]:
    """The source's header (typed JSON) and payload (one uint8 tensor)."""
    doc, payload = _pack_doc(state)
    return encode(doc), payload


def _pack_doc(state: Mapping[str, Any], *, checksum: bool = True) -> tuple[dict[str, Any], torch.Tensor]:
    """The header before encoding and the payload; :mod:`.grow` adds its piece table, whose
    per-piece checksums replace the whole payload's (``checksum=False``: ``crc32c`` is 0)."""
    skeleton, refs = flatten(capture(state))
    table: list[list[Any]] = []
    parts: list[torch.Tensor] = []
    total = 0
    for ref in refs:
        t = ref.tensor.detach()
        table.append([ref.key, dtype_name(t.dtype), list(t.shape), ref.alias_of or ""])
        if ref.alias_of:
            continue
        t = t.to("cpu").contiguous().resolve_conj().resolve_neg()
        parts.append(to_bytes_view(t))
        total += parts[-1].numel() + _pad(parts[-1].numel())
    payload = torch.zeros(total, dtype=torch.uint8)
    offset = 0
    for p in parts:
        payload[offset : offset + p.numel()].copy_(p)
        offset += p.numel() + _pad(p.numel())
    crc = crc32c(payload.numpy()) if total and checksum else 0
    return {"skeleton": skeleton, "tensors": table, "nbytes": total, "crc32c": crc}, payload


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise IntegrityError(f"reconcile: {what}: expected an int in [{lo}, {hi}], got {str(value)[:60]}")
    return value


def _plan(doc: Any, max_bytes: int) -> tuple[Any, list[tuple[str, torch.dtype, tuple[int, ...], str, int]], int, int]:
    """Validates a decoded header; returns (skeleton, [(key, dtype, shape, alias, offset)], nbytes, crc)."""
    if not isinstance(doc, dict) or set(doc) != {"skeleton", "tensors", "nbytes", "crc32c"}:
        raise IntegrityError(f"reconcile: the header is not a state record (keys {sorted(map(str, doc))[:8] if isinstance(doc, dict) else type(doc).__name__})")
    nbytes = _int(doc["nbytes"], "payload size", 0, max_bytes)
    crc = _int(doc["crc32c"], "payload CRC", 0, 2**32 - 1)
    table = doc["tensors"]
    if not isinstance(table, list):
        raise IntegrityError("reconcile: the tensor table is not a list")
    dtypes = storable_by_name()
    seen: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    plan = []
    offset = 0
    for i, row in enumerate(table):
        if not isinstance(row, list) or len(row) != 4:
            raise IntegrityError(f"reconcile: tensor table row {i} is not [key, dtype, shape, alias]")
        key, dname, shape, alias = row
        if not isinstance(key, str) or not 0 < len(key) <= _MAX_KEY or key in seen:
            raise IntegrityError(f"reconcile: tensor table row {i}: a bad or repeated key {str(key)[:80]!r}")
        if not isinstance(dname, str) or dname not in dtypes:
            raise IntegrityError(f"reconcile: tensor {key!r}: dtype {str(dname)[:40]!r} is not storable")
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
            raise IntegrityError(f"reconcile: tensor {key!r}: shape is not a list of at most {_MAX_DIMS} sizes")
        dims = tuple(_int(d, f"tensor {key!r} size", 0, max_bytes) for d in shape)
        numel = 1
        for d in dims:
            numel *= d
        size = numel * itemsize(dname)
        dtype = dtypes[dname]
        if not isinstance(alias, str):
            raise IntegrityError(f"reconcile: tensor {key!r}: alias is not a string")
        if alias:
            if seen.get(alias) != (dtype, dims):
                raise IntegrityError(f"reconcile: tensor {key!r} is an alias of {alias[:80]!r}, which is not an earlier tensor of its dtype and shape")
            plan.append((key, dtype, dims, alias, -1))
        else:
            if size > nbytes - offset:
                raise IntegrityError(f"reconcile: tensor {key!r} ({size} bytes at {offset}) overruns the {nbytes}-byte payload")
            plan.append((key, dtype, dims, "", offset))
            offset += size + _pad(size)
        seen[key] = (dtype, dims)
    if offset != nbytes:
        raise IntegrityError(f"reconcile: the tensors fill {offset} bytes; the payload announces {nbytes}")
    return doc["skeleton"], plan, nbytes, crc


def _agreed(error: BaseException | None, src: int, what: str, wait: _Waits) -> None:
    """Every rank says whether its part of ``what`` went well; any failure fails all ranks alike.

    A rank that failed its part raises RegroupError even when this all-gather fails too (a
    second peer lost): its state may be half-applied (a load that failed after the checks),
    so it must not be reconciled again as if untouched."""
    try:
        oks = _gather([0 if error is None else 1], wait, f"the outcome all-gather after {what}")
    except Exception as e:
        if error is None:
            raise  # untouched, or wholly at the source's position: a re-forming may retry
        raise _diverged(f"this rank failed at {what} from rank {src} ({type(error).__name__}: {error}), "
                        f"and the outcome all-gather failed too ({type(e).__name__})") from error
    failed = [i for i, r in enumerate(oks) if r[0]]
    if failed:
        here = f" (here: {type(error).__name__}: {error})" if error is not None else ""
        raise _diverged(f"rank(s) {failed[:16]} failed at {what} from rank {src}{here}") from error


def _transfer(state: Mapping[str, Any], rank: int, src: int, behind: bool, max_bytes: int, wait: _Waits) -> int:
    """Sizes, header, payload from ``src``; an outcome all-gather after each, so a rank that
    refuses what it got stops every rank before the next broadcast (no collective left
    unmatched). Returns the payload bytes."""
    header, payload = b"", torch.empty(0, dtype=torch.uint8)
    error: BaseException | None = None
    if rank == src:
        try:
            header, payload = _pack(state)
        except Exception as e:  # noqa: BLE001 - an empty header announced: every rank refuses it below
            error = e
    sizes = torch.tensor([len(header), payload.numel()], dtype=torch.int64)
    _broadcast(sizes, src, wait, "the size broadcast")
    n, nbytes = (int(v) for v in sizes.tolist())
    limit = min(HEADER_MAX_BYTES, max_bytes)
    if error is None and not (0 < n <= limit and 0 <= nbytes <= max_bytes):
        error = IntegrityError(
            f"reconcile: rank {src} announced a {n}-byte header and a {nbytes}-byte payload; "
            f"accepted: 1..{limit} and 0..{max_bytes} (ElasticOptions.sync_max_bytes)"
        )
    _agreed(error, src, "the size broadcast", wait)
    buf = torch.frombuffer(bytearray(header), dtype=torch.uint8) if rank == src else torch.empty(n, dtype=torch.uint8)
    _broadcast(buf, src, wait, "the header broadcast")
    plan: Any = None
    if rank != src:
        try:
            plan = _plan(decode(buf.numpy().tobytes()), nbytes)
            if plan[2] != nbytes:
                raise IntegrityError(f"reconcile: the header describes {plan[2]} payload bytes; {nbytes} were announced")
            # allocated before the outcome is agreed: a rank that cannot fails every rank alike
            payload = torch.empty(nbytes, dtype=torch.uint8)
        except (RecoverkitError, RuntimeError, MemoryError) as e:  # IntegrityError; an allocation
            error = e
    _agreed(error, src, "the header", wait)
    if nbytes:
        _broadcast(payload, src, wait, "the state broadcast")
    if rank != src and behind:
        try:
            skeleton, entries, _, crc = plan
            got = crc32c(payload.numpy()) if nbytes else 0
            if got != crc:
                raise IntegrityError(
                    f"reconcile: the state from rank {src} arrived with CRC32C {hexcrc(got)}, sent as {hexcrc(crc)}"
                )
            apply(dict(state), unflatten(skeleton, _tensors(entries, payload)))
        except Exception as e:  # noqa: BLE001 - any refusal must reach every rank, not strand them
            error = e
    _agreed(error, src, "applying the state", wait)
    return nbytes


def _tensors(entries: list[tuple[str, torch.dtype, tuple[int, ...], str, int]], payload: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for key, dtype, dims, alias, offset in entries:
        if alias:
            tensors[key] = tensors[alias]
            continue
        length = itemsize(dtype_name(dtype))
        for d in dims:
            length *= d
        tensors[key] = from_bytes(payload[offset : offset + length], dtype, dims)
    return tensors


def _diverged(message: str) -> RegroupError:
    return RegroupError(f"reconcile: {message}; the survivors cannot continue in process", reason="diverged")


def reconcile(
    state: Mapping[str, Any],
    *,
    steps_done: int,
    epoch: int,
    step: int,
    generation: int,
    max_bytes: int,
    timeout_s: float,
    abort: Abort | None = None,
    poll_s: float = POLL_S,
) -> Reconciled:
    """Agree with every rank of the default group on the completed steps; bring the ranks
    one step behind to the state of the ranks ahead (module doc for the protocol).

    Collective over the default group (every survivor calls it, right after the regroup).

    Args:
        state: ``{"model": ..., "optimizer": ..., "trainer": ...}``: what a rank ahead sends
            and a rank behind applies (the trainer's position comes with it, so it moves
            to the agreed step too).
        steps_done, epoch, step: this rank's position: optimizer steps completed, and the
            data position of the next step to run.
        generation: the membership generation (must be the same on every rank).
        max_bytes: the most payload bytes this rank accepts (the header is also capped by
            :data:`HEADER_MAX_BYTES`).
        timeout_s: bound on each collective's wait.
        abort: asked every ``poll_s`` while a collective is pending; a reason it names gives
            the collective up (the trainer's heartbeat: a member lost during the agreement,
            which a rank not talking to it would otherwise wait ``timeout_s`` for).

    Raises:
        RegroupError: ``reason="diverged"``: the positions cannot be reconciled (more than
            one step apart, different generations, or the ranks ahead disagree), or a rank
            could not apply the state it received. Raised on every rank alike.
        TimeoutError: a collective did not complete within ``timeout_s``
            (:class:`~recoverkit.errors.PeerTimeoutError`).
        PeerLostError: ``abort`` named a reason while a collective was pending (it may
            still be pending in the group's thread).
        RuntimeError: a collective failed (a peer's connection reset), the backend's error.

    Example:
        >>> rec = reconcile({"model": model, "optimizer": opt, "trainer": trainer},  # doctest: +SKIP
        ...                 steps_done=12, epoch=0, step=12, generation=1,
        ...                 max_bytes=1 << 30, timeout_s=30)
    """
    start = time.monotonic()
    rank = dist.get_rank()
    wait = _Waits(timeout_s, abort, poll_s)
    rows = _gather([steps_done, epoch, step, generation], wait, "the position all-gather")
    done = [r[0] for r in rows]
    top, low = max(done), min(done)
    if top == low and len({tuple(r) for r in rows}) == 1:
        return Reconciled(steps_done=top, seconds=time.monotonic() - start)
    table = ", ".join(f"rank {i}: {dict(zip(_POSITION, r))}" for i, r in enumerate(rows[:16]))
    if len({r[3] for r in rows}) != 1:
        raise _diverged(f"ranks are in different membership generations ({table})")
    if top - low > 1:
        raise _diverged(f"completed steps differ by {top - low} > 1 ({table})")
    ahead = [i for i, r in enumerate(rows) if r[0] == top]
    if len({tuple(rows[i]) for i in ahead}) != 1:
        raise _diverged(f"the ranks that completed step {top} disagree on the data position ({table})")
    src = ahead[0]
    behind = tuple(i for i, r in enumerate(rows) if r[0] != top)
    nbytes = _transfer(state, rank, src, rank in behind, max_bytes, wait)
    return Reconciled(steps_done=top, source=src, behind=behind, nbytes=nbytes, seconds=time.monotonic() - start)
