"""After a regroup, rebuild a sharded model (FSDP2) on the new world and restore it from memory.

Where it sits: :class:`~recoverkit.elastic.trainer.ElasticTrainer` calls
:meth:`Reshard.recover` on every survivor right after
:func:`~recoverkit.distributed.regroup.regroup` formed the new default group, in place of
:func:`~recoverkit.elastic.reconcile.reconcile` (which copies a *replicated* state from a
rank ahead). A sharded model's lost shards exist nowhere but in the per-step snapshots: the
lost rank's own snapshot died with its node, its peer replica lives on another node's
shared memory. So the survivors build everything anew on the new world and restore the
newest step complete in memory, resharded to the new world.

The flow (every survivor, the same calls in the same order)::

    old Checkpointer.abandon(close_timeout_s)   pending saves settle, the replication stops,
                                                every snapshot and replica stays in shared
                                                memory; a close stuck on the lost rank is
                                                left behind (logged), the run lock released
    build(membership) -> Rebuilt                the user's callback: the model sharded on the
                                                new default group (fully_shard), its
                                                optimizer, a new Checkpointer over the same
                                                root and tiers (collective: every survivor)
    checkpointer.restore({model, optimizer, ..., trainer})
                                                the memory restore (recovery/memory): the
                                                newest step every rank of the old world has
                                                in a live place (own shared memory, a peer
                                                replica), each new rank fetching only the
                                                saved pieces overlapping its new shards by a
                                                plan of disjoint point-to-point transfers
                                                spread over the holders, every region
                                                CRC-checked on arrival, agreed before applied;
                                                the trainer's position (sampler, steps_done)
                                                comes from the same snapshot
    all-gather (ok, steps_done, step)           every survivor restored the same step, or
                                                every survivor raises RegroupError
                                                (reason "restore"): the restart path, which
                                                restores from the same memory (the new
                                                Checkpointer is abandoned too, nothing of
                                                shared memory deleted)

The same path serves a replicated model whose optimizer state is partitioned over the ranks
(:class:`~recoverkit.elastic.zero.ZeroOptimizer`: its slices of Adam's moments are
ShardedTensors, repartitioned by the same restore).

The trainer then adopts the new model and optimizer and redoes every step after the
snapshot with the new assignment (the global batch and its gradient scale kept). Nothing of
the old model is reused: its DTensors are bound to the broken group.

The step side of an FSDP2 model (its reduction in the backward pass, collectives that a
heartbeat cuts short) is :mod:`.sharded`'s :func:`~recoverkit.elastic.sharded.fsdp_wrap`,
the trainer's ``wrap=``; the trainer watches every micro-batch of a sharded model as a
collective (the forward's all-gathers): a failure in any of them is a loss.

Example::

    def build(membership):
        model = fsdp_model()                     # fully_shard on the current default group
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        return Rebuilt(model, opt, Checkpointer(root, options=opts))

    first = build(membership)
    reshard = Reshard(build, first)
    trainer = ElasticTrainer(first.model, first.optimizer, sampler, loss_fn, store=store,
                             membership=membership, seed=0, heartbeat=hb,
                             wrap=fsdp_wrap("global", abort=verdict), rebuild=reshard)
    while sampler.epoch < epochs:
        trainer.step()
        reshard.save(trainer)                    # save_async of model, optimizer, position
    reshard.close()                              # also what earlier worlds left in memory
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..distributed.global_grad import wait_collective
from ..distributed.regroup import Membership
from ..errors import RecoverkitError, RegroupError
from ..state.sharded import ShardedTensor
from .reconcile import Reconciled
from .waits import lost_peer

if TYPE_CHECKING:
    from ..checkpointer import Checkpointer
    from ..staging.handle import SaveHandle

__all__ = ["Rebuilt", "Reshard", "Resharded"]

log = logging.getLogger("recoverkit")


@dataclass
class Rebuilt:
    """What the user's ``build(membership)`` returns: everything bound to the current group.

    Attributes:
        model: the sharded model (``fully_shard`` applied on the current default group), or
            a replicated plain module whose optimizer partitions its state
            (:class:`~recoverkit.elastic.zero.ZeroOptimizer`, ZeRO-1).
        optimizer: its optimizer (built on the current default group too).
        checkpointer: a Checkpointer over the job's root with the job's tiers (shared memory
            every step, peer replicas): built collectively on the current group.
        extra: other Stateful entries saved and restored with them (an LR scheduler).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    checkpointer: Checkpointer
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Resharded(Reconciled):
    """What :meth:`Reshard.recover` did on this rank (a :class:`Reconciled`: the trainer's
    :class:`~recoverkit.elastic.trainer.Recovery` keeps it as its ``reconcile``).

    Attributes:
        steps_done: completed steps of the snapshot restored (the trainer's new position).
        nbytes: bytes of this rank's restored model and optimizer state (its new shards).
        seconds: the whole recovery here (close, build, restore, agreement).
        step: the checkpoint step restored.
        close_s, build_s, restore_s: the split.
        closed: the old Checkpointer closed within ``close_timeout_s``.
        where: the restore's own account (which rank's snapshot came from where).
    """

    step: int = -1
    close_s: float = 0.0
    build_s: float = 0.0
    restore_s: float = 0.0
    closed: bool = True
    where: str = ""


class Reshard:
    """The trainer's ``rebuild=``: a sharded model rebuilt on each new world and restored
    from the in-memory snapshots (module doc).

    Args:
        build: ``build(membership) -> Rebuilt``: called by every survivor after each
            re-forming, on the new default group (model, optimizer, Checkpointer anew).
        first: what ``build`` returned at launch (its Checkpointer is the one saving now).
        close_timeout_s: bound on closing the old Checkpointer (:meth:`Checkpointer.abandon`):
            keep it well below the new group's timeout (``ElasticOptions.pg_timeout_s``),
            since the survivors that closed sooner wait for the others in the new group's
            first collective (the new Checkpointer's). A replication thread that was
            exchanging with a peer when the group broke ends only at its transport's
            timeout: it is left behind (its replicas stay; nothing of it is needed).
        timeout_s: bound on the closing agreement's collective.
        trainer_key: the state entry that holds the trainer's position.
    """

    def __init__(
        self,
        build: Callable[[Membership], Rebuilt],
        first: Rebuilt,
        *,
        close_timeout_s: float = 3.0,
        timeout_s: float = 60.0,
        trainer_key: str = "trainer",
    ) -> None:
        if not callable(build):
            raise TypeError("Reshard: build must be callable: build(membership) -> Rebuilt")
        self.build = build
        self.current = first
        #: the Checkpointers of earlier worlds, abandoned (their snapshots kept until :meth:`close`)
        self.abandoned: list[Checkpointer] = []
        self.close_timeout_s = close_timeout_s
        self.timeout_s = timeout_s
        self.trainer_key = trainer_key

    @property
    def checkpointer(self) -> Checkpointer:
        """The Checkpointer of the current world."""
        return self.current.checkpointer

    def state(self, trainer: Any) -> dict[str, Any]:
        """What is saved and restored: model, optimizer, the extras and the trainer's position."""
        if trainer.model is not self.current.model or trainer.optimizer is not self.current.optimizer:
            raise ValueError("Reshard: the trainer does not train the model and optimizer built last")
        return {"model": self.current.model, "optimizer": self.current.optimizer, **self.current.extra, self.trainer_key: trainer}

    def save(self, trainer: Any) -> SaveHandle:
        """``save_async`` of :meth:`state` as step ``trainer.steps_done`` (call after each step)."""
        return self.checkpointer.save_async(trainer.steps_done, self.state(trainer))

    def close(self) -> None:
        """End of the job (every rank, together): the current Checkpointer's close (its
        snapshots deleted, as a normal close does), then what the abandoned ones of earlier
        worlds left in this node's shared memory: this process's own snapshots under a rank
        number the current world no longer has (a shrink renumbers the ranks; a number the
        current world has is its owner's now, deleted by that owner's close)."""
        from ..staging.shm_tier import ShmTier

        self.checkpointer.close()
        world = self.checkpointer.world_size
        for old in self.abandoned:
            for t in old.tiers.values():
                if isinstance(t, ShmTier) and t.rank >= world:
                    t.slots.clear()
                    t.store.remove_if_empty()
        self.abandoned.clear()

    def recover(self, trainer: Any, membership: Membership) -> Resharded:
        """Every survivor, after the regroup: close, build, restore, agree (module doc); the
        trainer takes the new model and optimizer and the restored position.

        Raises:
            RegroupError: ``reason="restore"`` on every survivor alike when the build or the
                restore failed on any of them (no step complete in memory across the old
                world, nothing on disk either): fall back to the restart path.
            RuntimeError, TimeoutError: the outcome all-gather failed (a second peer lost);
                the new Checkpointer, if built, is abandoned (its memory kept), so the
                trainer may re-form and call this again (the old one is not closed twice).
        """
        start = time.monotonic()
        old = self.current
        if any(c is old.checkpointer for c in self.abandoned):  # a recovery retried after a second loss
            closed = True
        else:
            closed = old.checkpointer.abandon(self.close_timeout_s)
            self.abandoned.append(old.checkpointer)
        closed_at = time.monotonic()
        error: BaseException | None = None
        rebuilt: Rebuilt | None = None
        step = -1
        where: list[str] = []
        built_at = restored_at = closed_at
        try:
            rebuilt = self.build(membership)
            built_at = time.monotonic()
            state = {"model": rebuilt.model, "optimizer": rebuilt.optimizer, **rebuilt.extra, self.trainer_key: trainer}
            with _restore_log(where):
                step = int(rebuilt.checkpointer.restore(state))
            restored_at = time.monotonic()
        except Exception as e:  # noqa: BLE001 - every survivor learns of it below, then raises alike
            error = e
        try:
            rows = _gather([0 if error is None else 1, trainer.steps_done, step], self.timeout_s)
        except BaseException:  # a second peer lost: the trainer may re-form and recover again
            if rebuilt is not None:  # keep its memory, release its lock for the next build
                rebuilt.checkpointer.abandon(self.close_timeout_s)
                self.abandoned.append(rebuilt.checkpointer)
            raise
        failed = [r for r, row in enumerate(rows) if row[0]]
        if failed or len({(row[1], row[2]) for row in rows}) != 1:
            if rebuilt is not None:  # the restart path restores from the memory it holds: keep it
                rebuilt.checkpointer.abandon(self.close_timeout_s)
                self.abandoned.append(rebuilt.checkpointer)
            here = "" if error is None else f" (here: {type(error).__name__}: {str(error)[:300]})"
            raise RegroupError(
                f"reshard: the survivors could not restore one step from memory at world {membership.world_size}: "
                + (f"rank(s) {failed} failed" if failed else f"(steps_done, step) differ: {[tuple(r[1:]) for r in rows]}")
                + here,
                reason="restore",
            ) from error
        assert rebuilt is not None
        self.current = rebuilt
        trainer.model, trainer.optimizer = rebuilt.model, rebuilt.optimizer
        nbytes = _local_bytes(rebuilt.model.state_dict()) + _local_bytes(rebuilt.optimizer.state_dict()["state"])
        done = Resharded(
            steps_done=trainer.steps_done, nbytes=nbytes, seconds=time.monotonic() - start, step=step,
            close_s=closed_at - start, build_s=built_at - closed_at, restore_s=restored_at - built_at,
            closed=closed, where=" | ".join(where),
        )  # fmt: skip
        log.warning(
            "elastic: rebuilt the sharded model at world %d and restored step %d from memory (%d bytes here) "
            "in %.3f s (close %.3f s%s, build %.3f s, restore %.3f s)",
            membership.world_size, step, nbytes, done.seconds, done.close_s, "" if closed else " left behind",
            done.build_s, done.restore_s,
        )  # fmt: skip
        return done


def _gather(values: list[int], timeout_s: float) -> list[list[int]]:
    mine = torch.tensor(values, dtype=torch.int64)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    try:
        wait_collective(dist.all_gather(out, mine, async_op=True), "reshard: the outcome all-gather", timeout_s=timeout_s)
    except RecoverkitError:  # given up: the timeout
        raise
    except RuntimeError as e:  # the backend's error: a peer's reset, the group's timeout
        raise lost_peer("reshard: the outcome all-gather", e) from e
    return [[int(v) for v in t.tolist()] for t in out]


def _local_bytes(tree: Any) -> int:
    """Bytes of the tensors in ``tree`` held here (a DTensor's local shard)."""
    if isinstance(tree, Mapping):
        return sum(_local_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_local_bytes(v) for v in tree)
    if isinstance(tree, ShardedTensor):  # an explicitly sharded partition (ZeroOptimizer's)
        return int(tree.local.numel() * tree.local.element_size())
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        return int(local.numel() * local.element_size())
    return 0


@contextmanager
def _restore_log(into: list[str]) -> Iterator[None]:
    """Collects the memory restore's account of where each old rank's snapshot came from."""
    logger = logging.getLogger("recoverkit")

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("recoverkit: rank") and "restore" in message:
                into.append(message)

    handler = _Keep(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
