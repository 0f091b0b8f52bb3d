"""Commit coordination across ranks, with timeouts.

The two-phase commit needs three exchanges per step: the coordinator (rank 0) tells every
rank where to write (``broadcast``), every rank reports its records or its failure
(``gather``), and the coordinator tells every rank the outcome (``broadcast``). They run
over a key-value store (the rendezvous ``torch.distributed`` store, or any ``Store``), not
over collectives: a dead or stuck rank makes a wait fail after ``timeout_s`` with an error
naming the ranks that never answered, and no rank hangs. Payloads are JSON, never pickle.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from datetime import timedelta
from typing import Any

from ..errors import CommitTimeoutError

__all__ = ["Coordinator", "LocalCoordinator", "StoreCoordinator", "default_coordinator"]


class Coordinator(ABC):
    """Exchanges small JSON payloads between ranks of one job.

    Every rank calls the same methods with the same ``key`` in the same order.
    """

    rank: int
    world_size: int

    @abstractmethod
    def gather(self, key: str, payload: dict[str, Any], *, timeout_s: float) -> list[dict[str, Any]] | None:
        """Rank 0 gets every rank's payload (index = rank); other ranks get None.

        Raises CommitTimeoutError on rank 0 naming the ranks missing after ``timeout_s``.
        """

    @abstractmethod
    def broadcast(self, key: str, payload: dict[str, Any] | None, *, timeout_s: float) -> dict[str, Any]:
        """Rank 0 passes ``payload``; every rank returns it."""

    def forget(self, key: str) -> None:
        """Drop what ``key`` stored (best effort; called once a step is settled)."""
        return None


class LocalCoordinator(Coordinator):
    """A world of one process."""

    rank = 0
    world_size = 1

    def gather(self, key: str, payload: dict[str, Any], *, timeout_s: float) -> list[dict[str, Any]]:
        return [payload]

    def broadcast(self, key: str, payload: dict[str, Any] | None, *, timeout_s: float) -> dict[str, Any]:
        assert payload is not None
        return payload


class StoreCoordinator(Coordinator):
    """Coordination over a ``torch.distributed.Store``.

    Example (every rank)::

        coord = StoreCoordinator(store, rank=dist.get_rank(), world_size=dist.get_world_size())
    """

    def __init__(self, store: Any, *, rank: int, world_size: int, prefix: str = "recoverkit") -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.prefix = prefix

    def _k(self, key: str, rank: int | None = None) -> str:
        return f"{self.prefix}/{key}" + ("" if rank is None else f"/{rank}")

    def gather(self, key: str, payload: dict[str, Any], *, timeout_s: float) -> list[dict[str, Any]] | None:
        self.store.set(self._k(key, self.rank), json.dumps(payload))
        if self.rank != 0:
            return None
        keys = [self._k(key, r) for r in range(self.world_size)]
        self._wait(keys, timeout_s, what=f"{key}: waiting for every rank")
        return [json.loads(self.store.get(k)) for k in keys]

    def broadcast(self, key: str, payload: dict[str, Any] | None, *, timeout_s: float) -> dict[str, Any]:
        k = self._k(key)
        if self.rank == 0:
            assert payload is not None
            self.store.set(k, json.dumps(payload))
            return payload
        self._wait([k], timeout_s, what=f"{key}: waiting for rank 0 (the coordinator)")
        return json.loads(self.store.get(k))

    def forget(self, key: str) -> None:
        keys = [self._k(key)] + [self._k(key, r) for r in range(self.world_size)]
        for k in keys:
            try:
                self.store.delete_key(k)
            except Exception:  # noqa: BLE001 - best effort cleanup; a dead store is reported elsewhere
                pass

    def _wait(self, keys: list[str], timeout_s: float, *, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            self.store.wait(keys, timedelta(seconds=timeout_s))
            return
        except Exception as e:  # the store raises RuntimeError/DistStoreError on timeout or a lost peer
            cause: Exception = e
        missing = []
        for k in keys:
            try:
                if not self.store.check([k]):
                    missing.append(int(k.rsplit("/", 1)[1]) if k.rsplit("/", 1)[1].isdigit() else 0)
            except Exception:  # noqa: BLE001 - the store itself is gone (its host died)
                missing.append(0)
        waited = timeout_s - max(0.0, deadline - time.monotonic())
        failures = {r: f"no answer after {waited:.1f} s" for r in sorted(set(missing))} or {
            0: f"store error: {cause}"
        }
        raise CommitTimeoutError(f"{what} timed out", failures=failures) from cause


def default_coordinator() -> Coordinator:
    """A StoreCoordinator on the default process group's store, or a LocalCoordinator."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return LocalCoordinator()
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    return StoreCoordinator(
        distributed_c10d.PrefixStore("recoverkit", store) if hasattr(distributed_c10d, "PrefixStore") else store,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
    )
