"""The pre-step guard: a save never reads a tensor after the optimizer modified it.

The guard tracks the snapshots still staging. It installs its wait through a
:class:`~recoverkit.staging.base.StepHooks` (default: :class:`TorchOptimizerHooks`, one
``register_step_pre_hook`` per torch optimizer). Before a target mutates anything, its hook
waits for the lazy copies of exactly the storages that target will mutate, in every snapshot
still staging. Code that mutates state outside a hooked target calls
:meth:`StepGuard.before_update`, which waits for every pending copy. The time spent waiting
is charged to each snapshot's save metrics.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..state.sharded import unwrap
from .base import Removable, StepHooks
from .snapshot import HostSnapshot, storage_id

__all__ = ["StepGuard", "TorchOptimizerHooks", "mutated_storages"]


def mutated_storages(opt: torch.optim.Optimizer) -> set[int]:
    """Storages an optimizer step writes: every parameter and every state tensor."""
    ids = {storage_id(p) for g in opt.param_groups for p in g["params"]}
    for s in opt.state.values():
        for v in s.values():
            if torch.is_tensor(v) and v.numel():
                ids.add(storage_id(v))
    return ids


class TorchOptimizerHooks(StepHooks):
    """The torch optimizers of a state, hooked with ``register_step_pre_hook``."""

    def targets(self, state: Mapping[str, Any]) -> list[Any]:
        return [o for o in (unwrap(v) for v in state.values()) if isinstance(o, torch.optim.Optimizer)]

    def mutated_storages(self, target: Any) -> set[int]:
        return mutated_storages(target)

    def install(self, target: Any, before_step: Callable[[Any], None]) -> Removable:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            before_step(optimizer)

        handle: Removable = target.register_step_pre_hook(hook)
        return handle


class StepGuard:
    """Tracks snapshots still staging and holds the targets' pre-step hooks."""

    def __init__(self, hooks: StepHooks | None = None) -> None:
        self.hooks = hooks or TorchOptimizerHooks()
        self._pending: list[HostSnapshot] = []
        self._lock = threading.Lock()
        self._installed: dict[int, Removable] = {}

    def watch(self, target: Any) -> set[int]:
        """Install the pre-step hook on ``target`` (once); return the storages it mutates."""
        if id(target) not in self._installed:
            ref = weakref.ref(self)

            def before_step(t: Any) -> None:
                guard = ref()
                if guard is not None:
                    guard.wait_for(guard.hooks.mutated_storages(t))

            self._installed[id(target)] = self.hooks.install(target, before_step)
        return self.hooks.mutated_storages(target)

    def add(self, snap: HostSnapshot) -> None:
        with self._lock:
            self._pending.append(snap)

    def discard(self, snap: HostSnapshot) -> None:
        with self._lock:
            if snap in self._pending:
                self._pending.remove(snap)

    def wait_for(self, storages: set[int]) -> None:
        with self._lock:
            pending = list(self._pending)
        for snap in pending:
            if snap.staged():
                continue
            t0 = time.perf_counter()
            snap.wait_storages(storages)
            snap.metrics.waited(time.perf_counter() - t0)

    def before_update(self) -> None:
        """Wait for every pending copy (call before mutating saved tensors by hand)."""
        with self._lock:
            pending = list(self._pending)
        for snap in pending:
            t0 = time.perf_counter()
            snap.wait_all()
            snap.metrics.waited(time.perf_counter() - t0)

    def close(self) -> None:
        for h in self._installed.values():
            h.remove()
        self._installed.clear()
