"""Bring back a lost pipeline stage in the replacement process: exact copy first, CheckFree last.

Where it sits: called by :class:`~recoverkit.elastic.pipeline.StagePipeline` after the
survivors and a spare re-formed the process group (:func:`~recoverkit.distributed.regroup.regroup`)
and agreed on the last completed step. The replacement (the spare now holding the lost stage)
runs a :class:`~recoverkit.recovery.chain.RecoveryChain`; every survivor serves its requests
point to point until told it is done. The chain's log names the strategy that recovered.

The flow, on the replacement (:func:`rebuild_stage`)::

    StageReplica     ask the holder of the stage's replica (the next stage's process) for
                     the stage's model and optimizer at the agreed step: exact, bit-identical
                     continuation; it refuses when it holds none, or one of another step
    CheckFreeRecovery ask the two neighbours for their weights (the lost stage's keys) and
                     their recorded gradient norms of that step; average; then, with
                     ``CheckFreeOptions.distill_steps`` N > 0 and an interior stage, ask the
                     previous stage for its recorded outputs and the next one for its recorded
                     inputs of that step (the lost stage's input -> output pairs, :class:`Activations`:
                     a header, the replacement's verdict on it, then the bytes it sizes,
                     :mod:`.stage_wire`) and fit the average
                     to them (:func:`~recoverkit.recovery.checkfree.distill_stage`, N steps at the
                     stage's base learning rate of that step); a neighbour holding none of that
                     step refuses: no fit, the plain average (the log and the source's
                     description say which); fresh optimizer
    then DONE to every survivor (FAILED when every strategy refused: the survivors raise
    PipelineRecoveryError too, at once, instead of timing out waiting for the stage;
    ROLLBACK instead when the job keeps stage checkpoints: every member raises
    RollbackNeeded and the pipeline rolls every stage back, in process; RETRY when a peer
    was lost on the way: every member raises PeerLostError and the recovery starts over)

and on each survivor (:func:`serve_requests`): receive a request, answer it (a reply message,
then the bytes if served; for activations a header, then the bytes once the requester
accepted the header: a refused one gets none, and FAILED follows), until DONE. Each stage
process keeps its own module's inputs and outputs of the last committed step for this
(:func:`record_pairs`, only with N > 0). Every size is the receiver's (:mod:`.stage_wire`),
every transfer CRC-checked by the transport, every wait bounded by its timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..distributed.transport import PeerTransport
from ..errors import IncompatibleCheckpointError, IntegrityError, PeerLostError, RecoverkitError
from ..recovery.base import CannotRecover, Loss, Recovered, RecoveryStrategy, Survivors, T, Use
from ..recovery.chain import RecoveryChain
from ..recovery.checkfree import (
    CheckFreeOptions,
    CheckFreeRecovery,
    CheckFreeSource,
    NeighbourState,
    distill_stage,
    fresh_optimizer,
    swap_partner,
)
from .pipeline_options import (
    PipelineOptions,
    PipelineRecoveryError,
    RollbackNeeded,
    schedule_factor,
)
from .stage_wire import (
    DONE,
    EXTRAS,
    FAILED,
    INPUTS,
    NEIGHBOUR,
    OUTPUTS,
    REFUSED,
    REPLICA,
    RETRY,
    ROLLBACK,
    SERVED,
    Layout,
    Message,
    activation_header,
    activation_header_buffer,
    activation_layout,
    edge_layout,
    layout_of,
    load_optimizer_entries,
    nbytes,
    optimizer_layout,
    pack,
    shared_layout,
    unpack,
)

__all__ = [
    "Activations",
    "FitPlan",
    "fit_plan",
    "recorded_count",
    "Replica",
    "ReplicaSource",
    "StageReplica",
    "rebuild_stage",
    "record_pairs",
    "serve_requests",
]

MakeOptimizer = Callable[[torch.nn.Module], torch.optim.Optimizer]

log = logging.getLogger("recoverkit.elastic")


@dataclass(frozen=True)
class Activations:
    """One stage's own module inputs and outputs, per micro-batch run in pipeline order, of the
    last committed step (detached copies); ``step`` is ``steps_done`` after that step's commit
    (the step a recovery agrees on). A stage keeps only what a neighbour's rebuild can ask
    for: inputs from the third stage on, outputs up to the third from last (empty otherwise)."""

    stage: int
    step: int
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


@dataclass
class _Pending:
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


@contextlib.contextmanager
def record_pairs(module: torch.nn.Module, *, stage: int, num_stages: int) -> Iterator[_Pending]:
    """While the block runs, a forward hook on ``module`` copies each call's input and output
    (one tensor each; shape inference on meta tensors is skipped); yields the lists. The
    caller turns them into :class:`Activations` once the step commits."""
    pending = _Pending([], [])
    keep_in, keep_out = stage >= 2, stage <= num_stages - 3

    def hook(_module: torch.nn.Module, args: Any, output: Any) -> None:
        x = args[0] if isinstance(args, tuple) and len(args) == 1 else None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        if x.is_meta or output.is_meta:
            return
        if keep_in:
            pending.inputs.append(x.detach().clone())
        if keep_out:
            pending.outputs.append(output.detach().clone())

    handle = module.register_forward_hook(hook)
    try:
        yield pending
    finally:
        handle.remove()


@dataclass(frozen=True)
class FitPlan:
    """What CheckFree's fit of a rebuilt interior stage needs (``distill_steps`` > 0).

    Attributes:
        steps: the fit's Adam steps (``CheckFreeOptions.distill_steps``).
        lr_factor: the learning-rate schedule's factor at the agreed step (1.0 without one);
            the fit's rate is the stage's base rate (its new optimizer's first group, before
            ``lr_scale``) times it.
        count: the micro-batches each neighbour recorded (run in pipeline order).
        rows: each micro-batch's first dim, from the replacement's own split of the recorded
            step's batch (None: not known, not checked).
    """

    steps: int
    lr_factor: float
    count: int
    rows: tuple[int, ...] | None


def recorded_count(options: PipelineOptions) -> int:
    """Micro-batches a step runs in pipeline order, which :func:`record_pairs` keeps
    (CheckFree+: the even half)."""
    n = options.n_microbatches
    return n // 2 if options.checkfree.plus else n


def fit_plan(
    options: PipelineOptions, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], step: int
) -> FitPlan | None:
    """CheckFree's fit of a stage rebuilt at ``step`` (None when distill_steps is 0): the
    pairs were recorded in step ``step - 1``; its batch gives each micro-batch's rows."""
    steps = options.checkfree.distill_steps
    if steps == 0:
        return None
    schedule = options.lr_schedule
    factor = 1.0 if schedule is None else schedule_factor(schedule, step)
    count, rows = recorded_count(options), None
    if step >= 1:
        x = batch(step - 1)[0]
        if options.checkfree.plus:
            x = torch.cat(x.tensor_split(options.n_microbatches)[0::2])
        rows = tuple(int(c.shape[0]) for c in x.tensor_split(count))
    return FitPlan(steps=steps, lr_factor=factor, count=count, rows=rows)


@dataclass(frozen=True)
class Replica:
    """A copy of another stage's model and optimizer (packed bytes) after step ``step``."""

    stage: int
    step: int
    data: torch.Tensor


@dataclass(frozen=True)
class ReplicaSource:
    """An exact copy of a stage fetched from its replica holder (a recovery Source)."""

    step: int
    model: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, torch.Tensor]
    holder: int

    manifest = None
    tier_name = None

    def describe(self) -> str:
        return f"the replica held by stage {self.holder} at step {self.step}"

    def read(
        self,
        *,
        rank: int,
        allow_pickle: bool,
        sharded: Any = None,
        entries: Collection[str] | None = None,
    ) -> dict[str, Any]:
        tree: dict[str, Any] = {"model": dict(self.model), "optimizer": dict(self.optimizer)}
        return tree if entries is None else {k: v for k, v in tree.items() if k in entries}


class StageReplica(RecoveryStrategy):
    """Exact recovery of ``stage`` from the copy its replica holder keeps every step.

    ``fetch()`` returns the source, or a reason string when the holder has no copy of the
    wanted step. Refuses when the stage is not lost or the holder is lost too.
    """

    name = "stage replica"

    def __init__(
        self, *, stage: int, holder: int, fetch: Callable[[], ReplicaSource | str]
    ) -> None:
        self.stage, self.holder, self.fetch = stage, holder, fetch

    def recover(
        self, loss: Loss, survivors: Survivors, use: Use[T]
    ) -> Recovered[T] | CannotRecover:
        if self.stage not in loss.stages:
            return CannotRecover(self.name, f"stage {self.stage} is not lost")
        if self.holder in loss.stages:
            return CannotRecover(self.name, f"its holder, stage {self.holder}, is lost too")
        try:
            got = self.fetch()
        except (OSError, RecoverkitError, ValueError) as e:
            return CannotRecover(self.name, f"fetching the replica failed: {e}", e)
        if isinstance(got, str):
            return CannotRecover(self.name, got)
        return Recovered(self.name, got, use(got))


class _Noted(RecoveryStrategy):
    """``inner`` (CheckFree), its source's description followed by what the fit did, so the
    chain's log and the pipeline's record name it."""

    def __init__(self, inner: CheckFreeRecovery, notes: list[str]) -> None:
        self.inner, self.notes, self.name = inner, notes, inner.name

    def recover(
        self, loss: Loss, survivors: Survivors, use: Use[T]
    ) -> Recovered[T] | CannotRecover:
        got = self.inner.recover(loss, survivors, use)
        if isinstance(got, CannotRecover) or not self.notes:
            return got
        source = got.source
        if isinstance(source, CheckFreeSource):
            source = dataclasses.replace(source, how=f"{source.how}, then {'; '.join(self.notes)}")
        return Recovered(got.strategy, source, got.value)


def full_layout(module: torch.nn.Module, make_optimizer: MakeOptimizer) -> tuple[Layout, Layout]:
    """(model layout, optimizer layout) of a stage built as ``module``."""
    return layout_of(module.state_dict()), optimizer_layout(module, make_optimizer)


def serve_requests(
    transport: PeerTransport,
    requester: int,
    *,
    num_stages: int,
    stage: int | None,
    module: torch.nn.Module | None,
    step: int,
    norm: float,
    replica: Replica | None,
    template: Callable[[int], torch.nn.Module],
    timeout_s: float,
    extras: Mapping[int, Replica] | None = None,
    activations: Activations | None = None,
    count: int = 0,
) -> list[str]:
    """A survivor's side: answer ``requester`` (global rank) until DONE; returns what was served.
    ``activations``: this stage's recorded pairs (:func:`record_pairs`), served to the rebuild
    of a neighbour when they are of the agreed step and hold ``count`` micro-batches."""
    served: list[str] = []
    what = f"a recovery request from rank {requester}"
    while True:
        buf = Message.buffer()
        transport.recv_into(requester, buf, timeout_s=timeout_s)
        msg = Message.decode(buf, num_stages=num_stages, what=what)
        if msg.kind == DONE:
            return served
        if msg.kind == RETRY:  # a lost peer: regroup with the others, as after any loss
            raise PeerLostError(
                f"rank {requester} lost a peer while rebuilding stage {msg.lost} at step "
                f"{msg.step}: the recovery starts over",
                peer=requester,
            )
        if msg.kind in (FAILED, ROLLBACK):
            why = (
                f"rank {requester} could not rebuild stage {msg.lost} at step {msg.step} "
                "(its log names why)"
            )
            raise RollbackNeeded(why) if msg.kind == ROLLBACK else PipelineRecoveryError(why)
        payload: torch.Tensor | None = None
        header: torch.Tensor | None = None
        reply_step = step
        if msg.kind == NEIGHBOUR and stage is not None and module is not None:
            if msg.stage == stage and msg.step == step and msg.lost != stage:
                layout = shared_layout(template(msg.lost), module)
                try:
                    payload = pack(module.state_dict(), layout) if layout else None
                except IncompatibleCheckpointError:  # shapes differ: refused, not sent
                    payload = None
        elif msg.kind == REPLICA and replica is not None:
            if replica.stage == msg.lost and replica.step == msg.step:
                payload = replica.data
        elif msg.kind == EXTRAS and extras and msg.lost in extras:
            copy = extras[msg.lost]
            if copy.step <= msg.step:  # refreshed every N steps: the newest, never a later one
                payload, reply_step = copy.data, copy.step
        elif msg.kind in (OUTPUTS, INPUTS) and activations is not None and stage is not None:
            # outputs go to the next stage's rebuild, inputs to the previous one's
            mine = activations.outputs if msg.kind == OUTPUTS else activations.inputs
            for_ = stage + 1 if msg.kind == OUTPUTS else stage - 1
            if (msg.stage == stage == activations.stage and msg.lost == for_
                    and msg.step == step == activations.step and count >= 1 and len(mine) == count):
                try:
                    named = {str(j): t for j, t in enumerate(mine)}
                    header, payload = activation_header(mine), pack(named, layout_of(named))
                except (ValueError, IncompatibleCheckpointError):  # cannot travel: refused
                    header = payload = None
        status = SERVED if payload is not None else REFUSED
        mine_stage = -1 if stage is None else stage
        transport.send(
            requester,
            Message(status, mine_stage, msg.lost, reply_step, norm).encode(),
            timeout_s=timeout_s,
        )
        if payload is not None:
            if header is not None:
                transport.send(requester, header, timeout_s=timeout_s)
                # the requester's verdict on the header: the payload only if it was accepted
                # (a refused one is followed by FAILED / ROLLBACK, read by the next round)
                verdict = Message.buffer()
                transport.recv_into(requester, verdict, timeout_s=timeout_s)
                ok = Message.decode(verdict, num_stages=num_stages, what=what)
                if (ok.kind, ok.stage, ok.lost, ok.step) != (SERVED, stage, msg.lost, step):
                    continue
            transport.send(requester, payload, timeout_s=timeout_s)
            kind = {NEIGHBOUR: "neighbour", REPLICA: "replica", EXTRAS: "edge copy",
                    OUTPUTS: "recorded outputs", INPUTS: "recorded inputs"}[msg.kind]  # fmt: skip
            served.append(f"{kind} of stage {msg.lost}" if header is None else f"{kind} for stage {msg.lost}")


def rebuild_stage(
    transport: PeerTransport,
    *,
    stage: int,
    num_stages: int,
    step: int,
    ranks: Mapping[int, int],
    others: Sequence[int],
    module: torch.nn.Module,
    make_optimizer: MakeOptimizer,
    replicate: bool,
    options: CheckFreeOptions,
    timeout_s: float,
    template: Callable[[int], torch.nn.Module],
    rollback: bool = False,
    fit: FitPlan | None = None,
) -> Recovered[torch.optim.Optimizer]:
    """The replacement's side: ``module`` (freshly built for ``stage``) gets the stage's state
    back, and the returned Recovered's value is its optimizer (exact, or fresh and scaled).
    When every strategy refuses: with ``rollback`` (the job keeps stage checkpoints) every
    other member is told to roll back and :class:`RollbackNeeded` is raised here too;
    without it they are told the rebuild failed and the chain's error is raised. A lost
    peer (the transport's error) is neither: it is raised for the pipeline to regroup.

    Args:
        ranks: stage -> global rank of the process holding it now (the survivors').
        others: every other member's global rank (each gets DONE at the end).
        template: stage -> a module built as that stage (for the layouts of its entries).
        fit: CheckFree's fit of an interior stage's average to its neighbours' recorded
            pairs (None, or an edge stage: none). A neighbour that refuses its pairs, or a
            fit that does not fit the stage or diverges: the plain average, and a log line.
            A lost peer during the fetch is raised like any other (RETRY); a header that
            fails validation (:func:`~.stage_wire.activation_layout`) fails the rebuild (the
            neighbour is told so before its payload, which it then does not send).
    """
    model_layout, opt_layout = full_layout(module, make_optimizer)

    def ask(
        peer_stage: int, kind: int, layout: Layout, *, exact_step: bool = True
    ) -> tuple[Message, torch.Tensor | None]:
        peer = ranks[peer_stage]
        transport.send(peer, Message(kind, peer_stage, stage, step).encode(), timeout_s=timeout_s)
        buf = Message.buffer()
        transport.recv_into(peer, buf, timeout_s=timeout_s)
        reply = Message.decode(buf, num_stages=num_stages, what=f"the reply of stage {peer_stage}")
        if reply.kind != SERVED:
            return reply, None
        late = reply.step != step if exact_step else reply.step > step
        if reply.stage != peer_stage or reply.lost != stage or late:
            raise IntegrityError(f"stage {peer_stage} answered for another request: {reply}")
        data = torch.empty(nbytes(layout), dtype=torch.uint8)
        transport.recv_into(peer, data, timeout_s=timeout_s)
        return reply, data

    def neighbour(peer_stage: int) -> NeighbourState:
        layout = shared_layout(module, template(peer_stage))
        reply, data = ask(peer_stage, NEIGHBOUR, layout)
        if data is None:
            raise IntegrityError(f"stage {peer_stage} refused its state for step {step}")
        return NeighbourState(peer_stage, reply.step, unpack(data, layout), reply.norm)

    def edge_copy(edge: int) -> dict[str, torch.Tensor]:
        partner = swap_partner(edge, num_stages)
        assert partner is not None
        layout = edge_layout(module, template(partner))
        _, data = ask(partner, EXTRAS, layout, exact_step=False)
        if data is None:
            raise IntegrityError(f"stage {partner} holds no copy of stage {edge}'s own layers")
        return unpack(data, layout)

    def pairs(peer_stage: int, kind: int) -> list[torch.Tensor] | str:
        """A neighbour's recorded activations of ``step`` (a reason string when refused)."""
        assert fit is not None
        peer = ranks[peer_stage]
        transport.send(peer, Message(kind, peer_stage, stage, step).encode(), timeout_s=timeout_s)
        buf = Message.buffer()
        transport.recv_into(peer, buf, timeout_s=timeout_s)
        reply = Message.decode(buf, num_stages=num_stages, what=f"the reply of stage {peer_stage}")
        side = "outputs" if kind == OUTPUTS else "inputs"
        if reply.kind != SERVED:
            return f"stage {peer_stage} holds no recorded {side} of step {step}"
        if reply.stage != peer_stage or reply.lost != stage or reply.step != step:
            raise IntegrityError(f"stage {peer_stage} answered for another request: {reply}")
        header = activation_header_buffer(fit.count)
        transport.recv_into(peer, header, timeout_s=timeout_s)
        what = f"stage {peer_stage}'s recorded {side}"  # a bad header fails the rebuild
        try:
            layout = activation_layout(header, count=fit.count, rows=fit.rows, what=what)
        except IntegrityError:  # the peer learns it sends no payload; FAILED follows
            verdict = Message(REFUSED, peer_stage, stage, step).encode()
            transport.send(peer, verdict, timeout_s=timeout_s)
            raise
        transport.send(peer, Message(SERVED, peer_stage, stage, step).encode(), timeout_s=timeout_s)
        data = torch.empty(nbytes(layout), dtype=torch.uint8)
        transport.recv_into(peer, data, timeout_s=timeout_s)
        got = unpack(data, layout)
        return [got[name] for name, _, _ in layout]

    def fit_stage(opt: torch.optim.Optimizer) -> str:
        """CheckFree's fit of the averaged ``module``; what happened, for the description."""
        assert fit is not None
        inputs = pairs(stage - 1, OUTPUTS)
        outputs = pairs(stage + 1, INPUTS) if not isinstance(inputs, str) else inputs
        if isinstance(inputs, str) or isinstance(outputs, str):
            why = inputs if isinstance(inputs, str) else outputs
            assert isinstance(why, str)
            log.warning("pipeline: stage %d rebuilt at step %d is not fitted: %s", stage, step, why)
            return f"not fitted: {why}"
        group = opt.param_groups[0]
        lr = float(group.get("initial_lr", group["lr"])) * fit.lr_factor
        rows = [(x.shape[0], y.shape[0]) for x, y in zip(inputs, outputs)]
        why = ""
        if any(a != b for a, b in rows):
            why = f"the neighbours' micro-batches differ in rows: {rows}"
        elif not lr > 0:
            why = f"the learning rate at step {step} is {lr}"
        else:
            try:
                return distill_stage(module, inputs, outputs, steps=fit.steps, lr=lr).describe()
            except (IncompatibleCheckpointError, ValueError, RuntimeError) as e:  # the average kept
                # (RuntimeError: the stage's own forward refused the pairs, e.g. their width;
                # local computation only, distill_stage gave the module its weights back)
                why = f"the fit failed ({e})"
        log.warning("pipeline: stage %d rebuilt at step %d is not fitted: %s", stage, step, why)
        return f"not fitted: {why}"

    holder = (stage + 1) % num_stages

    def replica() -> ReplicaSource | str:
        _, data = ask(holder, REPLICA, model_layout + opt_layout)
        if data is None:
            return f"stage {holder} holds no replica of stage {stage} at step {step}"
        both = unpack(data, model_layout + opt_layout)
        model = {k: both[k] for k, _, _ in model_layout}
        opt = {k: both[k] for k, _, _ in opt_layout}
        return ReplicaSource(step, model, opt, holder)

    strategies: list[RecoveryStrategy] = []
    if replicate:
        strategies.append(StageReplica(stage=stage, holder=holder, fetch=replica))
    checkfree = CheckFreeRecovery(
        stage=stage,
        num_stages=num_stages,
        fetch=neighbour,
        keys=[k for k, _, _ in model_layout],
        replicated=edge_copy,
        options=options,
    )
    notes: list[str] = []  # what the fit did, appended to the average's description
    interior = 0 < stage < num_stages - 1
    strategies.append(_Noted(checkfree, notes) if fit is not None and interior else checkfree)

    def use(source: Any) -> torch.optim.Optimizer:
        tree = source.read(rank=stage, allow_pickle=False)
        module.load_state_dict(tree["model"], strict=True)
        opt = make_optimizer(module)
        if "optimizer" in tree:
            load_optimizer_entries(opt, tree["optimizer"])
            return opt
        if fit is not None and interior and isinstance(source, CheckFreeSource):
            notes.append(fit_stage(opt))  # the average, fitted; a lost peer raises (RETRY)
        return fresh_optimizer(opt, lr_scale=options.lr_scale)

    loss = Loss(step=step, stages=frozenset({stage}))
    done = Message(DONE, -1, stage, step).encode()
    try:
        got = RecoveryChain(strategies).run(loss, Survivors(transport=transport), use)
    except BaseException as e:
        # a lost peer (the transport's error): every member regroups and starts over; any
        # other error refuses the rebuild: the job rolls back to its stage checkpoints if it
        # has them, else every member raises PipelineRecoveryError
        lost = isinstance(e, ConnectionError)
        roll = rollback and not lost and isinstance(e, Exception)
        kind = RETRY if lost else ROLLBACK if roll else FAILED
        failed = Message(kind, -1, stage, step).encode()
        for peer in others:  # the survivors stop waiting; the chain's error wins
            try:
                transport.send(peer, failed, timeout_s=timeout_s)
            except (RecoverkitError, OSError, RuntimeError):
                pass
        why = f"stage {stage} could not be rebuilt at step {step}: {e}"
        if roll:
            raise RollbackNeeded(why) from e
        if not lost and isinstance(e, Exception) and not isinstance(e, RecoverkitError):
            raise PipelineRecoveryError(why) from e  # a refusal, not a lost peer, to the pipeline
        raise
    for peer in others:
        transport.send(peer, done, timeout_s=timeout_s)
    return got
