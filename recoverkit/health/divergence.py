"""Silent divergence of data-parallel replicas: state every rank should hold identically,
compared by fingerprint.

Where it sits: a failure signal, like the loss guard. In a data-parallel job every rank holds
the same parameters, buffers and optimizer state; a bit flipped in one rank's memory, a
non-deterministic kernel or a missed all-reduce makes one replica drift silently, and a
checkpoint written by its owner rank then carries the drift to every rank on restore. Every
``every_steps`` steps (after the optimizer step), :meth:`ReplicaCheck.check` fingerprints each
replicated tensor on every rank and compares them::

    every rank   names of the replicated tensors (model parameters and buffers, optimizer
                 state; DTensors and recoverkit ShardedTensors are sharded, not replicated:
                 skipped) -> one CRC-32C of the sorted names; per tensor a 64-bit fingerprint
                 (CRC-32C of its bytes, dtype and shape on the CPU; an exact integer sum of its
                 words on a GPU, so nothing is copied to the host)
    all_gather   [count, names CRC] then the fingerprints: fixed-size int64 tensors, nothing
                 unpickled (a peer's bytes are data, never code)
    every rank   the same verdict: names whose fingerprint differs between ranks, with the
                 ranks that differ from the majority; logged as a warning naming the tensors

The check never changes the state and never stops training: what to do about a divergence
(roll back, re-broadcast from a healthy rank, stop) is the caller's decision. Every wait is
bounded by ``timeout_s``.

Example (one process: nothing to compare, no divergence)::

    >>> import torch
    >>> check = ReplicaCheck(every_steps=10)
    >>> check.check(10, {"model": torch.nn.Linear(2, 2)})
    []
    >>> check.check(11, {"model": torch.nn.Linear(2, 2)}) is None  # not due
    True
"""

from __future__ import annotations

import fnmatch
import logging
import struct
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ..format.checksum import crc32c

__all__ = ["Divergence", "ReplicaCheck", "fingerprint"]

log = logging.getLogger("recoverkit")

#: the most tensors one check compares (the gathered tensor is sized by a peer's count)
MAX_TENSORS = 1 << 22


@dataclass(frozen=True)
class Divergence:
    """One tensor whose replicas differ: ``ranks`` hold a fingerprint other than the
    majority's (ties: other than the lowest rank's)."""

    name: str
    ranks: tuple[int, ...]


def fingerprint(t: torch.Tensor) -> int:
    """A 64-bit fingerprint of a tensor's dtype, shape and bytes (equal tensors, equal
    fingerprints; one flipped bit always changes it).

    CPU tensors: CRC-32C of the bytes and of the dtype and shape. Other devices: an exact
    integer sum of the 32-bit (or 8-bit) words, computed on the device, so a GPU check copies
    8 bytes per tensor to the host.
    """
    t = t.detach()
    head = crc32c(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel() == 0:
        return head
    if t.device.type == "cpu":
        from ..format.dtypes import to_bytes_view

        return (head << 32) | crc32c(to_bytes_view(t.contiguous()).numpy())
    flat = t.contiguous().view(-1).view(torch.uint8)
    words = flat.view(torch.int32) if flat.numel() % 4 == 0 else flat
    total = int(words.sum(dtype=torch.int64).item()) & 0xFFFFFFFF
    return (head << 32) | total


def _is_sharded(t: Any) -> bool:
    return type(t).__name__ in {"DTensor", "ShardedTensor"}


def _replicated(state: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every replicated tensor in ``state``, in a stable order."""
    for key in sorted(state):
        obj = state[key]
        if isinstance(obj, torch.nn.Module):
            for name, t in obj.state_dict(keep_vars=True).items():
                if isinstance(t, torch.Tensor) and not _is_sharded(t):
                    yield f"{key}/{name}", t
        elif isinstance(obj, torch.optim.Optimizer):
            for idx, per in sorted(obj.state_dict()["state"].items(), key=lambda kv: str(kv[0])):
                for name, t in sorted(per.items()):
                    if isinstance(t, torch.Tensor) and not _is_sharded(t):
                        yield f"{key}/state/{idx}/{name}", t
        elif isinstance(obj, torch.Tensor) and not _is_sharded(obj):
            yield key, obj


class ReplicaCheck:
    """Compares the replicated state of a data-parallel job across ranks, every N steps.

    Args:
        every_steps: check when ``step % every_steps == 0``.
        group: the data-parallel process group (default: the default group; none
            initialized: one rank, nothing to compare).
        timeout_s: bound on each exchange.
        exclude: fnmatch patterns of names not compared. Default: BatchNorm's running
            statistics, which DDP re-broadcasts at the start of each forward and each rank
            then updates from its own batch, so they legitimately differ between forwards.

    ``check(step, state)`` with the same mapping the Checkpointer saves (modules, optimizers,
    tensors) returns None when not due, else the divergences (empty: every replica agrees),
    the same list on every rank. Every rank of the group must call it at the same steps.
    """

    def __init__(
        self, *, every_steps: int = 100, group: Any = None, timeout_s: float = 60.0,
        exclude: tuple[str, ...] = ("*.running_mean", "*.running_var"),
    ) -> None:
        if isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1:
            raise ValueError(f"every_steps must be a positive int, got {every_steps!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.every_steps, self.group, self.timeout_s = every_steps, group, timeout_s
        self.exclude = tuple(exclude)
        #: checks done and divergences found so far
        self.checks = 0
        self.found = 0

    def check(self, step: int, state: Mapping[str, Any]) -> list[Divergence] | None:
        if step % self.every_steps:
            return None
        items = [(n, t) for n, t in _replicated(state) if not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)]
        names = [n for n, _ in items]
        prints = [fingerprint(t) for _, t in items]
        self.checks += 1
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return []
        world = dist.get_world_size(self.group)
        names_crc = crc32c("\n".join(names).encode())
        heads = self._gather(torch.tensor([len(names), names_crc], dtype=torch.int64), world)
        counts = {int(h[0]) for h in heads}
        if any(not 0 <= c <= MAX_TENSORS for c in counts):
            raise ValueError(f"step {step}: a rank reported {sorted(counts)} replicated tensors (at most {MAX_TENSORS})")
        if len(counts) != 1 or len({int(h[1]) for h in heads}) != 1:
            odd = self._minority([(int(h[0]), int(h[1])) for h in heads])
            out = [Divergence("(the set of replicated tensors)", odd)]
            self._report(step, out)
            return out
        # signed view of the unsigned 64-bit fingerprints, for an int64 tensor
        mine = torch.tensor([struct.unpack("<q", struct.pack("<Q", p))[0] for p in prints], dtype=torch.int64)
        rows = self._gather(mine, world)
        out = []
        for i, name in enumerate(names):
            column = [int(r[i]) for r in rows]
            if len(set(column)) > 1:
                out.append(Divergence(name, self._minority(column)))
        self._report(step, out)
        return out

    def _gather(self, t: torch.Tensor, world: int) -> list[torch.Tensor]:
        import torch.distributed as dist

        bufs = [torch.empty_like(t) for _ in range(world)]
        work = dist.all_gather(bufs, t, group=self.group, async_op=True)
        if work is not None and not work.wait(timeout=timedelta(seconds=self.timeout_s)):
            raise TimeoutError(f"replica check: the fingerprint exchange took over {self.timeout_s} s")
        return bufs

    @staticmethod
    def _minority(column: list[Any]) -> tuple[int, ...]:
        """Ranks whose value differs from the most common one (ties: the lowest rank's)."""
        counts = Counter(column)
        top = max(counts.values())
        majority = next(v for v in column if counts[v] == top)
        return tuple(r for r, v in enumerate(column) if v != majority)

    def _report(self, step: int, out: list[Divergence]) -> None:
        if not out:
            return
        self.found += len(out)
        shown = ", ".join(f"{d.name} (ranks {list(d.ranks)})" for d in out[:10])
        more = f" and {len(out) - 10} more" if len(out) > 10 else ""
        log.warning(
            "recoverkit: step %d: data-parallel replicas diverged: %d tensor(s) differ between ranks: %s%s",
            step, len(out), shown, more,
        )
