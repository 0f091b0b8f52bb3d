"""The bytes a pipeline stage's state travels in between processes, and the recovery messages.

Where it sits: under :mod:`.stage_recovery` (which asks neighbours and replica holders for a
lost stage's state over a :class:`~recoverkit.distributed.transport.PeerTransport`) and
:mod:`.pipeline` (whose per-step replica ring sends every stage's state to the next one).

A state is a flat run of raw tensor bytes laid out by a :data:`Layout` (name, shape, dtype
per entry) that the *receiver* computes from a module it built itself: the sender never
sizes anything, the transport refuses any other length, and :func:`unpack` checks the length
again before it views a byte. Messages are four float64 numbers (kind or status, two stage
indexes, a step, a gradient norm) and are validated field by field: integers in range, the
norm finite and >= 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..errors import IncompatibleCheckpointError, IntegrityError

__all__ = [
    "DONE",
    "EXTRAS",
    "FAILED",
    "Layout",
    "Message",
    "NEIGHBOUR",
    "REFUSED",
    "REPLICA",
    "RETRY",
    "ROLLBACK",
    "SERVED",
    "edge_layout",
    "layout_of",
    "shared_layout",
    "nbytes",
    "optimizer_entries",
    "optimizer_layout",
    "pack",
    "unpack",
]

#: (name, shape, dtype) per entry, in order
Layout = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

# request kinds (replacement -> survivor) and reply statuses (survivor -> replacement)
DONE, NEIGHBOUR, REPLICA, EXTRAS, FAILED = 0, 1, 2, 3, 4  # FAILED: the rebuild gave up
ROLLBACK = 5  # every strategy refused and the job has stage checkpoints: every stage rolls back
RETRY = 6  # a peer was lost during the rebuild: every member starts the recovery over
SERVED, REFUSED = 1, 0
_MAX_INDEX = 2**31
_MAX_STEP = 2**52


def layout_of(tensors: Mapping[str, torch.Tensor]) -> Layout:
    """The layout of ``tensors`` in their order."""
    return tuple((k, tuple(t.shape), t.dtype) for k, t in tensors.items())


def shared_layout(lost: torch.nn.Module, peer: torch.nn.Module) -> Layout:
    """The lost stage's entries that ``peer`` (a neighbour or swap partner) also holds, in the
    lost stage's order and with its shapes (the receiver's, built by itself)."""
    theirs = peer.state_dict()
    return tuple(e for e in layout_of(lost.state_dict()) if e[0] in theirs)


def edge_layout(edge: torch.nn.Module, partner: torch.nn.Module) -> Layout:
    """The entries an edge stage holds and its swap partner does not (embedding, head)."""
    theirs = partner.state_dict()
    return tuple(e for e in layout_of(edge.state_dict()) if e[0] not in theirs)


def nbytes(layout: Layout) -> int:
    """Bytes a state with ``layout`` takes."""
    return sum(
        math.prod(shape) * torch.empty((), dtype=dt).element_size() for _, shape, dt in layout
    )


def pack(tensors: Mapping[str, torch.Tensor], layout: Layout) -> torch.Tensor:
    """``tensors`` laid out by ``layout`` as one uint8 tensor (every entry must fit exactly)."""
    parts = []
    for name, shape, dtype in layout:
        t = tensors.get(name)
        if t is None:
            raise IncompatibleCheckpointError(f"stage state: no {name!r} to send")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise IncompatibleCheckpointError(
                f"stage state: {name!r} is {t.dtype} {tuple(t.shape)}, the receiver expects "
                f"{dtype} {shape}"
            )
        parts.append(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def unpack(buf: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors of ``buf`` (uint8, exactly :func:`nbytes` long), each a new tensor."""
    want = nbytes(layout)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != want:
        raise IntegrityError(
            f"stage state: {buf.numel()} bytes of {buf.dtype} arrived, the layout takes {want}"
        )
    out, offset = {}, 0
    for name, shape, dtype in layout:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out[name] = buf[offset : offset + size].clone().view(dtype).reshape(shape)
        offset += size
    return out


def optimizer_entries(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as named tensors (``opt.<index>.<key>``), and
    each group's base learning rate (``lr.<group>``: its ``initial_lr``, else its rate), so
    an exact copy keeps a rate a CheckFree rebuild scaled."""
    state = optimizer.state_dict()["state"]
    out = {}
    for i, group in enumerate(optimizer.param_groups):
        out[f"lr.{i}"] = torch.tensor(float(group.get("initial_lr", group["lr"])), dtype=torch.float64)
    for index in sorted(state):
        for key in sorted(state[index]):
            value = state[index][key]
            if not isinstance(value, torch.Tensor):
                raise IncompatibleCheckpointError(
                    f"optimizer state {index}.{key} is a {type(value).__name__}, not a tensor: "
                    "it cannot travel as a stage replica"
                )
            out[f"opt.{index}.{key}"] = value
    return out


def optimizer_layout(
    module: torch.nn.Module, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
) -> Layout:
    """The layout of the optimizer state ``make_optimizer`` keeps for ``module`` once it has
    stepped (found by one step on a copy with zero gradients; ``module`` is untouched)."""
    twin = copy.deepcopy(module)
    opt = make_optimizer(twin)
    for p in twin.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return layout_of(optimizer_entries(opt))


def load_optimizer_entries(
    optimizer: torch.optim.Optimizer, entries: Mapping[str, torch.Tensor]
) -> None:
    """Load state from :func:`optimizer_entries` into ``optimizer`` (its other hyperparameters
    kept; each group's base learning rate set, as received, checked finite and > 0)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    rates: dict[int, float] = {}
    for name, value in entries.items():
        if name.startswith("lr."):
            rate = float(value.item())
            if not (math.isfinite(rate) and rate > 0):
                raise IntegrityError(f"stage state: learning rate {name!r} is {rate}")
            rates[int(name[3:])] = rate
            continue
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for i, rate in rates.items():
        if not 0 <= i < len(optimizer.param_groups):
            raise IntegrityError(f"stage state: a learning rate for group {i} of {len(optimizer.param_groups)}")
        optimizer.param_groups[i]["initial_lr"] = optimizer.param_groups[i]["lr"] = rate


@dataclass(frozen=True)
class Message:
    """A request or reply: ``kind`` (request) or status (reply), the stage asked (``stage``),
    the stage being rebuilt (``lost``), the step, and a gradient norm (replies)."""

    kind: int
    stage: int
    lost: int
    step: int
    norm: float = 0.0

    def encode(self) -> torch.Tensor:
        return torch.tensor(
            [self.kind, self.stage, self.lost, self.step, self.norm], dtype=torch.float64
        )

    @staticmethod
    def buffer() -> torch.Tensor:
        return torch.zeros(5, dtype=torch.float64)

    @classmethod
    def decode(cls, t: torch.Tensor, *, num_stages: int, what: str) -> Message:
        """Parse a received message as hostile input."""
        values = [float(v) for v in t.tolist()]
        if len(values) != 5 or not all(math.isfinite(v) for v in values):
            raise IntegrityError(f"{what}: malformed message {values}")
        kind, stage, lost, step, norm = values
        ints = (kind, stage, lost, step)
        if not all(v.is_integer() for v in ints):
            raise IntegrityError(f"{what}: non-integer fields in {values}")
        if not (0 <= kind <= RETRY and -1 <= stage < num_stages and -1 <= lost < num_stages):
            raise IntegrityError(f"{what}: fields out of range in {values}")
        if not (-1 <= step <= _MAX_STEP and norm >= 0):
            raise IntegrityError(f"{what}: step or norm out of range in {values}")
        return cls(int(kind), int(stage), int(lost), int(step), norm)


def stage_template(
    build: Callable[[int], torch.nn.Module], stage: int, cache: dict[int, torch.nn.Module]
) -> torch.nn.Module:
    """The module ``build(stage)`` makes, built once per process (for layouts only)."""
    if stage not in cache:
        if not 0 <= stage < _MAX_INDEX:
            raise ValueError(f"stage {stage} out of range")
        cache[stage] = build(stage)
    return cache[stage]
