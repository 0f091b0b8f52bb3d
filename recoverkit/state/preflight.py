"""Dry runs of ``load_state_dict`` for optimizers and LR schedulers, on scratch copies.

Restore data flow: reader -> unflatten -> **check** (``stateful.check`` calls these) ->
apply. Restore is all or nothing (invariant 6), so everything that can make a live
object's ``load_state_dict`` fail must be found before the first live object changes.
Types and shapes catch most of it; what they cannot see (a parameter group that is not a
dict, per-parameter state an optimizer's ``__setstate__`` cannot read, a scheduler mode
``ReduceLROnPlateau`` refuses, an ``lr_lambdas`` list of the wrong length ...) is found by
running torch's own ``load_state_dict`` on a scratch copy:

* optimizers: torch's elementwise optimizers (Adam, AdamW, SGD, ...) first get every state
  tensor of more than one element checked against its parameter's shape (torch's
  ``load_state_dict`` takes any shape, and a moment of the wrong one fails only at the next
  ``step``, after the restore changed everything); then
  a new object of the same class sharing nothing mutable with the live one,
  whose parameters are empty stand-ins of the same dtype and device; the saved state's
  tensors are replaced by one-element views of themselves, so the dry run costs no memory
  and no copies, yet runs every cast and check torch runs. Load hooks (user code
  with side effects) are not run. Optimizers that override ``load_state_dict`` (e.g. ones
  that talk to other ranks) are only checked by type.
* schedulers of ``torch.optim.lr_scheduler``: a deep copy that shares the optimizer and
  every other live object of the state.
"""

from __future__ import annotations

import copy
import types
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any

import torch

from ..errors import IncompatibleCheckpointError

__all__ = ["check_optimizer_load", "check_scheduler_load"]

_SCHEDULER_MODULE = "torch.optim.lr_scheduler"


def check_optimizer_load(name: str, opt: torch.optim.Optimizer, value: Mapping[str, Any]) -> None:
    """Raise :class:`IncompatibleCheckpointError` if ``opt.load_state_dict(value)`` would fail.

    ``value`` already passed the structural check (groups and parameter counts).
    """
    for i, (saved, live) in enumerate(zip(value["param_groups"], opt.param_groups)):
        for key, current in live.items():
            if key != "params" and key in saved and not _same_kind(current, saved[key]):
                raise IncompatibleCheckpointError(
                    f"{name!r}: parameter group {i} option {key!r} is {_what(saved[key])}, "
                    f"the optimizer holds {_what(current)}"
                )
    for pid, st in value["state"].items():
        if not isinstance(st, Mapping):
            raise IncompatibleCheckpointError(
                f"{name!r}: the state of parameter {pid!r} is {_what(st)}, not a dict"
            )
    _check_state_shapes(name, opt, value)
    if type(opt).load_state_dict is not torch.optim.Optimizer.load_state_dict:
        return
    scratch = object.__new__(type(opt))
    scratch.__dict__.update(opt.__dict__)
    scratch.defaults = dict(opt.defaults)
    scratch.state = defaultdict(dict)
    scratch.param_groups = [
        {**g, "params": [_stand_in(p) for p in g["params"]]} for g in opt.param_groups
    ]
    scratch._optimizer_load_state_dict_pre_hooks = OrderedDict()
    scratch._optimizer_load_state_dict_post_hooks = OrderedDict()
    shadow = {**value, "state": {k: _shadow(v) for k, v in value["state"].items()}}
    try:
        scratch.load_state_dict(shadow)
    except Exception as e:  # whatever torch (or the optimizer class) raises
        raise IncompatibleCheckpointError(
            f"{name!r}: the saved optimizer state cannot be loaded into {type(opt).__name__} "
            f"({type(e).__name__}: {_line(e)})"
        ) from None


#: torch optimizers whose per-parameter state tensors are the parameter's shape (or scalars)
_ELEMENTWISE = tuple(
    cls
    for cls in (getattr(torch.optim, n, None) for n in (
        "Adadelta", "Adagrad", "Adam", "Adamax", "AdamW", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop", "SGD",
    ))
    if isinstance(cls, type)
)  # fmt: skip


def _check_state_shapes(name: str, opt: torch.optim.Optimizer, value: Mapping[str, Any]) -> None:
    """For torch's elementwise optimizers (exactly those classes): every saved state tensor
    of more than one element has its parameter's shape (saved ids map to the live
    parameters by position in the groups, as torch maps them).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2, 3))
        >>> opt = torch.optim.AdamW([p])
        >>> sd = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(6),
        ...       "exp_avg_sq": torch.zeros(2, 3)}}, "param_groups": [{**opt.defaults, "params": [0]}]}
        >>> _check_state_shapes("optim", opt, sd)
        Traceback (most recent call last):
        ...
        recoverkit.errors.IncompatibleCheckpointError: 'optim': saved state 'exp_avg' of parameter 0 is [6], the parameter [2, 3]
    """
    if type(opt) not in _ELEMENTWISE:
        return
    live_of: dict[Any, torch.Tensor] = {}
    for saved, group in zip(value["param_groups"], opt.param_groups):
        ids = saved.get("params") if isinstance(saved, Mapping) else None
        if isinstance(ids, list):
            live_of.update((i, p) for i, p in zip(ids, group["params"]) if type(i) is int)
    for pid, st in value["state"].items():
        param = live_of.get(pid) if type(pid) is int else None
        if not isinstance(param, torch.Tensor):
            continue
        for key, v in st.items():
            if isinstance(v, torch.Tensor) and v.numel() > 1 and tuple(v.shape) != tuple(param.shape):
                raise IncompatibleCheckpointError(
                    f"{name!r}: saved state {key!r} of parameter {pid!r} is {list(v.shape)}, "
                    f"the parameter {list(param.shape)}"
                )


def check_scheduler_load(name: str, sched: Any, value: Any, live: Iterable[Any] = ()) -> None:
    """Raise :class:`IncompatibleCheckpointError` if ``sched.load_state_dict(value)`` would fail.

    Applies to torch's own LR schedulers; ``live`` lists the objects a scratch copy must
    share instead of copying (the state's other entries).
    """
    load = getattr(type(sched), "load_state_dict", None)
    if load is None or getattr(load, "__module__", None) != _SCHEDULER_MODULE:
        return
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise IncompatibleCheckpointError(
            f"{name!r}: a scheduler needs a dict with string keys, the checkpoint holds {_what(value)}"
        )
    current = sched.state_dict()
    for key, now in current.items():
        if (
            key in value
            and key not in ("lr_lambdas", "_schedulers")
            and not _same_kind(now, value[key])
        ):
            raise IncompatibleCheckpointError(
                f"{name!r}: scheduler field {key!r} is {_what(value[key])}, the scheduler holds {_what(now)}"
            )
    _check_lambdas(name, sched, value)
    subs = getattr(sched, "_schedulers", None)  # SequentialLR, ChainedScheduler
    if "_schedulers" in value and isinstance(subs, list):
        saved = value["_schedulers"]
        if not isinstance(saved, list) or len(saved) != len(subs):
            raise IncompatibleCheckpointError(
                f"{name!r}: saved _schedulers {_what(saved)} do not match the scheduler's {len(subs)}"
            )
        for i, (sub, st) in enumerate(zip(subs, saved)):
            check_scheduler_load(f"{name}._schedulers[{i}]", sub, st, live)
    shared = (*live, getattr(sched, "optimizer", None))
    memo = {id(o): o for o in shared if o is not None and o is not sched}
    try:
        scratch = copy.deepcopy(sched, memo)
    except Exception:  # a scheduler that cannot be copied is checked by type only
        return
    try:
        scratch.load_state_dict(dict(value))
    except Exception as e:
        raise IncompatibleCheckpointError(
            f"{name!r}: the saved scheduler state cannot be loaded into {type(sched).__name__} "
            f"({type(e).__name__}: {_line(e)})"
        ) from None


def _check_lambdas(name: str, sched: Any, value: Mapping[str, Any]) -> None:
    """LambdaLR-style ``lr_lambdas``: one entry per live lambda, a dict only for objects.

    Checked here rather than in the dry run: a dict for a plain function would set
    attributes on the live function (functions are shared, not copied).
    """
    lambdas = getattr(sched, "lr_lambdas", None)
    if "lr_lambdas" not in value or not isinstance(lambdas, list):
        return
    saved = value["lr_lambdas"]
    if not isinstance(saved, list) or len(saved) != len(lambdas):
        raise IncompatibleCheckpointError(
            f"{name!r}: saved lr_lambdas {_what(saved)} do not match the scheduler's {len(lambdas)}"
        )
    for i, (fn, st) in enumerate(zip(lambdas, saved)):
        plain = isinstance(fn, types.FunctionType)
        if not (st is None or (isinstance(st, dict) and not plain)):
            raise IncompatibleCheckpointError(
                f"{name!r}: saved lr_lambdas[{i}] is {_what(st)}, the scheduler holds a "
                f"{'function' if plain else type(fn).__name__}"
            )


def _stand_in(p: Any) -> Any:
    """An empty tensor with ``p``'s dtype and device: what the optimizer casts state to."""
    if not isinstance(p, torch.Tensor):
        return p
    return torch.empty(0, dtype=p.dtype, device=p.device)


def _shadow(v: Any) -> Any:
    """``v`` with every tensor of more than one element replaced by a one-element view of
    it (a cast of that runs the same kernel, and fails the same way, as the whole)."""
    if isinstance(v, torch.Tensor):
        if v.numel() <= 1:
            return v
        if type(v) in (torch.Tensor, torch.nn.Parameter):
            return v.detach()[(0,) * v.dim()].reshape(1)
        return torch.empty(0, dtype=v.dtype, device=v.device)  # DTensor and other subclasses
    if isinstance(v, dict):
        return {k: _shadow(x) for k, x in v.items()}
    if type(v) is list or type(v) is tuple:
        return type(v)(_shadow(x) for x in v)
    return v


def _same_kind(live: Any, saved: Any) -> bool:
    """Whether ``saved`` can stand where ``live`` is (numbers, flags, sequences)."""
    if live is None or saved is None:
        return True
    if isinstance(live, bool):
        return isinstance(saved, bool)
    if isinstance(live, Real) or (isinstance(live, torch.Tensor) and live.numel() == 1):
        return (isinstance(saved, Real) and not isinstance(saved, bool)) or (
            isinstance(saved, torch.Tensor) and saved.numel() == 1
        )
    if isinstance(live, (list, tuple)):
        numbers = bool(live) and all(isinstance(x, Real) for x in live)
        return isinstance(saved, (list, tuple)) and (len(saved) == len(live) or not numbers)
    if isinstance(live, str):
        return isinstance(saved, str)
    return True


def _what(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of {len(x)}"
    text = repr(x) if isinstance(x, (bool, int, float, str)) or x is None else type(x).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 160 else text[:157] + "..."
