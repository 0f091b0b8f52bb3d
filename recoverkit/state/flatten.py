"""Separate the tensors of a captured state from the object tree around them.

Save data flow: capture -> **flatten** -> (tensors to staging, skeleton to the codec).
Restore data flow: reader (tensors by key) + decoded skeleton -> **unflatten** -> apply.

``flatten`` walks dicts, lists and tuples and replaces every tensor by a
:class:`TensorLeaf` placeholder that names it; the tensors come out as a list of
:class:`TensorRef` in traversal order, each under a unique ``"/"``-joined key such as
``model/layers.0.weight`` or ``optimizer/state/0/exp_avg``. A tensor seen a second time
(tied weights: ``model.state_dict()`` lists the same tensor under two names) is reported as
an alias of the first key, so it is written once and comes back as one shared tensor.

Tensors are neither copied nor made contiguous here; the refs point at the live tensors.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import IncompatibleCheckpointError

__all__ = ["TensorLeaf", "TensorRef", "flatten", "unflatten"]


@dataclass(frozen=True)
class TensorLeaf:
    """The placeholder a tensor leaves in the skeleton; ``key`` names it in the checkpoint."""

    key: str


@dataclass
class TensorRef:
    """A tensor taken out of the tree.

    Attributes:
        key: the unique key of this occurrence.
        tensor: the live tensor (not copied).
        alias_of: the key of the earlier occurrence of the same tensor, or None.
    """

    key: str
    tensor: torch.Tensor
    alias_of: str | None = None


def flatten(tree: Any, *, prefix: str = "") -> tuple[Any, list[TensorRef]]:
    """Replace every tensor in ``tree`` by a :class:`TensorLeaf`; return the skeleton and refs.

    Containers walked: ``dict`` (any hashable keys; ``OrderedDict`` and other dict
    subclasses keep their type, and a module state dict keeps its ``_metadata``), ``list``,
    ``tuple`` and namedtuples (which keep their type here; the codec stores them as tuples).
    Anything else, including sets and dict keys, is left as it is. Keys are the path
    segments (``str(dict_key)`` or the list index) joined by ``"/"`` under ``prefix``; when
    two paths give the same string (keys ``1`` and ``"1"``) the later one gets ``#1``,
    ``#2``... appended.

    Args:
        tree: a captured state (nested containers with tensors anywhere).
        prefix: the first path segment of every key (e.g. the state entry's name).

    Returns:
        ``(skeleton, refs)``: the tree with placeholders, and one :class:`TensorRef` per
        tensor occurrence in traversal order (aliases have ``alias_of`` set).

    Example:
        >>> w = torch.ones(2)
        >>> skeleton, refs = flatten({"w": w, "tied": w, "step": 3}, prefix="model")
        >>> skeleton
        {'w': TensorLeaf(key='model/w'), 'tied': TensorLeaf(key='model/tied'), 'step': 3}
        >>> [(r.key, r.alias_of) for r in refs]
        [('model/w', None), ('model/tied', 'model/w')]
    """
    walker = _Flattener()
    skeleton = walker.walk(tree, [prefix] if prefix else [])
    return skeleton, walker.refs


def unflatten(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild a tree from its skeleton, putting ``tensors[leaf.key]`` at every placeholder.

    Aliases come back shared as long as ``tensors`` maps the alias key to the same object
    as the first key (the reader does that); this function only substitutes.

    Raises:
        IncompatibleCheckpointError: a placeholder's key is missing from ``tensors``.

    Example:
        >>> t = torch.zeros(1)
        >>> unflatten({"a": [TensorLeaf("m/a/0")], "n": 1}, {"m/a/0": t})["a"][0] is t
        True
    """
    if isinstance(skeleton, TensorLeaf):
        try:
            return tensors[skeleton.key]
        except KeyError:
            raise IncompatibleCheckpointError(
                f"tensor {skeleton.key!r} is missing from the checkpoint"
            ) from None
    if isinstance(skeleton, dict):
        return _rebuild_dict(skeleton, [(k, unflatten(v, tensors)) for k, v in skeleton.items()])
    if type(skeleton) is list:
        return [unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple):
        return _rebuild_tuple(skeleton, [unflatten(v, tensors) for v in skeleton])
    return skeleton


class _Flattener:
    def __init__(self) -> None:
        self.refs: list[TensorRef] = []
        self._used: set[str] = set()
        self._first: dict[tuple[Any, ...], str] = {}

    def walk(self, node: Any, path: list[str]) -> Any:
        if isinstance(node, torch.Tensor):
            return self._leaf(node, path)
        if isinstance(node, dict):
            return _rebuild_dict(
                node, [(k, self.walk(v, path + [str(k)])) for k, v in node.items()]
            )
        if type(node) is list:
            return [self.walk(v, path + [str(i)]) for i, v in enumerate(node)]
        if isinstance(node, tuple):
            return _rebuild_tuple(node, [self.walk(v, path + [str(i)]) for i, v in enumerate(node)])
        return node

    def _leaf(self, t: torch.Tensor, path: list[str]) -> TensorLeaf:
        key = self._unique("/".join(path))
        ident = _identity(t)
        first = self._first.get(ident)
        if first is None:
            self._first[ident] = key
        self.refs.append(TensorRef(key, t, first))
        return TensorLeaf(key)

    def _unique(self, key: str) -> str:
        candidate, n = key, 0
        while candidate in self._used:
            n += 1
            candidate = f"{key}#{n}"
        self._used.add(candidate)
        return candidate


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensor objects the same tensor: same memory, same view, same type."""
    try:
        ptr = t.untyped_storage().data_ptr() if t.layout == torch.strided else 0
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        ptr = 0
    if ptr == 0 or t.device.type == "meta":  # no memory to compare (empty, meta, sparse)
        return ("object", id(t))
    return ("view", ptr, t.device, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _rebuild_dict(original: dict[Any, Any], items: list[tuple[Any, Any]]) -> dict[Any, Any]:
    if type(original) is dict:
        return dict(items)
    if type(original) is OrderedDict:
        out: dict[Any, Any] = OrderedDict(items)
    else:  # other dict subclasses (defaultdict ...): a shallow copy keeps their settings
        out = copy.copy(original)
        out.clear()
        out.update(items)
    metadata = getattr(original, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]  # nn.Module state-dict versions
    return out


def _rebuild_tuple(original: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    if type(original) is tuple:
        return tuple(items)
    if hasattr(original, "_fields"):  # namedtuple
        return type(original)(*items)
    try:  # torch.Size, structseqs (torch.return_types.*) and other tuple subclasses
        return type(original)(items)
    except Exception:
        return tuple(items)
