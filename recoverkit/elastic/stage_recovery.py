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
                     their recorded gradient norms of that step; average; fresh optimizer
    then DONE to every survivor (FAILED when every strategy refused: the survivors raise
    PipelineRecoveryError too, at once, instead of timing out waiting for the stage;
    ROLLBACK instead when the job keeps stage checkpoints: every member raises
    RollbackNeeded and the pipeline rolls every stage back, in process; RETRY when a peer
    was lost on the way: every member raises PeerLostError and the recovery starts over)

and on each survivor (:func:`serve_requests`): receive a request, answer it (a reply message,
then the bytes if served), until DONE. Every size is the receiver's (:mod:`.stage_wire`),
every transfer CRC-checked by the transport, every wait bounded by its timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
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
    NeighbourState,
    fresh_optimizer,
    swap_partner,
)
from .pipeline_options import PipelineRecoveryError, RollbackNeeded
from .stage_wire import (
    DONE,
    EXTRAS,
    FAILED,
    NEIGHBOUR,
    REFUSED,
    REPLICA,
    RETRY,
    ROLLBACK,
    SERVED,
    Layout,
    Message,
    edge_layout,
    layout_of,
    load_optimizer_entries,
    nbytes,
    optimizer_layout,
    pack,
    shared_layout,
    unpack,
)

__all__ = ["Replica", "ReplicaSource", "StageReplica", "rebuild_stage", "serve_requests"]

MakeOptimizer = Callable[[torch.nn.Module], torch.optim.Optimizer]


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
) -> list[str]:
    """A survivor's side: answer ``requester`` (global rank) until DONE; returns what was served."""
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
        status = SERVED if payload is not None else REFUSED
        mine_stage = -1 if stage is None else stage
        transport.send(
            requester,
            Message(status, mine_stage, msg.lost, reply_step, norm).encode(),
            timeout_s=timeout_s,
        )
        if payload is not None:
            transport.send(requester, payload, timeout_s=timeout_s)
            kind = {NEIGHBOUR: "neighbour", REPLICA: "replica", EXTRAS: "edge copy"}[msg.kind]
            served.append(f"{kind} of stage {msg.lost}")


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
    strategies.append(
        CheckFreeRecovery(
            stage=stage,
            num_stages=num_stages,
            fetch=neighbour,
            keys=[k for k, _, _ in model_layout],
            replicated=edge_copy,
            options=options,
        )
    )

    def use(source: Any) -> torch.optim.Optimizer:
        tree = source.read(rank=stage, allow_pickle=False)
        module.load_state_dict(tree["model"], strict=True)
        opt = make_optimizer(module)
        if "optimizer" in tree:
            load_optimizer_entries(opt, tree["optimizer"])
            return opt
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
