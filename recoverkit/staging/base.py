"""The staging layer's two extension points: step hooks and snapshot tiers.

* :class:`StepHooks`: where the pre-step consistency wait is installed. Whatever mutates
  saved tensors (a torch optimizer, a DeepSpeed or Megatron engine) must wait for the lazy
  copies of the storages it will write before it writes them (invariant 4). One
  implementation per engine; :class:`~recoverkit.staging.guard.TorchOptimizerHooks` is the
  default.

  Call order: ``Checkpointer.save_async`` -> ``targets(state)`` (the objects of the state
  whose step mutates saved tensors) -> per target, once, ``install(target, before_step)``;
  every save: ``mutated_storages(target)`` names the storages copied lazily. Before its step,
  the target's hook calls ``before_step(target)``, which returns once the copies landed.
* :class:`SnapshotTier`: a tier fed from the staged snapshots of ``save_async`` rather than
  through the commit protocol (host memory, shared memory, peer replicas). The drain offers
  each staged save to the snapshot tiers due for its step (the :attr:`SnapshotTier.early`
  ones, which copy what they need, before the disk commits); the pool asks them to give
  memory back when a new save needs room.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..storage.base import ReadableTier

__all__ = ["Removable", "SnapshotTier", "StepHooks"]


class Removable(Protocol):
    """What ``install`` returns: the hook, removable."""

    def remove(self) -> None: ...


class StepHooks(ABC):
    """Installs the pre-step wait on the objects that mutate saved state (one per engine)."""

    @abstractmethod
    def targets(self, state: Mapping[str, Any]) -> list[Any]:
        """The objects in ``state`` (its top-level values) whose step mutates saved tensors."""

    @abstractmethod
    def mutated_storages(self, target: Any) -> set[int]:
        """The storages (:func:`~recoverkit.staging.snapshot.storage_id`) ``target``'s next
        step writes: their copies are the lazy ones, waited for by the hook."""

    @abstractmethod
    def install(self, target: Any, before_step: Callable[[Any], None]) -> Removable:
        """Make ``target`` call ``before_step(target)`` before each step; called once per target."""


class SnapshotTier(ReadableTier):
    """A tier that holds staged snapshots (see the module docstring).

    The drain calls :meth:`offer` once per staged save due for this tier, after the save
    settled on the disk tiers (``offer`` of a failed save: only if some tier committed it);
    an :attr:`early` tier instead right after the save is staged, before the disk commits,
    whatever they do; :meth:`withdraw` when a save it was offered failed on every tier; the
    stager calls :meth:`evict_one` when the pool is full; the Checkpointer calls
    :meth:`close` last, and :meth:`discard` before it when the job ends normally (no
    exception in flight, no preemption signal).
    """

    #: offered each staged save right after staging, before the disk commits (in list
    #: order). Such a tier copies what it needs and never owns the snapshot (``offer``
    #: returns False); a failure of its ``offer`` is logged and counted, never fails the save
    early: bool = False

    @abstractmethod
    def offer(self, snap: Any) -> bool:
        """Take ``snap`` (a :class:`~recoverkit.staging.snapshot.HostSnapshot`) into this tier.
        True when this tier now owns it (and releases it later); False when it only copied
        what it needs, or declined, and the caller still owns it."""

    @abstractmethod
    def withdraw(self, snap: Any) -> None:
        """Stop offering ``snap`` for restore (its save failed); release it if owned."""

    @abstractmethod
    def evict_one(self) -> bool:
        """Release the oldest snapshot held in pool memory, if any; True if one was."""

    @abstractmethod
    def close(self) -> None:
        """Release everything held by this process (what outlives it stays: see discard)."""

    def discard(self) -> None:
        """The job ended normally: delete what this tier keeps beyond the process (shared
        memory a restarted process would have restored from). Default: nothing to delete."""
