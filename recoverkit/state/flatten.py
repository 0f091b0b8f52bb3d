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
This is also where a tensor is classified as storable: sparse, nested, meta and quantized
tensors have no dense bytes of a storable dtype, and are refused here with an
:class:`~recoverkit.errors.EncodeError` that names the tensor's key. An ``nn.Parameter``
leaves a placeholder that remembers it (and its ``requires_grad``), so a Parameter restored
without a live target comes back as a Parameter.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EncodeError, IncompatibleCheckpointError, IntegrityError
from .dtypes import dtype_name
from .leaf import TensorLeaf

__all__ = ["TensorLeaf", "TensorRef", "flatten", "unflatten", "rebuild_container"]


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
    segments (``str(dict_key)`` or the list index) joined by ``"/"`` under ``prefix``; a NUL
    character in a segment is written ``\\x00`` (a manifest refuses one in a tensor key);
    when two paths give the same string (keys ``1`` and ``"1"``) the later one gets ``#1``,
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
    skeleton = walker.walk(tree, prefix or None)
    return skeleton, walker.refs


def unflatten(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild a tree from its skeleton, putting ``tensors[leaf.key]`` at every placeholder.

    Aliases come back shared as long as ``tensors`` maps the alias key to the same object
    as the first key (the reader does that); this function only substitutes. A placeholder
    of a Parameter gets ``nn.Parameter(tensor, requires_grad)`` (one per tensor object, so
    tied Parameters stay tied).

    Raises:
        IncompatibleCheckpointError: a placeholder's key is missing from ``tensors``.
        IntegrityError: a placeholder says "Parameter requiring grad" for a tensor whose
            dtype cannot require grad (a damaged blob).

    Example:
        >>> t = torch.zeros(1)
        >>> unflatten({"a": [TensorLeaf("m/a/0")], "n": 1}, {"m/a/0": t})["a"][0] is t
        True
    """
    return _unflatten(skeleton, tensors, {})


def _unflatten(skeleton: Any, tensors: Mapping[str, torch.Tensor], params: dict[Any, Any]) -> Any:
    if isinstance(skeleton, TensorLeaf):
        try:
            t = tensors[skeleton.key]
        except KeyError:
            raise IncompatibleCheckpointError(
                f"tensor {skeleton.key!r} is missing from the checkpoint"
            ) from None
        if not skeleton.parameter or not isinstance(t, torch.Tensor):
            return t  # a ShardedTensor region stays one; its target decides its type
        ident = (id(t), skeleton.requires_grad)
        if ident not in params:
            if skeleton.requires_grad and not (t.is_floating_point() or t.is_complex()):
                raise IntegrityError(
                    f"tensor {skeleton.key!r} is recorded as a Parameter that requires grad, "
                    f"which a {t.dtype} tensor cannot"
                )
            params[ident] = (t, torch.nn.Parameter(t, requires_grad=skeleton.requires_grad))
        return params[ident][1]
    if isinstance(skeleton, dict):
        return _rebuild_dict(
            skeleton, [(k, _unflatten(v, tensors, params)) for k, v in skeleton.items()]
        )
    if type(skeleton) is list:
        return [_unflatten(v, tensors, params) for v in skeleton]
    if isinstance(skeleton, tuple):
        return _rebuild_tuple(skeleton, [_unflatten(v, tensors, params) for v in skeleton])
    return skeleton


def rebuild_container(original: Any, items: Any) -> Any:
    """A container of ``original``'s type holding ``items`` (pairs for a dict).

    Keeps what a plain ``dict(...)``/``tuple(...)`` would lose: ``OrderedDict`` and other
    dict subclasses (and a state dict's ``_metadata``), namedtuples, ``torch.Size`` and other
    tuple subclasses. Lists and anything else come back as a list.

    Example:
        >>> rebuild_container(torch.Size([2, 3]), [4, 5])
        torch.Size([4, 5])
    """
    if isinstance(original, dict):
        return _rebuild_dict(original, list(items))
    if isinstance(original, tuple):
        return _rebuild_tuple(original, list(items))
    return list(items)


_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter


class _Flattener:
    def __init__(self) -> None:
        self.refs: list[TensorRef] = []
        self._used: set[str] = set()
        self._first: dict[tuple[Any, ...], str] = {}

    def walk(self, node: Any, path: str | None) -> Any:
        """``path``: the key of ``node`` (None for the root of an unprefixed tree)."""
        if isinstance(node, torch.Tensor):
            return self._leaf(node, path or "")
        if isinstance(node, dict):
            at = "" if path is None else f"{path}/"
            return _rebuild_dict(node, [(k, self.walk(v, f"{at}{k}")) for k, v in node.items()])
        if type(node) is list:
            at = "" if path is None else f"{path}/"
            return [self.walk(v, f"{at}{i}") for i, v in enumerate(node)]
        if isinstance(node, tuple):
            at = "" if path is None else f"{path}/"
            return _rebuild_tuple(node, [self.walk(v, f"{at}{i}") for i, v in enumerate(node)])
        return node

    def _leaf(self, t: torch.Tensor, path: str) -> TensorLeaf:
        if "\x00" in path:  # a manifest never names a tensor with a NUL (it may reach native code)
            path = path.replace("\x00", "\\x00")
        key = path if path not in self._used else self._unique(path)
        self._used.add(key)
        _check_storable(t, key)
        ident = _identity(t)
        first = self._first.get(ident)
        if first is None:
            self._first[ident] = key
        self.refs.append(TensorRef(key, t, first))
        kind = type(t)  # Parameter's isinstance check is slow: ask only of tensor subclasses
        if kind is _PARAMETER or (kind is not _TENSOR and isinstance(t, _PARAMETER)):
            return TensorLeaf(key, parameter=True, requires_grad=bool(t.requires_grad))
        return TensorLeaf(key)

    def _unique(self, key: str) -> str:
        candidate, n = key, 0
        while candidate in self._used:
            n += 1
            candidate = f"{key}#{n}"
        self._used.add(candidate)
        return candidate


def _check_storable(t: torch.Tensor, key: str) -> None:
    """Refuse a tensor that has no dense bytes of a storable dtype, naming its key."""
    why = None
    if t.is_nested:
        why = "is a nested tensor; save its components (t.unbind()) or a padded dense tensor"
    elif t.layout != torch.strided:
        why = f"has layout {t.layout} (sparse or opaque); save t.to_dense() or its index/value tensors"
    elif t.device.type == "meta":
        why = "is a meta tensor: it has no data to save (materialize it first)"
    elif t.is_quantized:
        why = f"is quantized ({t.dtype}); save its int representation and quantization parameters"
    if why is None:
        try:
            dtype_name(t.dtype)
        except EncodeError as e:
            why = f"cannot be stored: {e}"
    if why is not None:
        raise EncodeError(f"tensor {key!r} {why}")


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensor objects the same tensor: same memory, same view, same type.

    The address of the first element with the shape, strides, dtype and device is the view;
    tensors without memory to compare (empty, meta, sparse) are themselves.
    """
    try:
        ptr = t.data_ptr() if t.layout == torch.strided and t.numel() else 0
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        ptr = 0
    if ptr == 0 or t.device.type == "meta":
        return ("object", id(t))
    return ("view", ptr, t.device, t.shape, t.stride(), t.dtype)


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
