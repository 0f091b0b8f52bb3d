"""Commit coordination across ranks, with timeouts.

The two-phase commit needs three exchanges per step: the coordinator (rank 0) tells every
rank where to write (``broadcast``), every rank reports its records or its failure
(``gather``), and the coordinator tells every rank the outcome (``broadcast``). They run
over a key-value store (the rendezvous ``torch.distributed`` store, or any ``Store``), not
over collectives: a dead or stuck rank makes a wait fail after ``timeout_s`` with an error
naming the ranks that never answered, and no rank hangs. Payloads are JSON, never pickle.

Namespaces. A store can outlive the processes that use it: torchrun's agent hosts the
rendezvous store its workers share and keeps it, keys included, across worker restarts.
A key name that an earlier attempt also used can then be read before this attempt writes
it, and a rank would act on a dead attempt's answer. So every coordinator made here
(:func:`attempt_coordinator`, :func:`default_coordinator`) lives under a namespace no
earlier user of the store had: an epoch that rank 0 takes from the store with an atomic
``add`` and that every rank agrees on through one collective of this attempt's process
group (whose members are this attempt's live processes by construction). The restart count
torchrun exports is not used for this: it is counted per agent, and differs between
nodes when only one node's workers failed.

Cleanup. Each exchange's keys are dropped once every rank is done with them: each rank
calls :meth:`Coordinator.finish` after its last read of a series of exchanges, and the
last of the ``world_size`` ranks to finish deletes them, so the store holds the keys of the
saves in flight only. A rank that died never finishes: its attempt's keys stay (one save's
worth), under a namespace nothing reads again.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from ..errors import CommitTimeoutError

__all__ = ["Coordinator", "LocalCoordinator", "StoreCoordinator", "attempt_coordinator", "default_coordinator"]

#: the counter, at the root of a store, that hands out the namespaces of :func:`attempt_coordinator`
EPOCH_KEY = "recoverkit/epoch"


class Coordinator(ABC):
    """Exchanges small JSON payloads between ranks of one job.

    Every rank calls the same methods with the same ``key`` in the same order.
    """

    rank: int
    world_size: int
    #: payloads reach rank 0 as the very objects sent (one process): they need not be JSON
    in_process: bool = False

    @abstractmethod
    def gather(self, key: str, payload: dict[str, Any], *, timeout_s: float) -> list[dict[str, Any]] | None:
        """Rank 0 gets every rank's payload (index = rank); other ranks get None.

        Raises CommitTimeoutError on rank 0 naming the ranks missing after ``timeout_s``.
        """

    @abstractmethod
    def broadcast(self, key: str, payload: dict[str, Any] | None, *, timeout_s: float) -> dict[str, Any]:
        """Rank 0 passes ``payload``; every rank returns it."""

    def finish(self, scope: str, *, gathers: Sequence[str] = (), broadcasts: Sequence[str] = ()) -> None:
        """This rank is done with the exchanges ``f"{scope}/{name}"`` named here.

        Every rank calls it once per ``scope``, after its last read there (also when an
        exchange failed); the last rank to call it drops their keys. Best effort: a store
        that is gone is reported by the next exchange.
        """
        return None


class LocalCoordinator(Coordinator):
    """A world of one process."""

    rank = 0
    world_size = 1
    in_process = True

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

    def finish(self, scope: str, *, gathers: Sequence[str] = (), broadcasts: Sequence[str] = ()) -> None:
        counter = self._k(f"{scope}/finished")
        try:
            if int(self.store.add(counter, 1)) < self.world_size:
                return  # another rank may still read; the last one cleans up
            keys = [self._k(f"{scope}/{g}", r) for g in gathers for r in range(self.world_size)]
            keys += [self._k(f"{scope}/{b}") for b in broadcasts] + [counter]
            for k in keys:
                self.store.delete_key(k)
        except Exception:  # noqa: BLE001 - best effort cleanup; a dead store is reported by the next exchange
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


def attempt_coordinator(store: Any, *, timeout_s: float, group: Any = None) -> StoreCoordinator:
    """A StoreCoordinator under a namespace of ``store`` that no earlier attempt used.

    Every rank of ``group`` (default: the default process group) calls it at the same point.
    Rank 0 takes the next epoch from ``store`` with an atomic ``add`` (a store that persists
    across restarts never gives the same one twice); one all-reduce over ``group`` gives it
    to every rank, and the coordinator's keys live under ``recoverkit/<epoch>/``.

    Raises:
        CommitTimeoutError: if the ranks did not all take part within ``timeout_s``.

    Example (every rank, after ``init_process_group``)::

        coord = attempt_coordinator(dist.distributed_c10d._get_default_store(), timeout_s=60)
    """
    import torch.distributed as dist

    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    mine = int(store.add(EPOCH_KEY, 1)) if rank == 0 else 0
    epoch = _all_max(mine, group, timeout_s)
    if epoch <= 0:
        raise CommitTimeoutError(f"rank 0 gave no coordination epoch (got {epoch})", failures={0: "no epoch"})
    return StoreCoordinator(_prefixed(store, f"recoverkit/{epoch}"), rank=rank, world_size=world_size)


def default_coordinator(*, timeout_s: float = 60.0) -> Coordinator:
    """A fresh :func:`attempt_coordinator` on the default process group's store, or a LocalCoordinator.

    Every rank calls it at the same point (the Checkpointer does, in its constructor).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return LocalCoordinator()
    from torch.distributed import distributed_c10d

    return attempt_coordinator(distributed_c10d._get_default_store(), timeout_s=timeout_s)


def _prefixed(store: Any, prefix: str) -> Any:
    from torch.distributed import PrefixStore

    return PrefixStore(prefix, store)


def _all_max(value: int, group: Any, timeout_s: float) -> int:
    """The largest ``value`` over ``group``'s ranks, waiting at most ``timeout_s``."""
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    device = torch.device("cpu")
    if "gloo" not in backend and "mpi" not in backend and torch.cuda.is_available():  # nccl and friends
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.int64, device=device)
    try:
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group, async_op=True)
        if work.wait(timedelta(seconds=timeout_s)) is False:
            raise TimeoutError(f"no result after {timeout_s:.1f} s")
    except Exception as e:  # gloo raises RuntimeError on a timeout or a lost peer
        raise CommitTimeoutError(
            f"agreeing on a coordination namespace: not every rank took part within {timeout_s:.1f} s ({e})",
        ) from e
    return int(t.item())
