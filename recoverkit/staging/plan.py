"""Plan a rank's part of a save: what it writes, under which keys, in which pieces.

capture -> (ShardedTensor leaves noted) -> flatten per entry -> classify each tensor:

* rank-local tensors (world > 1, entries that differ per rank, RNG) are stored under
  ``rank-RRRRR/<key>``; a world of one uses plain keys;
* replicated tensors are written by one owner rank (:func:`~recoverkit.state.sharded.assign_owners`);
* sharded tensors are written by every rank at their global offsets.

Every written region is split along dim 0 into pieces of at most ``piece_bytes`` so a
resharded restore reads (and verifies) only pieces that overlap what it needs. The plan
holds references to the live tensors; staging (sync or lazy) turns them into bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..format.manifest import TensorRecord
from ..gcpause import paused
from ..state import RNGState, capture, dtype_name, encode
from ..state.dtensor import as_sharded, is_dtensor
from ..state.flatten import flatten
from ..state.sharded import (
    ShardedTensor,
    assign_owners,
    ddp_param_ids,
    is_replicated_entry,
    local_prefix,
    unwrap,
)

__all__ = ["RNG_KEY", "PlannedShard", "SavePlan", "plan_save", "split_rows"]

#: Key under which the random states are stored when ``capture_rng`` is on.
RNG_KEY = "__rng__"


@dataclass
class PlannedShard:
    """A region of a (global) tensor that this rank writes, still pointing at live memory."""

    key: str
    source: torch.Tensor  # this region of the live tensor (any device; maybe non-contiguous)
    dtype: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    kind: str  # "local" | "replicated" | "sharded"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def nbytes(self) -> int:
        return self.source.numel() * self.source.element_size()


@dataclass
class SavePlan:
    blob: bytes
    shards: list[PlannedShard] = field(default_factory=list)
    aliases: dict[str, TensorRecord] = field(default_factory=dict)
    #: this rank's part alone restores this rank: no tensor it needs is written by another
    #: rank (a replicated tensor owned elsewhere, a ShardedTensor replica it does not write)
    self_contained: bool = True


def plan_save(
    state: Mapping[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    capture_rng: bool = True,
    allow_pickle: bool = False,
    piece_bytes: int,
) -> SavePlan:
    """Build this rank's :class:`SavePlan` for ``state``.

    The cyclic garbage collector is paused meanwhile: for 100k tensors its generational
    rescans were half of the planning time.

    A tensor that appears twice (tied weights within an entry, or the same tensor under
    two entries, e.g. ``{"a": t, "b": t}``) is planned once; its other keys become
    ``alias_of`` records, so it is written once and restored as one object.
    """
    with paused():
        return _plan(state, rank, world_size, capture_rng, allow_pickle, piece_bytes)


def _plan(
    state: Mapping[str, Any], rank: int, world_size: int, capture_rng: bool, allow_pickle: bool, piece_bytes: int
) -> SavePlan:
    if RNG_KEY in state:
        raise ValueError(f"{RNG_KEY!r} is reserved for the random states")
    entries = dict(state)
    if capture_rng:
        entries[RNG_KEY] = RNGState()
    ddp = ddp_param_ids(list(entries.values())) if world_size > 1 else set()
    skeleton: dict[str, Any] = {}
    plan = SavePlan(blob=b"")
    replicated: list[tuple[str, torch.Tensor]] = []
    prefix = local_prefix(rank)
    # identity -> key of its first occurrence, across entries (flatten sees one entry)
    across: dict[tuple[Any, ...], str] | None = {} if sum(n != RNG_KEY for n in entries) > 1 else None
    for name, obj in entries.items():
        repl = world_size > 1 and name != RNG_KEY and is_replicated_entry(obj, ddp)
        local = world_size > 1 and not repl
        sharded: dict[int, ShardedTensor] = {}
        captured = _note_sharded(capture({name: unwrap(obj)})[name], sharded)
        sub, refs = flatten(captured, prefix=name)
        skeleton[name] = sub
        stored: dict[str, str] = {}  # this entry's first occurrences: flatten key -> stored key
        firsts: dict[str, torch.Tensor] = {}
        track = across is not None and name != RNG_KEY
        for ref in refs:
            t = ref.tensor.detach()
            if ref.alias_of is not None and _same_bits(firsts[ref.alias_of], ref.tensor):
                key = f"{prefix}/{ref.key}" if local else ref.key
                target = stored.get(ref.alias_of, ref.alias_of)
                plan.aliases[key] = TensorRecord(key, dtype_name(t.dtype), tuple(t.shape), alias_of=target)
                continue
            firsts[ref.key] = ref.tensor
            s = sharded.get(id(ref.tensor))
            if s is not None:
                stored[ref.key] = ref.key
                if s.write:
                    plan.shards += split_rows(ref.key, t, s.global_shape, s.offsets, "sharded", piece_bytes)
                else:
                    plan.self_contained = False
                continue
            key = f"{prefix}/{ref.key}" if local else ref.key
            stored[ref.key] = key
            if track:
                assert across is not None
                ident = (repl, *_identity(ref.tensor))
                first = across.setdefault(ident, key)
                if first != key:
                    stored[ref.key] = first  # this entry's own aliases of it point there too
                    plan.aliases[key] = TensorRecord(key, dtype_name(t.dtype), tuple(t.shape), alias_of=first)
                    continue
            if repl:
                replicated.append((key, t))
                continue
            shape = tuple(t.shape)
            if not shape or shape[0] <= 1 or t.numel() * t.element_size() <= piece_bytes:  # one piece
                plan.shards.append(PlannedShard(key, t, dtype_name(t.dtype), shape, (0,) * len(shape), "local"))
            else:
                plan.shards += split_rows(key, t, shape, (0,) * len(shape), "local", piece_bytes)
    owners = assign_owners([(k, t.numel() * t.element_size()) for k, t in replicated], world_size)
    for key, t in replicated:
        if owners[key] == rank:
            plan.shards += split_rows(key, t, tuple(t.shape), (0,) * t.dim(), "replicated", piece_bytes)
        else:
            plan.self_contained = False
    plan.blob = encode(skeleton, allow_pickle=allow_pickle)
    return plan


def split_rows(
    key: str,
    t: torch.Tensor,
    global_shape: tuple[int, ...],
    offsets: tuple[int, ...],
    kind: str,
    piece_bytes: int,
) -> list[PlannedShard]:
    """Split ``t`` (this rank's region at ``offsets``) along dim 0 into bounded pieces.

    Example:
        >>> [p.offsets for p in split_rows("k", torch.zeros(10, 4), (10, 4), (0, 0), "local", 64)]
        [(0, 0), (4, 0), (8, 0)]
    """
    dtype = dtype_name(t.dtype)
    if t.dim() == 0 or t.shape[0] <= 1 or t.numel() * t.element_size() <= piece_bytes:
        return [PlannedShard(key, t, dtype, global_shape, offsets, kind)]
    row_bytes = t[0].numel() * t.element_size()
    if row_bytes == 0:
        return [PlannedShard(key, t, dtype, global_shape, offsets, kind)]
    rows = max(1, piece_bytes // row_bytes)
    return [
        PlannedShard(key, t[a : a + rows], dtype, global_shape, (offsets[0] + a,) + tuple(offsets[1:]), kind)
        for a in range(0, t.shape[0], rows)
    ]


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors of different entries the same tensor: the same view of the
    same memory (a state dict's detached copy of a parameter included), or the same object
    where there is no memory to compare (empty, meta, sparse)."""
    try:
        ptr = t.data_ptr() if t.layout == torch.strided else 0
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        ptr = 0
    if ptr == 0 or t.device.type == "meta":
        return ("object", id(t))
    return ("view", ptr, t.device, t.dtype, tuple(t.shape), t.stride(), t.is_conj(), t.is_neg())


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views of the same memory also read the same values: a lazy conjugate or
    negative view (``t.conj()``) shares everything with ``t`` but its values."""
    return a.is_conj() == b.is_conj() and a.is_neg() == b.is_neg()


_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter, int, float, str, bool, type(None)})


def _note_sharded(tree: Any, found: dict[int, ShardedTensor]) -> Any:
    """Replace ShardedTensor nodes by their local tensors, remembering their placement.

    A container holding none is returned as it is (``torch.Size``, namedtuples and dict
    subclasses keep their type); one that does is rebuilt with its type where possible.
    """
    if type(tree) in _PLAIN:  # the common leaves, without asking whether they are DTensors
        return tree
    if is_dtensor(tree):
        tree = as_sharded(tree)
    if isinstance(tree, ShardedTensor):
        found[id(tree.local)] = tree
        return tree.local
    if isinstance(tree, dict):
        if all(type(v) in _PLAIN for v in tree.values()):  # a state dict of plain tensors
            return tree
        items = [(k, _note_sharded(v, found)) for k, v in tree.items()]
        if all(new is old for (_, new), old in zip(items, tree.values())):
            return tree
        return dict(items) if type(tree) is dict else type(tree)(items)
    if isinstance(tree, (list, tuple)):
        values = [_note_sharded(v, found) for v in tree]
        if all(new is old for new, old in zip(values, tree)):
            return tree
        if isinstance(tree, list) or type(tree) is tuple:
            return values if isinstance(tree, list) else tuple(values)
        if hasattr(tree, "_fields"):  # namedtuple
            return type(tree)(*values)
        try:  # torch.Size, structseqs and other tuple subclasses
            return type(tree)(values)
        except Exception:  # noqa: BLE001 - a subclass that cannot be rebuilt: a plain tuple
            return tuple(values)
    return tree
