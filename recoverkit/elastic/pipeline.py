"""A pipeline-parallel job on ``torch.distributed.pipelining`` that survives a lost stage.

Where it sits: the training loop of each process of a pipeline job (one stage per process,
plus spare processes) wraps its stage in :class:`StagePipeline`. Steps run PyTorch's own
schedules (``ScheduleGPipe`` or ``Schedule1F1B`` over ``PipelineStage``). Recovery uses the
layers below: :func:`~recoverkit.distributed.regroup.regroup` (the survivors and the spares
re-form the process group, in process), :mod:`.stage_recovery` (exact replica first,
CheckFree last, through a recovery chain) and :mod:`recoverkit.recovery.checkfree` (the rule).

One step, on every stage process::

    schedule.step(...)            forward and backward of every micro-batch (gradients
                                  averaged over the micro-batches by the schedule)
    clip_and_record               per-stage clipping, the clipped norm n_k of this step
    all_gather (n_k, step)        on the stages' group: every stage knows every norm (its
                                  neighbours' two among them); the step is committed here
    optimizer.step()              steps_done += 1
    replica ring (opt-in)         each stage's model + optimizer to the next stage's process
    activations (distill_steps>0) this stage's module inputs and outputs of the micro-batches
                                  run in pipeline order (a forward hook while ``_schedule``
                                  runs), kept as ``activations`` tagged with the new
                                  steps_done; a step that fails keeps the previous ones

A lost stage (its process SIGKILLed)::

    neighbours' p2p fails at once (socket reset); the others when the stages' group of a
    failed survivor is dropped (its sockets close), at the latest at pg_timeout_s; a spare
    joins once a survivor has started the regroup (it never starts one on its own: a
    heartbeat thread starved on a loaded host must not split the job)
    -> regroup (survivors + spares), the lost stage handed to a spare
    -> the members agree on steps_done (every survivor must have completed the same step)
    -> the spare rebuilds the stage (stage_recovery.rebuild_stage), the others serve it
       (their weights and norms; with distill_steps their activations of that step, which
       the rebuilt interior stage is fitted to)
    -> a new stages' group, new PipelineStage objects and schedule; the failed step is
       redone from its start by every stage. No surviving stage rolls back.

The replacement is a spare launched with the job or, with
``options.replacement_timeout_s``, a process started after the loss that joins through the
job's store (:func:`~recoverkit.elastic.admit.join`, then ``StagePipeline(...,
stage="joiner")``; :mod:`.stage_join`): the survivors wait for it, bounded, after they
re-formed. torchrun's restart of a single rank cannot be used (its agent restarts every
local worker, rolling every stage back). A peer lost during a recovery (the replacement
dying as it takes the stage) counts as one more failure of the step: the recovery starts
over from the regroup, on the survivors and on waiting spares alike, up to
``max_recoveries_per_step`` failures per step. A lost stage that every strategy refuses
(an edge stage without CheckFree+, say): with ``checkpoints=`` (:mod:`.stage_checkpoints`,
each stage saved by :meth:`StagePipeline.save`) every stage rolls back in process to the
newest step all stages committed (strategy ``checkpoint rollback``; no process restarts);
without, the survivors are told and raise at once. Every failure the pipeline does not
recover from is a :class:`PipelineRecoveryError` (the caller restarts the job, and
:meth:`StagePipeline.resume` rolls it back). Limits: one stage lost at a time (several, each
taken by a spare, roll every stage back when the job keeps stage checkpoints); a loss inside
the norms' all-gather that lets some survivors complete the step and not others is refused;
the process hosting the job's store (launch rank 0) must survive
(:func:`~recoverkit.distributed.regroup.regroup`). Learning rates: see
:func:`~.pipeline_options.apply_lr_schedule`. A rebuilt stage also gets the survivors'
gradient norms of the last step, so CheckFree can rebuild a neighbour of it lost before it
completed a step of its own. CheckFree+ (``CheckFreeOptions(plus=True)`` and a ``split``):
each step runs the odd micro-batches through :mod:`.swap_schedule`; every ``extras_every``
steps the edge stages' embedding and head are copied to their partners' processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

from ..distributed.regroup import Heartbeat, Membership, regroup, retire
from ..distributed.transport import ProcessGroupTransport
from ..errors import ConfigError, RecoverkitError
from ..recovery.checkfree import clip_and_record, swap_partner
from .pipeline_options import (
    POSITION_KEYS,
    PipelineOptions,
    PipelineRecoveryError,
    RollbackNeeded,
    StageRecovery,
    StepRecord,
    apply_lr_schedule,
    validate_position,
)
from .stage_checkpoints import StageCheckpoints
from .stage_join import await_replacement
from .stage_recovery import (
    Activations,
    Replica,
    fit_plan,
    full_layout,
    rebuild_stage,
    record_pairs,
    recorded_count,
    serve_requests,
)
from .stage_roles import gather_roles, launch_holders
from .stage_wire import edge_layout, layout_of, nbytes, optimizer_entries, pack, stage_template
from .swap_schedule import Split, build_swapped

__all__ = [
    "PipelineOptions",
    "PipelineRecoveryError",
    "StagePipeline",
    "StageRecovery",
    "StepRecord",
]

Batch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]

log = logging.getLogger("recoverkit.elastic")


class StagePipeline:
    """This process's side of the pipeline: a stage (launch rank < num_stages) or a spare.

    Args:
        build_stage: ``build_stage(i)`` makes stage ``i``'s module (same structure on every
            call; called again to size transfers and to build a replacement).
        make_optimizer: the stage's optimizer over a module.
        loss_fn: ``loss_fn(output, target)`` of the last stage, per micro-batch.
        batch: ``batch(step)`` -> (inputs of the first stage, targets of the last), the same
            on every call for a step (a redone step reads it again).
        store / membership / heartbeat: the job's store, generation-0 membership and running
            heartbeat (:mod:`recoverkit.distributed.regroup`).
        split: with ``options.checkfree.plus``: a stage module -> (embedding or None, blocks,
            head or None), modules over its own parameters (:mod:`.swap_schedule`).
        stage: this process's stage, or ``"spare"``; ``"auto"``: launch ranks
            0..num_stages-1 hold the stages in order, the others are spares. Every stage must
            be held by exactly one process (checked on every member alike). ``"joiner"``: a
            replacement started after a loss, ``membership`` the one
            :func:`~recoverkit.elastic.admit.join` returned; the constructor takes the lost
            stage and rebuilds it with the survivors (they wait for it in their recovery).
        checkpoints: the job's :class:`StageCheckpoints` (the same root on every member):
            :meth:`save` writes this stage to it, :meth:`resume` rolls every stage back to
            the newest step all committed, and a lost stage that no strategy can rebuild
            rolls every stage back in process instead of raising PipelineRecoveryError.

    Construct on every member together (it creates the stages' group). Stages call
    :meth:`step`; spares call :meth:`wait_for_role`, which returns True once they hold a
    stage (then they call :meth:`step` like the others) or False when the job ended.
    """

    def __init__(
        self,
        build_stage: Callable[[int], torch.nn.Module],
        make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batch: Batch,
        *,
        store: Any,
        membership: Membership,
        heartbeat: Heartbeat,
        options: PipelineOptions,
        split: Split | None = None,
        stage: int | Literal["auto", "spare", "joiner"] = "auto",
        checkpoints: StageCheckpoints | None = None,
    ) -> None:
        if options.checkfree.plus and split is None:
            raise ConfigError("StagePipeline: CheckFree+ needs split= (embedding, blocks, head)")
        self.split = split
        self.build_stage, self.make_optimizer = build_stage, make_optimizer
        self.loss_fn, self.batch, self.options = loss_fn, batch, options
        self.store, self.membership, self.heartbeat = store, membership, heartbeat
        self.checkpoints = checkpoints
        s = options.num_stages
        if membership.world_size < s:
            raise ConfigError(
                f"{s} stages need at least {s} processes, got {membership.world_size}"
            )
        me = membership.launch_rank
        self.holder: dict[int, int] = {}  # stage -> launch rank
        self.stage: int | None = None
        self.module: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if stage == "joiner":
            if membership.generation == 0:
                raise ConfigError(
                    "StagePipeline(stage='joiner') takes the membership admit.join returned"
                )
        else:
            self.holder = launch_holders(stage, membership, s)
            self.stage = next((i for i, r in self.holder.items() if r == me), None)
        if self.stage is not None:
            self.module = build_stage(self.stage)
            self.optimizer = make_optimizer(self.module)
        # joiners get fresh launch ranks, counted up from the launch world's size
        self._scan_from = me + 1 if stage == "joiner" else membership.world_size
        self.steps_done = 0
        self.norms: tuple[float, ...] = (math.nan,) * s
        self.replica: Replica | None = None
        self.extras: dict[int, Replica] = {}  # edge stage -> its (de)embedding, on its partner
        # CheckFree's fit (distill_steps > 0): this stage's pairs of the last committed step
        self.activations: Activations | None = None
        self.recoveries: list[StageRecovery] = []
        self._templates: dict[int, torch.nn.Module] = {}
        self._replica_layout: int | None = None
        self._group: Any = None
        self._schedule: Any = None
        self._swapped: Any = None
        self._pipe: Any = None
        self._ring: ProcessGroupTransport | None = None
        if stage == "joiner":  # the survivors are in their recovery: take the lost stage
            self._reassign("joined the job", time.time(), time.perf_counter(), 0.0)
        else:
            self._form()

    # ------------------------------------------------------------------ the stages' group
    def _rank(self, launch_rank: int) -> int:
        return self.membership.members.index(launch_rank)

    def _form(self) -> None:
        """New stages' group (every member calls), PipelineStage and schedule (stages only)."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        s = self.options.num_stages
        ranks = sorted(self._rank(self.holder[i]) for i in range(s))
        self._group = dist.new_group(
            ranks=ranks, timeout=timedelta(seconds=self.options.pg_timeout_s)
        )
        if self.stage is None or self.module is None:
            return
        pipe = PipelineStage(self.module, self.stage, s, torch.device("cpu"), group=self._group)
        pipe.stage_index_to_group_rank = {
            i: ranks.index(self._rank(self.holder[i])) for i in range(s)
        }
        kind = ScheduleGPipe if self.options.schedule == "gpipe" else Schedule1F1B
        self._pipe = pipe
        if self.options.checkfree.plus:
            # two schedules a step, even and odd micro-batches, the mean over all of them
            assert self.split is not None
            n, half = self.options.n_microbatches, self.options.n_microbatches // 2
            loss_fn = self.loss_fn

            def mean_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return loss_fn(output, target) / n

            self._schedule = kind(pipe, half, loss_fn=mean_loss, scale_grads=False)
            self._swapped = build_swapped(
                module=self.module,
                stage=self.stage,
                num_stages=s,
                split=self.split,
                group=self._group,
                group_rank_of_stage=dict(pipe.stage_index_to_group_rank),
                n_microbatches=half,
                loss_fn=mean_loss,
            )
        else:
            self._schedule = kind(pipe, self.options.n_microbatches, loss_fn=self.loss_fn)
        if self.options.replicate or self.options.checkfree.plus:
            self._ring = ProcessGroupTransport(
                group=self._group, timeout_s=self.options.pg_timeout_s
            )

    def _template(self, stage: int) -> torch.nn.Module:
        return stage_template(self.build_stage, stage, self._templates)

    # ------------------------------------------------------------------ one step
    def step(self) -> StepRecord:
        """Run step ``steps_done`` to completion, recovering from lost stages on the way."""
        if self.stage is None:
            raise PipelineRecoveryError("a spare holds no stage: call wait_for_role first")
        tries = 0
        why: str | None = None
        while True:
            try:
                if why is not None:
                    # outside the except clause: the traceback's frames (holding the stages'
                    # group) are gone, so dropping the group closes its sockets now. A peer
                    # lost during the recovery (a replacement dying as it takes the stage)
                    # counts as one more failure: the recovery starts over from the regroup.
                    self._recover(why)
                    why = None
                return self._run(self.steps_done)
            except (RuntimeError, ConnectionError, TimeoutError) as e:
                if not _lost_peer(e):
                    raise
                tries += 1
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                if tries > self.options.max_recoveries_per_step:
                    raise PipelineRecoveryError(
                        f"step {self.steps_done}: {tries} failures, more than "
                        f"max_recoveries_per_step ({self.options.max_recoveries_per_step}); "
                        f"the last: {why}"
                    ) from e

    def _run(self, k: int) -> StepRecord:
        assert self.module is not None and self.optimizer is not None and self.stage is not None
        start = time.perf_counter()
        s = self.options.num_stages
        if self.options.lr_schedule is not None:  # before the step's first collective
            apply_lr_schedule(self.optimizer, self.options.lr_schedule, k)
        x, y = self.batch(k)
        self.optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        distill = self.options.checkfree.distill_steps > 0
        recording = (
            record_pairs(self.module, stage=self.stage, num_stages=s)
            if distill
            else contextlib.nullcontext()
        )
        if self._swapped is None:
            with recording as pending:
                self._steps(self._schedule, x, y, losses)
        else:  # CheckFree+: even micro-batches in order, odd ones with the edge pairs swapped
            n = self.options.n_microbatches
            xs, ys = x.tensor_split(n), y.tensor_split(n)
            with recording as pending:
                self._steps(self._schedule, torch.cat(xs[0::2]), torch.cat(ys[0::2]), losses)
            self._steps(self._swapped, torch.cat(xs[1::2]), torch.cat(ys[1::2]), losses)
        norm = clip_and_record(self.module.parameters(), self.options.checkfree.max_grad_norm)
        mine = torch.tensor([norm, float(k), float(self.stage)], dtype=torch.float64)
        got = [torch.zeros(3, dtype=torch.float64) for _ in range(s)]
        dist.all_gather(got, mine, group=self._group)
        norms = [math.nan] * s
        for t in got:
            stage, step = int(t[2].item()), int(t[1].item())
            if step != k or not 0 <= stage < s:
                raise PipelineRecoveryError(f"stage {stage} reported step {step} during step {k}")
            norms[stage] = float(t[0].item())
        self.optimizer.step()
        self.steps_done, self.norms = k + 1, tuple(norms)
        if pending is not None:  # committed: this step's pairs replace the previous ones
            self.activations = Activations(
                self.stage, k + 1, tuple(pending.inputs), tuple(pending.outputs)
            )
        if self._ring is not None and self.options.replicate:
            self._replicate(k + 1)
        if self._ring is not None and self.options.checkfree.plus:
            if (k + 1) % self.options.extras_every == 0:
                self._copy_extras(k + 1)
        scale = self.options.n_microbatches if self._swapped is not None else 1
        loss = float(torch.stack([v.detach() for v in losses]).mean()) * scale if losses else None
        return StepRecord(k, loss, norm, self.norms, time.perf_counter() - start)

    def _steps(self, schedule: Any, x: torch.Tensor, y: torch.Tensor, losses: list) -> None:
        s = self.options.num_stages
        if self.stage == 0:
            schedule.step(x)
        elif self.stage == s - 1:
            schedule.step(target=y, losses=losses)
        else:
            schedule.step()

    def _copy_extras(self, step: int) -> None:
        """CheckFree+: each edge stage's own keys (embedding, head) to its swap partner's process."""
        assert self.module is not None and self.stage is not None and self._ring is not None
        s = self.options.num_stages
        glob = self.membership.members
        sends: dict[int, torch.Tensor] = {}
        recvs: dict[int, torch.Tensor] = {}
        layouts = {}
        for edge in (0, s - 1):
            partner = swap_partner(edge, s)
            assert partner is not None
            layout = edge_layout(self._template(edge), self._template(partner))
            if self.stage == edge:
                sends[glob.index(self.holder[partner])] = pack(self.module.state_dict(), layout)
            elif self.stage == partner:
                peer = glob.index(self.holder[edge])
                recvs[peer] = torch.empty(nbytes(layout), dtype=torch.uint8)
                layouts[peer] = edge
        self._ring.exchange(sends, recvs)
        for peer, buf in recvs.items():
            self.extras[layouts[peer]] = Replica(layouts[peer], step, buf)

    def _replicate(self, step: int) -> None:
        """Ring: this stage's model + optimizer to the next stage's process, the previous one's in."""
        assert self.module is not None and self.optimizer is not None and self.stage is not None
        assert self._ring is not None
        s = self.options.num_stages
        prev, nxt = (self.stage - 1) % s, (self.stage + 1) % s
        if self._replica_layout is None:
            model_l, opt_l = full_layout(self._template(prev), self.make_optimizer)
            self._replica_layout = nbytes(model_l + opt_l)
        mine = {**self.module.state_dict(), **optimizer_entries(self.optimizer)}
        data = pack(mine, layout_of(mine))
        buf = torch.empty(self._replica_layout, dtype=torch.uint8)
        glob = self.membership.members  # launch ranks by global rank
        self._ring.exchange(
            {glob.index(self.holder[nxt]): data}, {glob.index(self.holder[prev]): buf}
        )
        self.replica = Replica(prev, step, buf)

    # ------------------------------------------------------------------ spares
    def wait_for_role(self, *, timeout_s: float, poll_s: float = 0.05) -> bool:
        """A spare's loop: True once it holds a lost stage (recovered: call :meth:`step`),
        False when the job ended (:meth:`finish`) or ``timeout_s`` passed without either."""
        deadline = time.monotonic() + timeout_s
        done_key = f"{self.membership.namespace}/pipeline/done"
        while time.monotonic() < deadline:
            # a survivor started a regroup (its pipeline op failed, or timed out on a frozen
            # peer): the spare joins it. The heartbeat's own "dead" verdict is not used here:
            # a starved heartbeat thread on a loaded host must not start a regroup alone.
            started = f"{self.membership.namespace}/g{self.membership.generation + 1}/count"
            if self.store.check([started]):
                try:
                    self._recover("a survivor started a regroup")
                except (RuntimeError, ConnectionError, TimeoutError) as e:
                    if not _lost_peer(e):
                        raise
                    # a peer lost during the recovery (the spare rebuilding the stage, say):
                    # the survivors start over; this process stays a spare for that one
                    log.warning("pipeline: a recovery failed on a spare (%s); waiting for the next", e)
                    if self.optimizer is None:
                        self.stage, self.module = None, None
                    deadline = time.monotonic() + timeout_s
                    continue
                if self.stage is not None:
                    return True
                deadline = time.monotonic() + timeout_s
                continue
            if self.store.check([done_key]):
                return False
            time.sleep(poll_s)
        return False

    def finish(self) -> None:
        """The last stage's process tells the spares the job ended (call after the last step)."""
        self.store.set(f"{self.membership.namespace}/pipeline/done", "1")

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict[str, Any]:
        """This stage's position, for a checkpoint beside its module and optimizer (the
        fallback when a loss cannot be recovered in process): the stage, the completed steps
        and the last step's gradient norms (CheckFree's weights after a restart)."""
        if self.stage is None:
            raise PipelineRecoveryError("a spare holds no stage: it has no position to save")
        values = (self.stage, self.options.num_stages, self.steps_done, list(self.norms))
        return dict(zip(POSITION_KEYS, values, strict=True))

    def validate_state_dict(self, state_dict: Any) -> tuple[int, tuple[float, ...]]:
        """Check a saved position before anything of a restore is loaded (all or nothing);
        returns its (steps_done, norms)."""
        if self.stage is None:
            raise PipelineRecoveryError("a spare holds no stage: it cannot take a position")
        return validate_position(state_dict, self.stage, self.options.num_stages)

    def load_state_dict(self, state_dict: Any) -> None:
        """Resume at a saved position: the next :meth:`step` runs step ``steps_done`` (every
        stage must restore the same one; the checkpoint's commit makes them agree)."""
        self.steps_done, self.norms = self.validate_state_dict(state_dict)
        self.activations = None

    def save(self) -> None:
        """Save this stage (module, optimizer, position) as step ``steps_done`` of its run in
        ``checkpoints``; blocking, committed when it returns. Every stage calls it after the
        same steps; a spare holds no stage and saves nothing."""
        if self.checkpoints is None:
            raise ConfigError("StagePipeline.save needs checkpoints= (a StageCheckpoints)")
        if self.stage is not None:
            state = {"model": self.module, "optimizer": self.optimizer, "pipeline": self}
            self.checkpoints.save(self.stage, self.steps_done, state)

    def resume(self) -> int | None:
        """Every member together (spares too), before the first step of a restarted job:
        every stage goes back to the newest step all stages committed. Returns that step,
        or None when there is none (nothing restored: a fresh start)."""
        return self._roll_back(None)

    def _roll_back(self, upto: int | None) -> int | None:
        """Collective: every stage back to the newest step (<= ``upto``) all committed."""
        if self.checkpoints is None:
            raise ConfigError("StagePipeline.resume needs checkpoints= (a StageCheckpoints)")
        opt = self.optimizer or (self.make_optimizer(self.module) if self.module is not None else None)
        state = {"model": self.module, "optimizer": opt, "pipeline": self} if self.stage is not None else None
        step = self.checkpoints.roll_back(
            self.stage, self.options.num_stages, state, upto, position=lambda: self.steps_done
        )
        if step is not None:
            self.optimizer, self.replica, self.extras = opt, None, {}
            self.activations = None
        return step

    # ------------------------------------------------------------------ recovery
    def _recover(self, why: str) -> None:
        detected_at = time.time()
        t0 = time.perf_counter()
        # Drop the stages' group first: unregistered here, its last references released on a
        # background thread, whose destructor closes its sockets, so that a stage still
        # blocked in a point-to-point op with this process fails now, not at pg_timeout_s.
        group = self._group
        box = [self._schedule, self._swapped, self._pipe, self._ring, group]
        self._schedule = self._swapped = self._pipe = self._ring = self._group = None
        if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
            try:
                dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001, S110 - a broken group is dropped all the same
                pass
        del group
        retire(box)
        self.membership = regroup(
            self.store,
            self.membership,
            timeout_s=self.options.regroup_timeout_s,
            heartbeat=self.heartbeat,
            pg_timeout_s=self.options.pg_timeout_s,
        )
        members = self.membership.members
        lost = [i for i in range(self.options.num_stages) if self.holder[i] not in members]
        spares = [r for r in members if r not in self.holder.values()]
        if len(lost) > len(spares) and len(lost) == 1 and self.options.replacement_timeout_s > 0:
            log.warning("pipeline: stage %s lost and no spare left: waiting for a replacement", lost)
            got = await_replacement(
                self.store,
                self.membership,
                needed=len(lost) - len(spares),
                scan_from=self._scan_from,
                timeout_s=self.options.replacement_timeout_s,
                form_timeout_s=self.options.admit_timeout_s,
                pg_timeout_s=self.options.pg_timeout_s,
                regroup_timeout_s=self.options.regroup_timeout_s,
                heartbeat=self.heartbeat,
            )
            self.membership, self._scan_from = got.membership, got.scan_from
        self._reassign(why, detected_at, t0, time.perf_counter() - t0)

    def _reassign(self, why: str, detected_at: float, t0: float, regroup_s: float) -> None:
        """Every member of the new group, a joiner too: who holds which stage (an all-gather
        of each member's stage, step and joiner scan), the lost stage to the first member
        holding none, the step agreed; then the rebuild and a new stages' group."""
        t1 = time.perf_counter()
        s = self.options.num_stages
        members = self.membership.members
        held = self.stage if self.stage is not None and self.optimizer is not None else -1
        roles = gather_roles(  # several stages lost at once: all roll back, given checkpoints
            self.membership, held, self.steps_done, self._scan_from, self.norms, s,
            many=self.checkpoints is not None,
        )
        holder, step, norms, self._scan_from = roles.holder, roles.step, roles.norms, roles.scan_from
        lost = [i for i in range(s) if i not in holder]
        free = [r for r in members if r not in holder.values()]  # spares and joiners
        replaced = dict(zip(lost, free))
        self.holder = {**holder, **replaced}
        me = self.membership.launch_rank
        rebuilding = [i for i, r in replaced.items() if r == me]
        if rebuilding:
            self.stage = rebuilding[0]
            self.module = self.build_stage(self.stage)
            self.optimizer, self.activations = None, None
            if norms is not None:  # the survivors' norms of the last step, as a stage of its own
                self.norms = norms
        strategy = source = None
        served: list[str] = []
        rolled: int | None = None
        try:
            if len(lost) > 1:  # no strategy rebuilds several stages: every member rolls back
                raise RollbackNeeded(f"stages {lost} were lost at once")
            if lost:
                strategy, source, served = self._rebuild(lost[0], replaced, rebuilding, step, members)
        except RollbackNeeded as e:  # every strategy refused the lost stage(s)
            if self.checkpoints is None:
                raise
            log.warning("pipeline: %s; every stage rolls back to its checkpoints", e)
            rolled = self._roll_back(step)
            if rolled is None:
                raise PipelineRecoveryError(f"{e}, and no step is committed by every stage") from e
            strategy = "checkpoint rollback"
            source = f"step {rolled} of every stage's run under {self.checkpoints.root}"
        self._form()
        self.recoveries.append(
            StageRecovery(
                step=step,
                lost_stages=tuple(lost),
                replaced_by=replaced,
                detected_at=detected_at,
                detected_by=why,
                regroup_s=regroup_s,
                rebuild_s=time.perf_counter() - t1,
                total_s=time.perf_counter() - t0,
                strategy=strategy,
                source=source,
                served=tuple(served),
                rolled_back_to=rolled,
            )
        )

    def _rebuild(
        self, lost_stage: int, replaced: dict[int, int], rebuilding: list[int], step: int, members: Sequence[int]
    ) -> tuple[str | None, str | None, list[str]]:
        """The replacement rebuilds ``lost_stage`` (strategy, source); the others serve it."""
        transport = ProcessGroupTransport(
            group=dist.group.WORLD, timeout_s=self.options.transfer_timeout_s
        )
        if rebuilding:
            assert self.module is not None
            got_back = rebuild_stage(
                transport,
                stage=lost_stage,
                num_stages=self.options.num_stages,
                step=step,
                ranks={i: self._rank(r) for i, r in self.holder.items() if i != lost_stage},
                others=[i for i in range(len(members)) if i != self.membership.rank],
                module=self.module,
                make_optimizer=self.make_optimizer,
                replicate=self.options.replicate,
                template=self._template,
                options=self.options.checkfree,
                timeout_s=self.options.transfer_timeout_s,
                rollback=self.checkpoints is not None,
                fit=fit_plan(self.options, self.batch, step),
            )
            self.optimizer = got_back.value
            self.steps_done = step
            return got_back.strategy, got_back.source.describe(), []
        served = serve_requests(
            transport,
            self._rank(replaced[lost_stage]),
            num_stages=self.options.num_stages,
            stage=self.stage,
            module=self.module,
            step=step,
            norm=self.norms[self.stage] if self.stage is not None else 0.0,
            replica=self.replica,
            extras=self.extras,
            template=self._template,
            timeout_s=self.options.transfer_timeout_s,
            activations=self.activations,
            count=recorded_count(self.options),
        )
        return None, None, served


def _lost_peer(e: BaseException) -> bool:
    """An error a lost or frozen peer causes (a broken collective, a transport's lost peer):
    recovered from. recoverkit's other errors (a refused recovery, bad input) are not."""
    return not isinstance(e, RecoverkitError) or isinstance(e, ConnectionError)
