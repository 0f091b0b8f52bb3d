"""One data-parallel training step at a time, kept going in process when ranks are lost.

Where it sits: above the checkpointer, in the user's loop. It drives one step over the
pieces below it: the data (:class:`~recoverkit.state.global_batch.GlobalBatchSampler`), the
random streams (:func:`~recoverkit.state.keyed_rng.keyed_rng`), the gradient reduction
(:mod:`~recoverkit.distributed.global_grad`), the membership
(:mod:`~recoverkit.distributed.regroup`) and, after a re-forming, the agreement on the last
completed step (:mod:`~recoverkit.elastic.reconcile`). Its position is Stateful, so
``protect()`` and the :class:`~recoverkit.checkpointer.Checkpointer` save it next to the
model and the optimizer; when in-process recovery is impossible (a :class:`RegroupError`
propagates), the caller ends the process and torchrun's restart path restores from memory.

The flow of :meth:`ElasticTrainer.step` (step ``k`` of epoch ``e``, ``G`` samples)::

    heartbeat saw a dead member?  -> recover, then the step
    a joiner announced itself?     -> propose admitting it at the next boundary (admit.py);
    the boundary agreed for one?   -> admit it: the new group with it, its state sent in
                                      disjoint pieces from the survivors (grow.py); a
                                      failure there drops it (recover, as for a lost rank)
    mbs = sampler.assign(k, rank, world)            (mode "shrink": the launch world's
                                                     share of this rank, lost shares dropped)
    for mb in mbs:  with keyed_rng(seed, *mb.key):  (loss_fn(model, mb) / G).backward()
    reduce over the live ranks:  "global"  all-reduce SUM       (rounding-level equal)
                                 "ordered" OrderedGradSum       (bit-identical, any world)
                                 "shrink"  mean over live ranks (TorchFT's shrink)
      a collective fails (peer reset, gloo timeout), or the heartbeat sees a dead member
      while a collective is pending (global_grad's waits with abort=, elastic/waits), or
      a wait passes collective_timeout_s  -> recover, redo step k
    optimizer.step(); sampler.advance(); steps_done += 1
      (a step with a collective, ZeroOptimizer's all-gather: watched as one, a failure -> recover)

    recover:  destroy the old group; one with an operation given up while pending is
              kept referenced (freeing it would join its stuck thread)
              regroup(store, membership)    the survivors' new default group, dense ranks
              reconcile(...)                agree on steps_done; the ranks one step behind
                                            take model + optimizer + position from a rank
                                            ahead (see reconcile's module doc)
              log: who was lost, how it was detected, how long re-forming and the
                   agreement took, which micro-batches of the step moved to this rank
              a collective of the recovery fails (a second rank lost in reconcile, in
              the rebuild or in DDP's construction: elastic/waits' recovering, by type)
                                            -> log it, recover again from the membership
                                               just formed, then redo step k

A step is redone from scratch (gradients cleared) with the new assignment: the lost rank's
micro-batches move to the survivors, so the global batch, its gradient scale and every
micro-batch's random numbers stay those of the failure-free run. A lost rank's failure may
surface in the next step's collective on some survivors (a rank that completed step ``k``)
and in step ``k``'s on others; reconcile makes them agree before anything is redone.

Every wait is bounded: collectives by ``collective_timeout_s`` or the group's timeout
(``pg_timeout_s`` for re-formed groups), the re-forming by ``regroup_timeout_s``; a step
gives up after ``max_recoveries_per_step`` re-formings (one whose recovery failed counts).
Detection, measured under torchrun on one host (tests/integrations/test_elastic_shrink.py):
the survivors next to a SIGKILLed rank see their collective fail within ~20 ms; one whose
pending collective never talks to it (the far side of gloo's ring, waiting for a send) is
not woken by any reset and sees the loss through the heartbeat (``miss_s``) in every mode;
a DDP model's reduction in the backward pass asks it only through a
``SumHookState(abort=...)`` hook (otherwise: the group's timeout).
Keep ``regroup_timeout_s`` above those bounds, or a late survivor is left out.

Example::

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    store = job_store(timeout_s=30)
    trainer = ElasticTrainer(model, opt, sampler, loss_fn, store=store,
                             membership=Membership.initial(store), seed=0,
                             options=ElasticOptions(mode="global"))
    state = {"model": model, "optimizer": opt, "trainer": trainer}   # trainer: its position
    ckpt.restore(state)                     # at any world size (the sampler's position)
    while sampler.epoch < epochs:
        result = trainer.step()             # survives a lost rank; RegroupError: restart
        ckpt.save(trainer.steps_done, state)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..distributed.global_grad import (
    OrderedGradSum,
    allreduce_grads_sum,
    allreduce_sum,
)
from ..distributed.regroup import Heartbeat, Membership, regroup
from ..errors import IncompatibleCheckpointError, RegroupError
from ..state.dtensor import is_dtensor
from ..state.global_batch import GlobalBatchSampler, MicroBatch
from ..state.keyed_rng import keyed_rng
from .grow import Grow, at_boundary, receive
from .options import ElasticOptions
from .reconcile import Reconciled, reconcile
from .reshard import Reshard
from .waits import Lost, recovering, reducing, release_group

__all__ = ["ElasticTrainer", "StepResult", "Recovery", "LossFn"]

log = logging.getLogger("recoverkit")

#: ``loss_fn(model, micro_batch)``: the *sum* of the per-sample losses of the micro-batch (0-d)
LossFn = Callable[[torch.nn.Module, MicroBatch], torch.Tensor]
_STATE_KEYS = ("steps_done", "generation", "members", "sampler")
_MAX_STEPS = 1 << 62


@dataclass(frozen=True)
class Recovery:
    """One in-process recovery, as this rank saw it (also logged).

    Attributes:
        step, epoch: the step being run when the failure surfaced here (then redone).
        detected_by: ``"collective: <error>"`` or ``"heartbeat"``.
        detected_at: ``time.time()`` when the failure surfaced on this rank.
        heartbeat_lost_at: ``time.monotonic()`` when the heartbeat first saw a dead member
            (``None``: no heartbeat, or it saw nothing).
        lost: launch ranks lost in this re-forming (the previous generation's members not
            in the new one). A step that re-forms more than once has one record per
            re-forming, each naming its own losses: the union over the step's records names
            every launch rank lost during the step.
        generation, world_size: the new membership.
        regroup_s: seconds :func:`regroup` took; ``regroup_phases_s`` its split.
        reconcile: what the agreement on the completed step did.
        moved: global micro-batch indices of the redone step this rank runs now and did
            not run before the failure.
        redo_s: seconds the redone step took (``None`` until it completed).
        failed: ``None``, or how the recovery itself failed after this generation formed
            (a collective of the agreement, of the rebuild or of DDP's construction: a
            second rank lost): the trainer re-formed again (the next record). Such a record
            has ``moved=()``; if the agreement itself failed, a ``reconcile`` that agreed
            nothing (this rank's ``steps_done``, the seconds until the failure).
    """

    step: int
    epoch: int
    detected_by: str
    detected_at: float
    heartbeat_lost_at: float | None
    lost: tuple[int, ...]
    generation: int
    world_size: int
    regroup_s: float
    regroup_phases_s: tuple[tuple[str, float], ...]
    reconcile: Reconciled
    moved: tuple[int, ...]
    redo_s: float | None = None
    failed: str | None = None


@dataclass(frozen=True)
class StepResult:
    """One completed step.

    Attributes:
        epoch, step: the step that ran (the data position before it).
        loss: the step's loss over the live ranks (global/ordered: the mean over the global
            batch's samples; shrink: the mean of the ranks' own means).
        samples: the sample indices this rank trained on in the step that completed.
        micro_batches: their global micro-batch indices.
        world_size: the world the step completed in.
        seconds: wall time of the step, recoveries included.
        recoveries: the recoveries this step went through, one per re-forming (a failed
            one included, :attr:`Recovery.failed`).
        grows: the admissions of joiners at this step's boundary (:mod:`.admit`, :mod:`.grow`).
    """

    epoch: int
    step: int
    loss: float
    samples: tuple[int, ...]
    micro_batches: tuple[int, ...]
    world_size: int
    seconds: float
    recoveries: tuple[Recovery, ...] = field(default=())
    grows: tuple[Grow, ...] = field(default=())


class ElasticTrainer:
    """Runs data-parallel steps on the default group and survives lost ranks in process.

    Args:
        model: a plain ``nn.Module`` (replicated on every rank; not a DDP wrapper).
        optimizer: the model's optimizer.
        sampler: the global batch sampler (its position is this trainer's data position).
        loss_fn: ``loss_fn(model, mb)`` returns the summed (not averaged) loss of the
            micro-batch's samples; it runs under ``keyed_rng(seed, *mb.key)``.
        store: the store every worker shares (:func:`~recoverkit.distributed.regroup.job_store`).
        membership: the current membership (:meth:`Membership.initial` at launch). A process
            joining a running job passes what :func:`~recoverkit.elastic.admit.join` returned:
            the constructor then receives model, optimizer and position from the survivors
            (:mod:`.grow`), before ``wrap`` builds its DDP wrapper.
        seed: the base seed of the keyed random streams.
        options: :class:`~recoverkit.elastic.options.ElasticOptions`.
        heartbeat: an optional running :class:`~recoverkit.distributed.regroup.Heartbeat`:
            a loss between collectives is seen before the next step, and survivors agree
            within a few beats instead of a join window.
        wrap: builds the model's DDP wrapper on the current default group, called now and
            after every re-forming (DDP binds its group when it is built; the broken one
            is dropped first). ``loss_fn`` then gets the wrapper. Mode "global": register
            :func:`~recoverkit.distributed.global_grad.sum_allreduce_hook` in it (DDP's own
            hook divides by the world size), with a
            :class:`~recoverkit.distributed.global_grad.SumHookState` whose ``abort`` asks
            the heartbeat (``heartbeat.dead()``), so that a survivor whose reduction never
            talks to the lost rank gives it up at the heartbeat's miss, not at the group's
            timeout; "shrink": DDP's own mean is TorchFT's; the
            micro-batches run under ``no_sync`` but the last, whose backward reduces (so
            every rank needs a micro-batch: world size <= micro-batches per step).
            "ordered": every micro-batch under ``no_sync``, OrderedGradSum reduces. A
            failure inside the reducing backward counts as a failed collective.
        rebuild: a sharded (FSDP2) model: a :class:`~recoverkit.elastic.reshard.Reshard`,
            used after every re-forming instead of the agreement: the survivors build model,
            optimizer and Checkpointer anew on the new group and restore the newest step
            complete in memory, resharded, the trainer's position included (steps after it
            are redone). Every micro-batch then counts as a collective (FSDP's all-gathers);
            :func:`~recoverkit.elastic.sharded.fsdp_wrap` as ``wrap=`` makes its backward
            reduce (mode "global" or "shrink"; "ordered" is refused for DTensor
            parameters). Also a replicated model whose optimizer state is partitioned
            (:class:`~recoverkit.elastic.zero.ZeroOptimizer`, any mode, "ordered" bit for bit
            across a shrink): its step's all-gather is watched as a collective; without
            ``rebuild`` a loss there raises RegroupError, reason "restore" (the restart path).

    A second rank lost while a recovery runs (after the new group formed: in the agreement,
    the rebuild or DDP's construction) is a loss like any other: the trainer re-forms again
    from the membership just formed and then redoes the step, within
    ``max_recoveries_per_step`` re-formings. The agreement applies a received state only
    once it all arrived and was checked, so a recovery cut short leaves every rank either
    untouched or wholly at the source's position.

    Stateful: ``state_dict()`` holds ``steps_done``, the sampler's state and the membership
    (generation, launch ranks) for the record; ``load_state_dict`` restores the first two
    and never changes the live membership (``resumed_membership`` keeps the saved one).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        sampler: GlobalBatchSampler,
        loss_fn: LossFn,
        *,
        store: Any,
        membership: Membership,
        seed: int,
        options: ElasticOptions | None = None,
        heartbeat: Heartbeat | None = None,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        rebuild: Reshard | None = None,
    ) -> None:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise TypeError("ElasticTrainer: pass the plain module, and wrap= to build its DDP wrapper (rebuilt after each re-forming)")
        self._wrap = wrap
        #: a sharded model: rebuilt and restored from memory after a re-forming (not reconciled)
        self._rebuild = rebuild
        if rebuild is not None and options is not None and options.mode == "ordered" and any(is_dtensor(p) for p in model.parameters()):
            raise ValueError("ElasticTrainer: a sharded model (rebuild=) reduces in its backward pass: mode 'global' or 'shrink'")
        joining = membership.launch_rank in membership.joined  # a newcomer: DDP after its state came
        self.ddp: torch.nn.Module | None = wrap(model) if wrap is not None and not joining else None
        self.model, self.optimizer, self.sampler, self.loss_fn = model, optimizer, sampler, loss_fn
        self.store, self.membership, self.seed = store, membership, seed
        self.options = options if options is not None else ElasticOptions()
        self.heartbeat = heartbeat
        self.launch_members = membership.members
        self.steps_done = 0
        self.resumed_membership: tuple[int, tuple[int, ...]] | None = None
        self.recoveries: list[Recovery] = []
        self._params = [p for p in model.parameters() if p.requires_grad]
        #: old groups with an operation given up while pending (kept, never destroyed by the collector)
        self._abandoned: list[Any] = []
        #: admissions (grow): the first launch rank not yet admitted or refused (agreed at each
        #: admission), where the scan for joiners starts, when awaited records were first missed
        self.grows: list[Grow] = []
        self._next_launch_rank = self._scan_from = max(membership.members) + 1
        self._first_seen: dict[int, float] = {}
        if joining:
            self.grows.append(receive(self))  # the newcomer's state, from the survivors
            if wrap is not None:
                self.ddp = wrap(model)

    # ------------------------------------------------------------------ one step

    def assignment(self, step: int, epoch: int | None = None) -> list[MicroBatch]:
        """This rank's micro-batches of ``step`` under the current membership and mode."""
        m = self.membership
        if self.options.mode == "shrink":
            return self.sampler.assign(step, self.launch_members.index(m.launch_rank), len(self.launch_members), epoch)
        return self.sampler.assign(step, m.rank, m.world_size, epoch)

    def step(self) -> StepResult:
        """Runs the next step of the sampler; recovers from lost ranks and redoes it.

        A collective that fails during a recovery, after the new group formed (a second
        rank lost in the agreement, the rebuild or DDP's construction), is a loss too: the
        trainer re-forms again and redoes the step; each re-forming counts, failed or not.

        Raises:
            RegroupError: in-process recovery is impossible (the store's node was lost,
                this rank was left out, no agreement in time, the survivors diverged or a
                rank could not apply the state it received, a sharded model's survivors
                could not restore one step): fall back to the restart path. Raised as it is
                also when it arises inside a recovery; so is every other recoverkit error
                (``IntegrityError`` ...).
            RuntimeError, TimeoutError, ConnectionError: a collective failed (in a step or
                in a recovery) after ``max_recoveries_per_step`` re-formings of this step:
                the last failure's own error (the backend's ``RuntimeError``;
                :class:`~recoverkit.errors.PeerTimeoutError`, a ``TimeoutError``;
                :class:`~recoverkit.errors.PeerLostError`, a ``ConnectionError``, when the
                heartbeat gave it up).
            Any other error of a recovery (an allocation, a user's ``wrap``): as it is; a
                local failure is not a lost peer and is never retried.
        """
        start = time.monotonic()
        done: list[Recovery] = []
        grown: list[Grow] = []
        while True:
            try:
                seen = self._seen_lost()
                if seen is not None:
                    raise Lost(f"heartbeat (between steps): {seen}")
                grew = at_boundary(self)  # admit joiners, or propose admitting them
                if grew is not None:
                    grown.append(grew)
                result = self._attempt()
            except Lost as lost:
                k = self.sampler.step  # what this rank ran (or was to run) before the failure
                before = (k, frozenset(mb.index for mb in self.assignment(k)))
                again: Lost | None = lost
                while again is not None:  # a recovery cut short by a second loss: re-form again
                    again.release()
                    if len(done) >= self.options.max_recoveries_per_step:
                        raise (again.cause or RuntimeError(again.how)) from again
                    recovery, again = self._recover(again, before, len(done) + 1)
                    done.append(recovery)
                continue
            if done:
                redo = time.monotonic() - self._attempt_started
                done[-1] = replace(done[-1], redo_s=redo)
                self.recoveries[-1] = done[-1]
                log.warning(
                    "elastic: step %d redone at world %d in %.3f s",
                    result.step,
                    result.world_size,
                    redo,
                )
            return replace(
                result, seconds=time.monotonic() - start, recoveries=tuple(done), grows=tuple(grown)
            )

    def _attempt(self) -> StepResult:
        self._attempt_started = time.monotonic()
        s, mode = self.sampler, self.options.mode
        epoch, k = s.epoch, s.step
        global_size = s.batch_size(k)
        mbs = self.assignment(k)
        own = sum(len(mb) for mb in mbs)
        scale = own if mode == "shrink" else global_size
        self.optimizer.zero_grad(set_to_none=True)
        summer = OrderedGradSum(self._params, **self._wait_kw()) if mode == "ordered" else None
        local = 0.0
        ddp = self.ddp
        if ddp is not None and summer is None and not mbs:
            raise RuntimeError(
                f"step {k}: this rank has no micro-batch at world {self.membership.world_size}, and a DDP "
                "model reduces in the backward pass: use more micro-batches per step than ranks, or mode='ordered'"
            )
        for i, mb in enumerate(mbs):
            reduces = ddp is not None and summer is None and i == len(mbs) - 1
            sync = ddp.no_sync() if ddp is not None and not reduces else nullcontext()  # type: ignore[operator]
            # a sharded model's forward and backward run collectives in every micro-batch; so does
            # a DDP forward in the wrapper's second step (the bucket rebuild broadcast), on every
            # new group: a peer lost there is a lost collective too
            watch = (
                "DDP reduction in backward" if reduces
                else "sharded model's collectives" if self._rebuild
                else "DDP forward" if ddp is not None
                else None
            )
            try:
                with reducing(watch) if watch else nullcontext(), sync, keyed_rng(self.seed, *mb.key):
                    loss = self.loss_fn(ddp if ddp is not None else self.model, mb) / scale
                    loss.backward()
            except Lost as lost:
                # the hook's error reaches here as a RuntimeError, whatever it was: with a member
                # seen dead, its collective may have been given up while pending (SumHookState)
                if lost.abandoned or self._seen_lost() is None:
                    raise
                raise Lost(lost.how, lost.cause, abandoned=True) from None
            if summer is not None:
                summer.add(mb.index, loss.detach())
            else:
                local += float(loss.detach())
        if summer is not None:
            with reducing("ordered reduction"):
                total = summer.reduce(len(s.micro_batches(k)))
            value = float("nan") if total is None else total
        else:
            if ddp is None:
                with reducing("gradient all-reduce"):
                    allreduce_grads_sum(self._params, mode="shrink" if mode == "shrink" else "global", **self._wait_kw())
            t = torch.tensor([local], dtype=torch.float64)
            with reducing("loss all-reduce"):
                allreduce_sum([t], mean=mode == "shrink", what="the loss all-reduce", **self._wait_kw())
            value = float(t.item())
        # an optimizer whose step runs a collective (ZeroOptimizer's all-gather): a failure there is a loss
        with reducing("optimizer step") if getattr(self.optimizer, "collective_step", False) else nullcontext():
            self.optimizer.step()
        s.advance()
        self.steps_done += 1
        return StepResult(
            epoch=epoch,
            step=k,
            loss=value,
            samples=tuple(i for mb in mbs for i in mb.samples),
            micro_batches=tuple(mb.index for mb in mbs),
            world_size=self.membership.world_size,
            seconds=0.0,
        )

    def _wait_kw(self) -> dict[str, Any]:
        """Every reduction wait: bounded by ``collective_timeout_s`` (or the group's
        timeout), asking the heartbeat every ``poll_s`` while pending."""
        o = self.options
        return {"timeout_s": o.collective_timeout_s, "abort": self._seen_lost, "poll_s": o.poll_s}

    def _seen_lost(self) -> str | None:
        """What the heartbeat saw (``None``: nothing, or no heartbeat)."""
        hb = self.heartbeat
        if hb is None:
            return None
        if hb.store_error is not None:
            return f"the store is unreachable ({type(hb.store_error).__name__})"
        dead = hb.dead()
        return f"launch rank(s) {sorted(dead)} stopped beating" if dead else None

    def _seen_regroup(self) -> str | None:
        """:meth:`_seen_lost`, or another survivor already re-forming (the heartbeat answered
        a regroup of the next generation): a recovery's wait gives up then too, instead of
        waiting for a member that left it for the next group."""
        seen = self._seen_lost()
        if seen is None and self.heartbeat is not None and self.heartbeat.lost():
            return "another survivor started the next regroup"
        return seen

    # ------------------------------------------------------------------ recovery

    def _recover(self, lost: Lost, before: tuple[int, frozenset[int]], nth: int) -> tuple[Recovery, Lost | None]:
        """One re-forming (the ``nth`` of this step): its record, and the loss that cut its
        recovery short after the new group formed (``None``: recovered). ``before``: the
        step and micro-batches this rank ran when the step first failed."""
        o, old = self.options, self.membership
        epoch, k = self.sampler.epoch, self.sampler.step
        log.warning(
            "elastic: step %d (epoch %d, generation %d, world %d): %s; re-forming the group",
            k, epoch, old.generation, old.world_size, lost.how,
        )
        teardown = time.monotonic()
        self.ddp = None  # its reducer is bound to the broken group
        if lost.group is not None:  # a collective may still be pending on it: never join its threads
            self._abandoned.append(lost.group)
        lost.group = None
        release_group()
        teardown = time.monotonic() - teardown
        self.membership = regroup(
            self.store,
            old,
            timeout_s=o.regroup_timeout_s,
            join_window_s=o.join_window_s,
            heartbeat=self.heartbeat,
            pg_timeout_s=o.pg_timeout_s,
        )  # RegroupError propagates: the restart path
        new = self.membership
        agreeing = time.monotonic()
        failed: Lost | None = None
        rec: Reconciled | None = None
        try:  # a collective failing here, on the new group, is a second loss (RegroupError is not)
            with recovering("the rebuild" if self._rebuild is not None else "the agreement on the completed step"):
                rec = self._agree(new)
            if self._wrap is not None:
                with recovering("DDP's construction on the new group", backend=True):
                    self.ddp = self._wrap(self.model)  # DDP binds its group when built: on the new one
        except Lost as e:
            failed = e
        if rec is None:  # the agreement itself failed: it agreed nothing
            rec = Reconciled(steps_done=self.steps_done, seconds=time.monotonic() - agreeing)
        k2 = self.sampler.step
        moved = () if failed else tuple(sorted({mb.index for mb in self.assignment(k2)} - (before[1] if k2 == before[0] else set())))
        recovery = Recovery(
            step=k2,
            epoch=self.sampler.epoch,
            detected_by=lost.how,
            detected_at=lost.wall,
            heartbeat_lost_at=self.heartbeat.lost_at if self.heartbeat is not None else None,
            lost=new.lost,
            generation=new.generation,
            world_size=new.world_size,
            regroup_s=teardown + new.formed_in_s,
            regroup_phases_s=(("teardown", teardown), *((n, t) for n, t in new.phases_s if n != "teardown")),
            reconcile=rec,
            moved=moved,
            failed=failed.how if failed else None,
        )
        self.recoveries.append(recovery)
        if failed is not None:
            log.warning(
                "elastic: step %d: the recovery into generation %d (lost launch rank(s) %s, world %d) failed "
                "after the group formed: %s; %s (re-formings of this step: %d of at most %d)",
                k2, new.generation, list(new.lost), new.world_size, failed.how,
                "re-forming again" if nth < o.max_recoveries_per_step else "giving up", nth, o.max_recoveries_per_step,
            )
            return recovery, failed
        log.warning(
            "elastic: generation %d formed: lost launch rank(s) %s, world %d -> %d, this rank %d -> %d; "
            "detected by %s, re-formed in %.3f s (%s) %.3f s after detection; steps agreed at %d "
            "(%s) in %.3f s; step %d now runs micro-batches %s here (moved here: %s)",
            new.generation, list(new.lost), old.world_size, new.world_size, old.rank, new.rank,
            lost.how, recovery.regroup_s, ", ".join(f"{n} {t:.3f} s" for n, t in recovery.regroup_phases_s),
            time.monotonic() - lost.mono, rec.steps_done,
            "all equal" if rec.source is None else f"rank(s) {list(rec.behind)} took {rec.nbytes} bytes from rank {rec.source}",
            rec.seconds, k2, [mb.index for mb in self.assignment(k2)], list(moved),
        )
        return recovery, None

    def _agree(self, new: Membership) -> Reconciled:
        """After a re-forming: a sharded model rebuilt and restored from memory (the trainer's
        position too), or the survivors' agreement on the completed step (:func:`reconcile`)."""
        if self._rebuild is not None:
            rec: Reconciled = self._rebuild.recover(self, new)
            self._params = [p for p in self.model.parameters() if p.requires_grad]
            return rec
        if getattr(self.optimizer, "collective_step", False):  # partitioned: no rank holds it all
            raise RegroupError(
                "elastic: the optimizer's state is partitioned over the ranks (a collective step, e.g. "
                "ZeroOptimizer): the lost rank's part is only in the snapshots; pass rebuild=Reshard(...)",
                reason="restore",
            )
        return reconcile(
            {"model": self.model, "optimizer": self.optimizer, "trainer": self},
            steps_done=self.steps_done,
            epoch=self.sampler.epoch,
            step=self.sampler.step,
            generation=new.generation,
            max_bytes=self._sync_max_bytes(),
            timeout_s=self.options.pg_timeout_s,
            abort=self._seen_regroup,  # a member lost during the agreement: given up at the heartbeat's miss
            poll_s=self.options.poll_s,
        )

    def _sync_max_bytes(self) -> int:
        if self.options.sync_max_bytes is not None:
            return self.options.sync_max_bytes
        own = sum(t.numel() * t.element_size() for t in self.model.state_dict().values() if isinstance(t, torch.Tensor))
        return 8 * own + (1 << 20)

    # ------------------------------------------------------------------ Stateful

    def state_dict(self) -> dict[str, Any]:
        """The trainer's position: completed steps, the sampler's state, the membership."""
        return {
            "steps_done": self.steps_done,
            "generation": self.membership.generation,
            "members": list(self.membership.members),
            "sampler": self.sampler.state_dict(),
        }

    def validate_state_dict(self, state_dict: Any) -> None:
        """Raise :class:`IncompatibleCheckpointError` unless ``state_dict`` is a trainer
        position this trainer can take (hostile input: keys, types, ranges)."""
        if not isinstance(state_dict, dict) or set(state_dict) != set(_STATE_KEYS):
            got = sorted(map(str, state_dict))[:8] if isinstance(state_dict, dict) else type(state_dict).__name__
            raise IncompatibleCheckpointError(f"elastic trainer state needs keys {list(_STATE_KEYS)}, got {got}")
        for key in ("steps_done", "generation"):
            v = state_dict[key]
            if type(v) is not int or not 0 <= v < _MAX_STEPS:
                raise IncompatibleCheckpointError(f"elastic trainer state: {key} must be an int in [0, 2**62), got {str(v)[:40]}")
        members = state_dict["members"]
        if (
            not isinstance(members, list)
            or not members
            or len(members) > 1 << 16
            or any(type(r) is not int or r < 0 for r in members)
            or members != sorted(set(members))
        ):
            raise IncompatibleCheckpointError(f"elastic trainer state: members must be a sorted list of distinct ranks, got {str(members)[:80]}")
        self.sampler.validate_state_dict(state_dict["sampler"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved position (the live membership is kept; see the class doc)."""
        self.validate_state_dict(state_dict)
        self.sampler.load_state_dict(state_dict["sampler"])
        self.steps_done = state_dict["steps_done"]
        self.resumed_membership = (state_dict["generation"], tuple(state_dict["members"]))
