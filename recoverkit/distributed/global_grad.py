"""Gradients normalized by the global sample count, so a lost rank does not change the step.

Where it sits: between a rank's backward passes and its optimizer step, in the loop that
:class:`~recoverkit.state.global_batch.GlobalBatchSampler` feeds. Keeping the global batch
across a shrink (issue 13, ElasWave) needs two things besides the sampler:

1. **Normalize by the global batch, not by the live ranks.** Each rank runs its micro-
   batches with ``loss = sum of per-sample losses / G`` (``G = sampler.batch_size(step)``,
   the global sample count) and lets backward accumulate; then the gradients are **summed**
   over the live ranks, never averaged by the world size. Whatever the number of ranks and
   however the micro-batches are spread over them, the result is the gradient of the mean
   loss over the ``G`` samples. DDP: :func:`sum_allreduce_hook` (``ddp.register_comm_hook(
   None, sum_allreduce_hook)``) and :func:`grad_sync` (``no_sync`` on all but the last
   micro-batch); other models: :func:`allreduce_grads_sum`.
2. **The same numbers per micro-batch** wherever it runs: dropout under
   :func:`~recoverkit.state.keyed_rng.keyed_rng` keyed by ``MicroBatch.key``.

``mode="shrink"`` is the comparison TorchFT makes: each live rank normalizes by its own
samples and the gradients are averaged over the live ranks, so a lost rank's share is
simply gone and the effective batch shrinks (DDP's default hook averages the same way).

**Deterministic reduction.** A float sum depends on its order: the default all-reduce adds
each rank's accumulated gradient in an order that depends on the world size (and the
backend's algorithm), so two world sizes agree only to rounding (about 1e-16 relative per
step in float64; measured over 20 steps in ``tests/distributed/test_global_grad.py``).
:class:`OrderedGradSum` makes the result independent of the world size, bit for bit: each
micro-batch's gradient is kept apart (flattened, one row per micro-batch), all rows are
all-gathered, and every rank sums them in global micro-batch order ``0, 1, ..., M-1``.
Its memory cost: a rank holds its own ``k`` rows (``k`` micro-batches x ``P`` gradient
elements) plus the gathered ``W x max(k)`` rows (about ``M x P``: the gradient size times
the number of micro-batches in the global batch), and the all-gather moves ``M x P``
elements to every rank instead of the all-reduce's ~``2P``. It is meant for verification
and for small models; the default sum is the production path.

Every collective here runs on ``group`` (default: the world) and is bounded by that
group's timeout (``init_process_group(timeout=...)``), or by ``timeout_s`` where offered.
**Waits that can be cut short**: with ``abort=`` (a callable asked every ``poll_s`` while a
collective is pending; :class:`~recoverkit.elastic.trainer.ElasticTrainer` passes its
heartbeat's verdict), a rank whose collective never talks to a dead peer (the far side of
gloo's ring, waiting for a send) gives it up as :class:`~recoverkit.errors.PeerLostError`
as soon as ``abort()`` names a reason, instead of at the timeout. A wait that runs out is
:class:`~recoverkit.errors.PeerTimeoutError` (a ``TimeoutError``); a collective that
completed with an error (a peer's connection reset) raises that error as it is. After a
give-up the collective may still be pending in the group's thread: the group must stay
referenced until its own timeout (freeing it joins that thread).

Example, one step on one rank (``W`` ranks, any ``W``)::

    mbs = sampler.assign(sampler.step, rank, W)
    G = sampler.batch_size(sampler.step)
    for i, mb in enumerate(mbs):
        with grad_sync(ddp_model, last=i == len(mbs) - 1), keyed_rng(seed, *mb.key):
            loss = F.mse_loss(ddp_model(x[list(mb.samples)]), y[list(mb.samples)], reduction="sum")
            (loss / G).backward()
    optimizer.step(); optimizer.zero_grad(); sampler.advance()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

from ..errors import PeerLostError, PeerTimeoutError

__all__ = [
    "GradMode",
    "sum_allreduce_hook",
    "SumHookState",
    "allreduce_sum",
    "allreduce_grads_sum",
    "Abort",
    "wait_collective",
    "grad_sync",
    "OrderedGradSum",
]

GradMode = Literal["global", "shrink"]
#: ``abort()``, asked between polls of a pending collective: ``None`` to go on waiting, or
#: why the wait is given up (a heartbeat that saw a member die, a stop request)
Abort = Callable[[], str | None]
#: how often a wait with ``abort`` asks it, unless the caller says otherwise
POLL_S = 0.05
_MIN_SLICE_S = 0.001  # gloo reads a wait of 0 ms as "no timeout": never ask for less


@dataclass(frozen=True, kw_only=True)
class SumHookState:
    """The state of :func:`sum_allreduce_hook` when its waits must be bounded or cut short.

    DDP waits for the hook's future inside ``backward()``, with no timeout of its own: with
    ``abort`` or ``timeout_s`` the hook returns a future that a small thread completes after
    :func:`wait_collective` (the reduced bucket, or the give-up's error, which the backward
    raises as a ``RuntimeError``). Costs one short-lived thread per bucket and step.

    Attributes:
        group: the group to reduce on (``None``: the default group).
        abort, poll_s, timeout_s: as in :func:`allreduce_grads_sum`.

    Example:
        >>> state = SumHookState(abort=lambda: None, poll_s=0.05)
        >>> # ddp.register_comm_hook(state, sum_allreduce_hook)
    """

    group: dist.ProcessGroup | None = None
    abort: Abort | None = None
    timeout_s: float | None = None
    poll_s: float = POLL_S

    def __post_init__(self) -> None:
        _check_wait(self.timeout_s, self.poll_s)


def sum_allreduce_hook(
    state: dist.ProcessGroup | SumHookState | None, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook that all-reduces with SUM and divides by nothing.

    Register it with ``ddp.register_comm_hook(state, sum_allreduce_hook)``; the state is
    the process group to reduce on (``None``: the default group), or a
    :class:`SumHookState` whose waits a heartbeat can cut short. With the loss divided by
    the global batch size, the summed gradient is the global mean gradient, whatever the
    number of live ranks. (DDP's own hook divides by the world size: that is
    ``mode="shrink"``.)
    """
    hook = state if isinstance(state, SumHookState) else SumHookState(group=state)
    group = hook.group if hook.group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group, async_op=True)
    assert work is not None
    if hook.abort is None and hook.timeout_s is None:
        return work.get_future().then(lambda fut: fut.value()[0])
    gate: torch.futures.Future[None] = torch.futures.Future()
    failed: list[Exception] = []

    def watch() -> None:
        try:
            wait_collective(work, "the DDP gradient all-reduce", timeout_s=hook.timeout_s, abort=hook.abort, poll_s=hook.poll_s)
        except Exception as e:  # noqa: BLE001 - handed to the backward that waits on the future
            failed.append(e)
        gate.set_result(None)

    def result(_: torch.futures.Future[None]) -> torch.Tensor:
        if failed:  # raised in a callback: the future DDP waits on holds a real error
            raise failed[0]
        return buffer

    threading.Thread(target=watch, name="recoverkit-ddp-sum", daemon=True).start()
    return gate.then(result)


# DDP checks the hook's annotations against the real objects (not the strings that
# ``from __future__ import annotations`` leaves): give it the objects.
sum_allreduce_hook.__annotations__ = {
    "state": dist.ProcessGroup | SumHookState | None,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def grad_sync(model: Any, *, last: bool) -> AbstractContextManager[Any]:
    """``model.no_sync()`` unless ``last`` (or the model has no ``no_sync``): accumulate
    the micro-batches locally and let DDP reduce once, on the last one.

    A rank with no micro-batch in a step must still take part in the reduction: with DDP
    that needs a forward/backward, so keep ``world_size <=`` the micro-batches per step;
    :func:`allreduce_grads_sum` and :class:`OrderedGradSum` have no such limit.
    """
    no_sync = getattr(model, "no_sync", None)
    if last or not callable(no_sync):
        return nullcontext()
    ctx: AbstractContextManager[Any] = no_sync()
    return ctx


def _check_wait(timeout_s: float | None, poll_s: float) -> None:
    if timeout_s is not None and (isinstance(timeout_s, bool) or not 0 < timeout_s < 1e6):
        raise ValueError(f"timeout_s must be None or seconds in (0, 1e6), got {timeout_s!r}")
    if isinstance(poll_s, bool) or not isinstance(poll_s, (int, float)) or not 0 < poll_s < 1e6:
        raise ValueError(f"poll_s must be seconds in (0, 1e6), got {poll_s!r}")


def wait_collective(
    work: Any,
    what: str,
    *,
    timeout_s: float | None = None,
    abort: Abort | None = None,
    poll_s: float = POLL_S,
) -> None:
    """Waits for a collective's ``work`` (``async_op=True``), bounded by ``timeout_s`` and
    cut short by ``abort``: the wait every reduction here and the elastic trainer's
    agreement use (``what`` names the collective in the errors).

    Polls ``work.wait(timeout=poll_s)`` (gloo lets a wait run out and be called again while
    the operation goes on in its thread) and asks ``abort()`` between polls. Without
    ``abort`` it is one wait of ``timeout_s`` (``None``: the group's timeout).

    Raises:
        the collective's own error: the work completed with an error (a peer's connection
            reset, the group's timeout): re-raised as it is, never turned into a timeout.
        PeerLostError: ``abort()`` named a reason (in the message); the collective may
            still be pending in the group's thread.
        PeerTimeoutError: ``timeout_s`` passed (a ``TimeoutError``); it may still be pending.

    Example:
        >>> # work = dist.all_reduce(t, async_op=True)
        >>> # wait_collective(work, "the all-reduce", timeout_s=30, abort=heartbeat_verdict)
    """
    if abort is None and timeout_s is None:
        work.wait()
        return
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        left = poll_s if deadline is None else deadline - time.monotonic()
        if left > 0:
            slice_s = max(_MIN_SLICE_S, left if abort is None else min(poll_s, left))
            try:
                work.wait(timeout=timedelta(seconds=slice_s))
                return
            except Exception:  # gloo raises RuntimeError / DistError for a failure and a slice alike
                ended = work.is_completed()
            if ended:  # it ended (also just as the slice ran out): its own outcome, its own error
                work.wait()
                return
        why = abort() if abort is not None else None
        if why is not None:
            raise PeerLostError(f"{what} given up while pending: {why}")
        if deadline is not None and time.monotonic() >= deadline:
            raise PeerTimeoutError(f"{what} did not complete within {timeout_s} s")


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The trainable parameters' gradients, zeros where a parameter has none yet."""
    out = []
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        out.append(p.grad)
    return out


def _by_kind(tensors: list[torch.Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        kinds.setdefault((t.dtype, t.device), []).append(i)
    return kinds


def allreduce_sum(
    tensors: Iterable[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    *,
    mean: bool = False,
    timeout_s: float | None = None,
    abort: Abort | None = None,
    poll_s: float = POLL_S,
    what: str = "the all-reduce",
) -> None:
    """SUM all-reduce of ``tensors`` over ``group`` in place (``mean``: divided by the
    group's size), one flat buffer and one collective per dtype and device.

    Every wait is bounded by ``timeout_s`` (default: the group's timeout) and, with
    ``abort``, asks it every ``poll_s`` while the collective is pending (see
    :func:`allreduce_grads_sum` for what each failure raises; ``what`` names the
    collective in the errors). The tensors' contents are undefined after a failure.

    Example:
        >>> # loss = torch.tensor([local_loss], dtype=torch.float64)
        >>> # allreduce_sum([loss], what="the loss all-reduce")
    """
    _check_wait(timeout_s, poll_s)
    items = list(tensors)
    size = dist.get_world_size(group) if mean else 1
    for idx in _by_kind(items).values():
        parts = [items[i] for i in idx]
        flat = torch.cat([t.reshape(-1) for t in parts])
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
        wait_collective(work, what, timeout_s=timeout_s, abort=abort, poll_s=poll_s)
        if size != 1:
            flat /= size
        offset = 0
        for t in parts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def allreduce_grads_sum(
    params: Iterable[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    *,
    mode: GradMode = "global",
    timeout_s: float | None = None,
    abort: Abort | None = None,
    poll_s: float = POLL_S,
) -> None:
    """All-reduce the gradients of ``params`` over ``group``: SUM (``"global"``) or the
    mean over the live ranks (``"shrink"``), in place.

    Use it for models that are not wrapped in DDP. Every rank of ``group`` must call it,
    also a rank that ran no micro-batch this step (its gradients count as zeros; missing
    ``.grad`` tensors are created as zeros). Gradients are flattened into one buffer per
    dtype and device, so a step costs one all-reduce per kind.

    Args:
        params: the trainable parameters.
        group: the live ranks (default: the world).
        mode: ``"global"`` or ``"shrink"``.
        timeout_s: bound on each wait (default: the group's timeout).
        abort: asked every ``poll_s`` while a collective is pending; a reason (``str``)
            gives the wait up: a rank whose collective never talks to a dead peer (the far
            side of gloo's ring) sees the loss when its heartbeat does, not at the timeout.

    Raises:
        PeerLostError: ``abort()`` gave the wait up; the message holds its reason.
        PeerTimeoutError: a wait passed ``timeout_s`` (a ``TimeoutError``).
        RuntimeError: the collective's own error, as the backend raised it (a peer's
            connection reset, the group's timeout).

    Example:
        >>> # (after each micro-batch's (loss_sum / G).backward() on this rank)
        >>> # allreduce_grads_sum(model.parameters(), abort=lambda: heartbeat_says_dead())
    """
    if mode not in ("global", "shrink"):
        raise ValueError(f"mode must be 'global' or 'shrink', got {mode!r}")
    allreduce_sum(
        _grads(params), group, mean=mode == "shrink", timeout_s=timeout_s, abort=abort,
        poll_s=poll_s, what="the gradient all-reduce",
    )


class OrderedGradSum:
    """Sum the micro-batches' gradients in global micro-batch order: bit-identical results
    at every world size (see the module docstring for the memory cost).

    Args:
        params: the trainable parameters (with DDP: ``ddp.parameters()``, every micro-batch
            run under ``no_sync()``, since this class does the reduction).
        group: the live ranks (default: the world).
        timeout_s: bound on each collective's wait (default: the group's timeout).
        abort, poll_s: as in :func:`allreduce_grads_sum` (each of the three all-gathers
            asks ``abort()`` every ``poll_s`` while pending); so are the errors.

    Per step: after each micro-batch's backward call :meth:`add` with its global index (and
    optionally its loss); the gradients are moved out of ``.grad`` so the next micro-batch
    starts from none. Then :meth:`reduce` on every rank of ``group``: it all-gathers every
    rank's rows, checks that the indices are exactly ``0 .. num_micro_batches - 1``, once
    each, sums them in that order into ``.grad`` and returns the summed loss (the same
    order), or ``None`` when no loss was given.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        group: dist.ProcessGroup | None = None,
        *,
        timeout_s: float | None = None,
        abort: Abort | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        _check_wait(timeout_s, poll_s)
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.timeout_s = timeout_s
        self.abort = abort
        self.poll_s = poll_s
        self._rows: list[tuple[int, float | None, list[torch.Tensor]]] = []
        self._kinds = _by_kind(self.params)

    def _wait_kw(self) -> dict[str, Any]:
        return {"timeout_s": self.timeout_s, "abort": self.abort, "poll_s": self.poll_s}

    def add(self, index: int, loss: torch.Tensor | float | None = None) -> None:
        """Take the gradients of micro-batch ``index`` (its global index in the step)."""
        if type(index) is not int or index < 0:
            raise ValueError(f"micro-batch index must be a non-negative int, got {index!r}")
        if any(i == index for i, _, _ in self._rows):
            raise ValueError(f"micro-batch {index} was already added this step")
        rows = []
        for idx in self._kinds.values():
            parts = [self.params[i] for i in idx]
            rows.append(
                torch.cat(
                    [
                        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                        for p in parts
                    ]
                )
            )
            for p in parts:
                p.grad = None
        self._rows.append((index, None if loss is None else float(loss), rows))

    def reduce(self, num_micro_batches: int) -> float | None:
        """Sum every rank's micro-batch gradients in index order into ``.grad``; return the
        loss summed in the same order (``None`` if :meth:`add` got no losses)."""
        rows, self._rows = self._rows, []
        if type(num_micro_batches) is not int or num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be a positive int, got {num_micro_batches!r}")
        world = dist.get_world_size(self.group)
        count = torch.tensor([len(rows)], dtype=torch.int64)
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        wait_collective(
            dist.all_gather(counts, count, group=self.group, async_op=True),
            "the micro-batch count all-gather",
            **self._wait_kw(),
        )
        held = [int(c.item()) for c in counts]
        bad = [r for r, n in enumerate(held) if not 0 <= n <= num_micro_batches]
        if bad:  # a peer's count sizes the buffers below: checked first
            raise RuntimeError(
                f"rank {bad[0]} holds {held[bad[0]]} micro-batches; the step has {num_micro_batches}"
            )
        kmax = max(held)
        meta = torch.full((kmax, 3), -1.0, dtype=torch.float64)  # index, has loss, loss
        for j, (index, loss, _) in enumerate(rows):
            meta[j, 0] = float(index)
            meta[j, 1], meta[j, 2] = (0.0, 0.0) if loss is None else (1.0, loss)
        metas = [torch.empty_like(meta) for _ in range(world)]
        wait_collective(
            dist.all_gather(metas, meta, group=self.group, async_op=True),
            "the micro-batch index all-gather",
            **self._wait_kw(),
        )
        where: dict[int, tuple[int, int]] = {}
        losses: dict[int, float | None] = {}
        for r, (m, n) in enumerate(zip(metas, held)):
            for j in range(n):
                got = m[j, 0].item()
                ok = got == got and 0 <= got < num_micro_batches and got == int(got)
                if not ok or int(got) in where:  # NaN fails the first test
                    raise RuntimeError(
                        f"rank {r} sent micro-batch index {got}: not in 0..{num_micro_batches - 1} "
                        "or already sent by another rank"
                    )
                where[int(got)] = (r, j)
                losses[int(got)] = m[j, 2].item() if m[j, 1].item() == 1.0 else None
        if len(where) != num_micro_batches:
            missing = sorted(set(range(num_micro_batches)) - set(where))
            raise RuntimeError(f"no rank ran micro-batch(es) {missing[:16]} of this step")
        order = [where[i] for i in range(num_micro_batches)]
        for kind, idx in enumerate(self._kinds.values()):
            parts = [self.params[i] for i in idx]
            numel = sum(p.numel() for p in parts)
            p0 = parts[0]
            local = torch.zeros((kmax, numel), dtype=p0.dtype, device=p0.device)
            for j, (_, _, flat) in enumerate(rows):
                local[j].copy_(flat[kind])
            gathered = [torch.empty_like(local) for _ in range(world)]
            wait_collective(
                dist.all_gather(gathered, local, group=self.group, async_op=True),
                "the gradient all-gather",
                **self._wait_kw(),
            )
            total = gathered[order[0][0]][order[0][1]].clone()
            for r, j in order[1:]:
                total += gathered[r][j]
            offset = 0
            for p in parts:
                p.grad = total[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        values = [losses[i] for i in range(num_micro_batches)]
        known = [v for v in values if v is not None]
        if len(known) != len(values):
            return None
        loss_total = known[0]
        for v in known[1:]:  # the same left-to-right order at every world size
            loss_total += v
        return loss_total
