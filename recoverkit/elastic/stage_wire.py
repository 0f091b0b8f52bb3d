"""The bytes a pipeline stage's state travels in between processes, and the recovery messages.

Where it sits: under :mod:`.stage_recovery` (which asks neighbours and replica holders for a
lost stage's state over a :class:`~recoverkit.distributed.transport.PeerTransport`) and
:mod:`.pipeline` (whose per-step replica ring sends every stage's state to the next one).

A state is a flat run of raw tensor bytes laid out by a :data:`Layout` (name, shape, dtype
per entry) that the *receiver* computes from a module it built itself: the sender never
sizes anything, the transport refuses any other length, and :func:`unpack` checks the length
again before it views a byte. Messages are five float64 numbers (kind or status, two stage
indexes, a step, a gradient norm) and are validated field by field: integers in range, the
norm finite and >= 0.

Activations (CheckFree's optional fit, ``CheckFreeOptions.distill_steps``) are the one thing
whose sizes the receiver cannot take from a module it built: a neighbour's recorded inputs
or outputs of the last step. They travel in three parts: a fixed-size float64 header the
receiver allocates from what it knows (:func:`activation_header_buffer`: the micro-batches it
expects, at most :data:`MAX_NDIM` dims each), validated field by field as hostile input
(:func:`activation_layout`: the count, every dim >= 1, a floating dtype from a fixed table,
the micro-batch rows the receiver knows, the total under :data:`MAX_ACTIVATION_BYTES`), then
the receiver's verdict (a :class:`Message`: SERVED, or REFUSED when the header failed, and
then no payload is sent), then the payload, sized from that validated header and laid out
like a state.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import IncompatibleCheckpointError, IntegrityError

__all__ = [
    "DONE",
    "EXTRAS",
    "FAILED",
    "INPUTS",
    "Layout",
    "MAX_ACTIVATION_BYTES",
    "MAX_NDIM",
    "Message",
    "NEIGHBOUR",
    "OUTPUTS",
    "REFUSED",
    "REPLICA",
    "RETRY",
    "ROLLBACK",
    "SERVED",
    "activation_header",
    "activation_header_buffer",
    "activation_layout",
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
# CheckFree's fit: the recorded outputs of the stage before the lost one (the lost stage's
# inputs) and the recorded inputs of the stage after it (the lost stage's outputs)
OUTPUTS, INPUTS = 7, 8
_LAST_KIND = INPUTS
#: the most dims of one recorded activation
MAX_NDIM = 8
#: the most bytes of activations one neighbour may send in one answer (4 GiB)
MAX_ACTIVATION_BYTES = 1 << 32
#: the dtypes activations may travel in, by code
ACTIVATION_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ENTRY = 2 + MAX_NDIM  # dtype code, ndim, MAX_NDIM dims (0 past ndim)
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
        if not (0 <= kind <= _LAST_KIND and -1 <= stage < num_stages and -1 <= lost < num_stages):
            raise IntegrityError(f"{what}: fields out of range in {values}")
        if not (-1 <= step <= _MAX_STEP and norm >= 0):
            raise IntegrityError(f"{what}: step or norm out of range in {values}")
        return cls(int(kind), int(stage), int(lost), int(step), norm)


def activation_header_buffer(count: int) -> torch.Tensor:
    """The receiver's buffer for the header of ``count`` activations (its own expectation)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"activations: a count >= 1 is needed, got {count!r}")
    return torch.zeros(1 + count * _ENTRY, dtype=torch.float64)


def activation_header(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sender's header of ``tensors`` (one per micro-batch): their count, then each one's
    dtype code, ndim and dims. Raises ValueError when one cannot travel (a dtype outside
    :data:`ACTIVATION_DTYPES`, more than :data:`MAX_NDIM` dims, an empty dim, or more than
    :data:`MAX_ACTIVATION_BYTES` in all): the sender refuses instead of sending it.

    Example:
        >>> h = activation_header([torch.zeros(2, 3)])
        >>> activation_layout(h, count=1, rows=[2], what="example")
        (('0', (2, 3), torch.float32),)
    """
    header = activation_header_buffer(len(tensors))
    header[0] = len(tensors)
    total = 0
    for j, t in enumerate(tensors):
        if t.dtype not in ACTIVATION_DTYPES or not 1 <= t.dim() <= MAX_NDIM or t.numel() == 0:
            raise ValueError(
                f"activations: micro-batch {j} is {t.dtype} {tuple(t.shape)}: it cannot travel "
                f"(a dtype of {[str(d) for d in ACTIVATION_DTYPES]}, 1..{MAX_NDIM} non-empty dims)"
            )
        total += t.numel() * t.element_size()
        at = 1 + j * _ENTRY
        header[at] = ACTIVATION_DTYPES.index(t.dtype)
        header[at + 1] = t.dim()
        header[at + 2 : at + 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.float64)
    if total > MAX_ACTIVATION_BYTES:
        raise ValueError(f"activations: {total} bytes, more than MAX_ACTIVATION_BYTES ({MAX_ACTIVATION_BYTES})")
    return header


def activation_layout(
    header: torch.Tensor, *, count: int, rows: Sequence[int] | None, what: str
) -> Layout:
    """Read a received activation header as hostile input; returns the payload's layout
    (entries named ``"0"``, ``"1"``, ...). ``count``: the micro-batches the receiver expects
    (the header must hold exactly that many); ``rows``: each micro-batch's first dim where
    the receiver knows it (its own split of the step's batch), else None. Raises
    IntegrityError naming the field that is wrong.

    Example:
        >>> bad = activation_header([torch.zeros(2, 3)])
        >>> bad[3] = -1.0  # the first dim
        >>> activation_layout(bad, count=1, rows=None, what="stage 1's outputs")
        Traceback (most recent call last):
        ...
        recoverkit.errors.IntegrityError: stage 1's outputs: micro-batch 0's dim 0 is -1.0, not an integer >= 1
    """
    want = 1 + count * _ENTRY
    if header.dtype != torch.float64 or header.dim() != 1 or header.numel() != want:
        raise IntegrityError(
            f"{what}: a header of {header.numel()} {header.dtype} values, {want} float64 expected"
        )
    values = [float(v) for v in header.tolist()]

    def integer(v: float, name: str, low: int, high: float) -> int:
        if not (math.isfinite(v) and v.is_integer() and low <= v <= high):
            raise IntegrityError(f"{what}: {name} is {v!r}, not an integer in [{low}, {high:g}]")
        return int(v)

    n = integer(values[0], "the count", 0, _MAX_INDEX)
    if n != count:
        raise IntegrityError(f"{what}: {n} micro-batches announced, {count} expected")
    if rows is not None and len(rows) != count:
        raise ValueError(f"{what}: {len(rows)} rows given for {count} micro-batches")
    layout = []
    total = 0
    for j in range(count):
        at = 1 + j * _ENTRY
        code = integer(values[at], f"micro-batch {j}'s dtype code", 0, len(ACTIVATION_DTYPES) - 1)
        ndim = integer(values[at + 1], f"micro-batch {j}'s ndim", 1, MAX_NDIM)
        dims = values[at + 2 : at + 2 + MAX_NDIM]
        shape = []
        for d, v in enumerate(dims[:ndim]):
            if not (math.isfinite(v) and v.is_integer() and v >= 1):
                raise IntegrityError(f"{what}: micro-batch {j}'s dim {d} is {v!r}, not an integer >= 1")
            shape.append(int(v))
        if any(v != 0 for v in dims[ndim:]):
            raise IntegrityError(f"{what}: micro-batch {j} has values past its {ndim} dims: {dims[ndim:]}")
        dtype = ACTIVATION_DTYPES[code]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        total += size
        if total > MAX_ACTIVATION_BYTES:
            raise IntegrityError(
                f"{what}: micro-batch {j}'s shape {tuple(shape)} takes the total past "
                f"MAX_ACTIVATION_BYTES ({MAX_ACTIVATION_BYTES})"
            )
        if rows is not None and shape[0] != rows[j]:
            raise IntegrityError(
                f"{what}: micro-batch {j} has {shape[0]} rows, this step's split gives {rows[j]}"
            )
        layout.append((str(j), tuple(shape), dtype))
    return tuple(layout)


def stage_template(
    build: Callable[[int], torch.nn.Module], stage: int, cache: dict[int, torch.nn.Module]
) -> torch.nn.Module:
    """The module ``build(stage)`` makes, built once per process (for layouts only)."""
    if stage not in cache:
        if not 0 <= stage < _MAX_INDEX:
            raise ValueError(f"stage {stage} out of range")
        cache[stage] = build(stage)
    return cache[stage]
