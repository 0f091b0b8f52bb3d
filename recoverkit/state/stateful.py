"""Capture the state of live training objects, and apply a restored state back to them.

Save data flow: **capture** (live objects -> plain trees of tensors and values) -> flatten
-> staging. Restore data flow: reader -> unflatten -> **check** (does every part fit?) ->
**apply** (change the live objects). ``apply`` runs every check before it changes anything,
so an incompatible checkpoint leaves the model, optimizer and everything else untouched
(invariant 6, restore is all or nothing).

A *state* is a mapping from entry names to objects: anything :class:`Stateful` (a module,
an optimizer, a scheduler, :class:`~recoverkit.state.rng.RNGState`, a
:class:`~recoverkit.state.sampler.ResumableSampler` ...), a tensor (restored in place), or a
plain value such as a step counter (replaced in the mapping).

Objects may add an optional ``validate_state_dict(sd)`` method that raises
:class:`~recoverkit.errors.IncompatibleCheckpointError` when ``sd`` does not fit; ``check``
calls it, so such objects join the all-or-nothing guarantee. Modules, optimizers, torch's LR
schedulers and tensors are checked here without it (optimizers and schedulers by a dry run
of their ``load_state_dict`` on a scratch copy, see :mod:`~recoverkit.state.preflight`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import IncompatibleCheckpointError
from .preflight import check_optimizer_load, check_scheduler_load

__all__ = ["Stateful", "is_stateful", "capture", "check", "apply"]


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict(sd)``, like modules and optimizers."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


def is_stateful(obj: Any) -> bool:
    """``isinstance(obj, Stateful)`` without the protocol machinery's cost (a plain tensor,
    the common entry of a large state, is answered at once)."""
    if isinstance(obj, torch.Tensor):
        return False
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def capture(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state of every entry: ``state_dict()`` of Stateful ones, the value of the rest.

    Tensors are not copied: the result refers to live memory, which is what a lazy save
    wants (the staging engine copies it before the next optimizer step changes it).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> sorted(capture({"model": model, "step": 5})["model"]), capture({"step": 5})["step"]
        (['bias', 'weight'], 5)
    """
    return {
        name: obj.state_dict() if is_stateful(obj) else obj for name, obj in state.items()
    }


def check(state: Mapping[str, Any], captured: Mapping[str, Any]) -> None:
    """Raise if ``captured`` does not fit ``state``; change nothing.

    Checks: the entry names match; a module gets exactly its own keys with the same tensor
    shapes and dtypes; an optimizer gets the same number of parameter groups with the same
    number of parameters each, options of the same kinds, and state its ``load_state_dict``
    accepts (dry run); a torch LR scheduler gets a state its ``load_state_dict`` accepts
    (dry run); a tensor gets a tensor of its shape and dtype; objects with a
    ``validate_state_dict`` method approve their part.

    Raises:
        IncompatibleCheckpointError: naming every missing or extra entry, or the first
            entry that does not fit and why.

    Example:
        >>> check({"w": torch.zeros(2)}, {"w": torch.ones(3)})
        Traceback (most recent call last):
        ...
        recoverkit.errors.IncompatibleCheckpointError: 'w': saved tensor [3] torch.float32 does not fit the target [2] torch.float32
    """
    _check_keys("the checkpoint", set(state), set(captured))
    for name, target in state.items():
        value = captured[name]
        if isinstance(target, torch.nn.Module):
            _check_module(name, target, value)
        elif isinstance(target, torch.optim.Optimizer):
            _check_optimizer(name, target, value)
            check_optimizer_load(name, target, value)
        elif isinstance(target, torch.Tensor):
            _check_tensor(repr(name), target, value)
        else:
            check_scheduler_load(name, target, value, live=state.values())
        validate = getattr(target, "validate_state_dict", None)
        if callable(validate):
            validate(value)


def apply(
    state: MutableMapping[str, Any], captured: Mapping[str, Any], *, before_load: Callable[[], None] | None = None
) -> None:
    """Load ``captured`` into the objects of ``state`` after :func:`check` passed.

    Stateful objects get ``load_state_dict`` (modules with ``strict=True``); tensors are
    overwritten in place with ``copy_`` (parameters included); other values are replaced
    in ``state``. ``before_load`` runs once every check passed, before the first object
    changes (restore copies bytes straight into live tensors there).

    Raises:
        IncompatibleCheckpointError: from :func:`check`; nothing was changed.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> saved = capture({"model": model, "step": 3})
        >>> state = {"model": torch.nn.Linear(2, 1), "step": 0}
        >>> apply(state, saved)
        >>> state["step"], torch.equal(state["model"].weight, model.weight)
        (3, True)
    """
    check(state, captured)
    if before_load is not None:
        before_load()
    for name, target in list(state.items()):
        value = captured[name]
        if isinstance(target, torch.nn.Module):
            target.load_state_dict(value, strict=True)
        elif is_stateful(target):
            target.load_state_dict(value)
        elif isinstance(target, torch.Tensor):
            with torch.no_grad():
                target.copy_(value)
        else:
            state[name] = value


def _check_keys(where: str, expected: set[Any], found: set[Any]) -> None:
    missing, extra = sorted(map(str, expected - found)), sorted(map(str, found - expected))
    if missing or extra:
        parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else ""]
        raise IncompatibleCheckpointError(
            f"{where} does not match the target: " + "; ".join(p for p in parts if p)
        )


def _check_tensor(where: str, target: torch.Tensor, value: Any) -> None:
    if not isinstance(value, torch.Tensor):
        raise IncompatibleCheckpointError(
            f"{where}: the target is a tensor, the checkpoint holds {type(value).__name__}"
        )
    if value.shape != target.shape or value.dtype != target.dtype:
        raise IncompatibleCheckpointError(
            f"{where}: saved tensor {list(value.shape)} {value.dtype} does not fit the target "
            f"{list(target.shape)} {target.dtype}"
        )


def _check_module(name: str, module: torch.nn.Module, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise IncompatibleCheckpointError(
            f"{name!r}: a module needs a state dict, the checkpoint holds {type(value).__name__}"
        )
    expected = module.state_dict()
    _check_keys(f"{name!r} (module {type(module).__name__})", set(expected), set(value))
    for key, current in expected.items():
        if isinstance(current, torch.Tensor):
            _check_tensor(f"{name!r}[{key!r}]", current, value[key])


def _check_optimizer(name: str, opt: torch.optim.Optimizer, value: Any) -> None:
    if (
        not isinstance(value, Mapping)
        or not isinstance(value.get("param_groups"), list)
        or not isinstance(value.get("state"), Mapping)
    ):
        raise IncompatibleCheckpointError(
            f"{name!r}: an optimizer needs a dict with 'state' and 'param_groups'"
        )
    saved, live = value["param_groups"], opt.param_groups
    if len(saved) != len(live):
        raise IncompatibleCheckpointError(
            f"{name!r}: saved {len(saved)} parameter groups, the optimizer has {len(live)}"
        )
    for i, (s, g) in enumerate(zip(saved, live)):
        params = s.get("params") if isinstance(s, dict) else None
        if not isinstance(params, list) or not all(type(p) is int for p in params):
            raise IncompatibleCheckpointError(
                f"{name!r}: saved parameter group {i} is not a dict with a list of parameter ids"
            )
        if len(params) != len(g["params"]):
            raise IncompatibleCheckpointError(
                f"{name!r}: parameter group {i} has {len(params)} saved parameters, the optimizer has {len(g['params'])}"
            )
    ids = [p for s in saved for p in s["params"]]
    if len(set(ids)) != len(ids):
        raise IncompatibleCheckpointError(
            f"{name!r}: a parameter id appears twice in the saved groups"
        )
    known = set(ids)
    unknown = [k for k in value["state"] if type(k) is not int or k not in known]
    if unknown:
        shown = ", ".join(repr(k)[:40] for k in unknown[:5])
        raise IncompatibleCheckpointError(
            f"{name!r}: state for parameters [{shown}] not in any saved group"
        )
