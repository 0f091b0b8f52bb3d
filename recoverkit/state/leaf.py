"""The placeholder a tensor leaves in a state's skeleton (torch-free).

A state is saved as a skeleton (typed JSON, see ``codec``) in which every tensor is replaced
by a :class:`TensorLeaf` naming its key in the checkpoint. This module needs no torch, so the
codec can decode a skeleton, and the CLI's read-only commands can walk one, without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TensorLeaf"]


@dataclass(frozen=True)
class TensorLeaf:
    """The placeholder a tensor leaves in the skeleton; ``key`` names it in the checkpoint.

    ``parameter`` is set when the tensor was an ``nn.Parameter``; ``requires_grad`` is then
    its flag, and :func:`unflatten` wraps the restored tensor the same way.
    """

    key: str
    parameter: bool = field(default=False, repr=False)
    requires_grad: bool = field(default=False, repr=False)

    def __repr__(self) -> str:
        extra = f", parameter=True, requires_grad={self.requires_grad}" if self.parameter else ""
        return f"TensorLeaf(key={self.key!r}{extra})"
