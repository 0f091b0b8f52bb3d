"""Read a committed step back into a state tree (tensors on CPU), verifying every byte.

This is the read half of the data flow: manifest -> this rank's object blob -> the tensors
its tree refers to -> ``unflatten``. Every region is read straight into the destination
tensor's memory and checked against its CRC-32C by the engine; nothing is applied to live
objects here (see :func:`recoverkit.state.apply`), so a fault found while reading leaves
the training state untouched.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import IncompatibleCheckpointError
from ..format.manifest import BlobRecord, Manifest, ShardRecord, TensorRecord
from ..state import TensorLeaf, decode, dtype_from_name, to_bytes_view, unflatten
from ..storage.base import Tier

__all__ = ["read_state", "read_tensors", "tensor_leaves"]


def read_state(
    tier: Tier, step: int, manifest: Manifest, *, rank: int = 0, allow_pickle: bool = False
) -> Any:
    """Read rank ``rank``'s whole state tree of ``step`` (tensors materialized on CPU)."""
    blob_rec = manifest.blob_for(rank)
    blob = bytearray(blob_rec.nbytes)
    tier.read(step, [(blob_rec, _address(blob))])
    skeleton = decode(bytes(blob), allow_pickle=allow_pickle)
    keys = sorted(set(tensor_leaves(skeleton)))
    tensors = read_tensors(tier, step, manifest, keys)
    return unflatten(skeleton, tensors)


def read_tensors(tier: Tier, step: int, manifest: Manifest, keys: list[str]) -> dict[str, torch.Tensor]:
    """Materialize the global tensors named by ``keys`` (aliases come back as one object)."""
    out: dict[str, torch.Tensor] = {}
    requests: list[tuple[ShardRecord | BlobRecord, int]] = []
    scatter: list[tuple[torch.Tensor, torch.Tensor, ShardRecord]] = []
    for key in keys:
        base = _resolve(manifest, key)
        if base.key in out:
            out[key] = out[base.key]
            continue
        tensor = torch.empty(base.shape, dtype=dtype_from_name(base.dtype))
        for shard in base.shards:
            if tuple(shard.shape) == tuple(base.shape):
                requests.append((shard, _tensor_address(tensor, shard.nbytes)))
            else:
                part = torch.empty(shard.shape, dtype=tensor.dtype)
                requests.append((shard, _tensor_address(part, shard.nbytes)))
                scatter.append((tensor, part, shard))
        out[base.key] = tensor
        out[key] = tensor
    tier.read(step, requests)
    for tensor, part, shard in scatter:
        region = tensor
        for dim, (o, n) in enumerate(zip(shard.offsets, shard.shape)):
            region = region.narrow(dim, o, n)
        region.copy_(part)
    return out


def tensor_leaves(tree: Any) -> Iterator[str]:
    """Keys of every tensor placeholder in a decoded object tree."""
    if isinstance(tree, TensorLeaf):
        yield tree.key
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from tensor_leaves(k)
            yield from tensor_leaves(v)
    elif isinstance(tree, (list, tuple, set, frozenset)):
        for v in tree:
            yield from tensor_leaves(v)


def _resolve(manifest: Manifest, key: str) -> TensorRecord:
    rec = manifest.tensors.get(key)
    seen = set()
    while rec is not None and rec.alias_of is not None and rec.key not in seen:
        seen.add(rec.key)
        rec = manifest.tensors.get(rec.alias_of)
    if rec is None or rec.alias_of is not None:
        raise IncompatibleCheckpointError(f"step {manifest.step}: tensor {key!r} is not in the manifest")
    covered = sum(s.nbytes for s in rec.shards)
    expected = _numel(rec.shape) * torch.empty((), dtype=dtype_from_name(rec.dtype)).element_size()
    if covered != expected:
        raise IncompatibleCheckpointError(
            f"step {manifest.step}: tensor {key!r} shards hold {covered} bytes, shape "
            f"{list(rec.shape)} of {rec.dtype} needs {expected}"
        )
    return rec


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tensor_address(t: torch.Tensor, nbytes: int) -> int:
    view = to_bytes_view(t)
    if view.numel() != nbytes:
        raise IncompatibleCheckpointError(f"region of {nbytes} bytes does not fit a {view.numel()}-byte tensor")
    return int(view.data_ptr())


def _address(buf: bytearray) -> int:
    if not buf:
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))
