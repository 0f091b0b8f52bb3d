"""The pre-step guard: a save never reads a tensor after the optimizer modified it.

Each optimizer in a saved state gets one ``register_step_pre_hook``. Before the optimizer
mutates anything, the hook waits for the lazy copies of exactly the storages that optimizer
will mutate (its parameters and its state tensors), in every snapshot still staging. Code
that mutates state outside an optimizer calls :meth:`StepGuard.before_update`, which waits
for every pending copy. The time spent waiting is measured and charged to the snapshot.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import torch

from .snapshot import HostSnapshot, storage_id

__all__ = ["StepGuard", "mutated_storages"]


def mutated_storages(opt: torch.optim.Optimizer) -> set[int]:
    """Storages an optimizer step writes: every parameter and every state tensor."""
    ids = {storage_id(p) for g in opt.param_groups for p in g["params"]}
    for s in opt.state.values():
        for v in s.values():
            if torch.is_tensor(v) and v.numel():
                ids.add(storage_id(v))
    return ids


class StepGuard:
    """Tracks snapshots still staging and holds optimizers' pre-step hooks."""

    def __init__(self) -> None:
        self._pending: list[HostSnapshot] = []
        self._lock = threading.Lock()
        self._hooks: dict[int, Any] = {}

    def watch(self, opt: torch.optim.Optimizer) -> None:
        """Install the pre-step hook on ``opt`` (once)."""
        if id(opt) in self._hooks:
            return
        ref = weakref.ref(self)

        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            guard = ref()
            if guard is not None:
                guard.wait_for(mutated_storages(optimizer))

        self._hooks[id(opt)] = opt.register_step_pre_hook(hook)

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
            snap.charge_wait(time.perf_counter() - t0)

    def before_update(self) -> None:
        """Wait for every pending copy (call before mutating saved tensors by hand)."""
        with self._lock:
            pending = list(self._pending)
        for snap in pending:
            t0 = time.perf_counter()
            snap.wait_all()
            snap.charge_wait(time.perf_counter() - t0)

    def close(self) -> None:
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()
