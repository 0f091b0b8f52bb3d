"""CheckFree: rebuild a lost pipeline stage from its two neighbours, with no checkpoint.

Where it sits: the recovery strategy of last resort for pipeline-parallel training. When every
copy of a stage is gone (its data-parallel replicas, its snapshots, its peer replicas), the
exact strategies of a :class:`~recoverkit.recovery.chain.RecoveryChain` refuse, and
:class:`CheckFreeRecovery` rebuilds the stage approximately ("All is Not Lost: LLM Recovery
without Checkpoints", Blagoev, Ersoy, Chen, 2025). The pure rule lives here; the pipeline
runtime that moves the neighbours' weights (``recoverkit.elastic.pipeline``) and the
convergence benchmark use it.

The flow:

1. every step, after the gradient all-reduce, each stage clips its gradient per stage and
   records the clipped gradient's L2 norm ``n_k`` (:func:`clip_and_record`); the value of the
   last completed step is the one recovery uses (two scalars per stage, sent to the neighbours);
2. interior stage ``i`` lost: ``W_i = (a*W_{i+1} + b*W_{i-1}) / (a + b)`` key by key
   (:func:`average_neighbours`), with ``a = n_{i+1}**p + eps`` and ``b = n_{i-1}**p + eps``.
   This is the authors' released code (``alpha = abs(norm[i+1]) + 0.0001`` weighting stage
   ``i+1``, ``beta = abs(norm[i-1]) + 0.0001`` weighting stage ``i-1``, p = 1): eps is added
   after the exponent, outside it, so ``p`` only changes how sharply the norms weigh;
   ``p = 2`` is the variant of a published summary; ``uniform`` is the plain average;
3. the rebuilt stage gets a fresh optimizer (zero moments, step count restarted) whose
   learning rate is ``lr_scale`` times the base rate, kept for that stage
   (:func:`fresh_optimizer`); the neighbours are untouched;
4. CheckFree+ (edge stages, opt-in): the first stage and its partner (the second), and the
   last stage and its partner (the one before), swap their execution order on odd
   micro-batches, so a lost edge stage copies its partner (:func:`swap_partner`,
   :func:`copy_partner`); the (de)embedding layers come from a replica on the partner's host.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, IncompatibleCheckpointError, RecoverkitError
from .base import CannotRecover, Loss, Recovered, RecoveryStrategy, Survivors, T, Use
from .checkfree_fit import MAX_DISTILL_STEPS, Distilled, distill_stage

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from ..format.manifest import Manifest
    from ..state.sharded import ShardedTensor

__all__ = [
    "CheckFreeOptions",
    "CheckFreeRecovery",
    "CheckFreeSource",
    "NeighbourState",
    "average_neighbours",
    "clip_and_record",
    "copy_partner",
    "distill_stage",
    "Distilled",
    "fresh_optimizer",
    "neighbour_weights",
    "swap_partner",
]

log = logging.getLogger("recoverkit.recovery")



@dataclass(frozen=True, kw_only=True)
class CheckFreeOptions:
    """How a lost stage is rebuilt.

    Attributes:
        exponent: ``p`` in ``a = n_next**p + eps``: 1 as in the authors' code, 2 as in a
            published summary of the paper.
        uniform: weigh both neighbours 0.5 / 0.5 whatever their gradient norms.
        eps: added to each weight after the exponent (1e-4 in the authors' code), so two zero
            norms still give the plain average; ``0`` needs at least one non-zero norm.
        lr_scale: the rebuilt stage's learning rate is this times the base rate (1.1 in the
            paper, 1.2 for its 500M model), kept for that stage.
        max_grad_norm: the per-stage clipping bound whose clipped norm is recorded (1.0).
        plus: CheckFree+: a lost first or last stage copies its swap partner (the execution
            order of each edge stage and its partner is swapped on odd micro-batches).
        distill_steps: after the average, this many full-batch Adam steps fit the rebuilt
            interior stage to the lost stage's input -> output pairs of the last completed
            step, which its neighbours still hold (the previous stage sent the inputs, the next
            one received the outputs; :func:`distill_stage`). 0 (the default) is the paper's
            rule; the authors' released code fits a copied or re-initialised stage this way in
            its ablations (8 steps). Costs one forward and backward of the stage over the
            step's micro-batches per step, and the neighbours keep one step's activations.

    Example:
        >>> CheckFreeOptions(exponent=2.0).exponent
        2.0
        >>> CheckFreeOptions(eps=-1.0)
        Traceback (most recent call last):
        ...
        recoverkit.errors.ConfigError: CheckFreeOptions.eps must be a finite number >= 0, got -1.0
    """

    exponent: float = 1.0
    uniform: bool = False
    eps: float = 1e-4
    lr_scale: float = 1.1
    max_grad_norm: float = 1.0
    plus: bool = False
    distill_steps: int = 0

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"CheckFreeOptions.{name} must be a number, got {value!r}")
            return float(value)

        for name in ("uniform", "plus"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"CheckFreeOptions.{name} must be True or False, got {getattr(self, name)!r}"
                )
        if not (math.isfinite(number("exponent")) and 0 < self.exponent <= 16):
            raise ConfigError(
                f"CheckFreeOptions.exponent must be in (0, 16], got {self.exponent!r}"
            )
        if not (math.isfinite(number("eps")) and self.eps >= 0):
            raise ConfigError(
                f"CheckFreeOptions.eps must be a finite number >= 0, got {self.eps!r}"
            )
        if not (math.isfinite(number("lr_scale")) and 0 < self.lr_scale <= 100):
            raise ConfigError(
                f"CheckFreeOptions.lr_scale must be in (0, 100], got {self.lr_scale!r}"
            )
        if (isinstance(self.distill_steps, bool) or not isinstance(self.distill_steps, int)
                or not 0 <= self.distill_steps <= MAX_DISTILL_STEPS):
            raise ConfigError(
                f"CheckFreeOptions.distill_steps must be an int in [0, {MAX_DISTILL_STEPS}], "
                f"got {self.distill_steps!r}"
            )
        if not (number("max_grad_norm") > 0):  # inf allowed: record without clipping
            raise ConfigError(
                f"CheckFreeOptions.max_grad_norm must be > 0 (inf: no clipping), got {self.max_grad_norm!r}"
            )


def neighbour_weights(
    n_prev: float, n_next: float, options: CheckFreeOptions = CheckFreeOptions()
) -> tuple[float, float]:
    """``(b, a)``: the weights of the previous and the next stage (not normalized).

    ``a = n_next**p + eps`` weighs the next stage, ``b = n_prev**p + eps`` the previous one;
    ``uniform`` gives ``(1.0, 1.0)``. Norms must be finite and >= 0.

    Example:
        >>> neighbour_weights(1.0, 3.0)
        (1.0001, 3.0001)
        >>> neighbour_weights(1.0, 3.0, CheckFreeOptions(exponent=2.0, eps=0.0))
        (1.0, 9.0)
    """
    for name, n in (("n_prev", n_prev), ("n_next", n_next)):
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
            raise ValueError(
                f"CheckFree: the gradient norm {name} must be a finite number >= 0, got {n!r} "
                "(a non-finite norm means that neighbour's last step diverged)"
            )
    if options.uniform:
        return 1.0, 1.0
    b = float(n_prev) ** options.exponent + options.eps
    a = float(n_next) ** options.exponent + options.eps
    if not (math.isfinite(a) and math.isfinite(b)) or a + b <= 0:
        raise ValueError(
            f"CheckFree: neighbour weights {b!r} (previous) and {a!r} (next) from norms "
            f"{n_prev!r}, {n_next!r} cannot be normalized (eps=0 and both norms zero?)"
        )
    return b, a


def average_neighbours(
    prev: Mapping[str, Tensor],
    next: Mapping[str, Tensor],
    n_prev: float,
    n_next: float,
    options: CheckFreeOptions = CheckFreeOptions(),
    *,
    keys: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """The lost stage's state: ``(a*next[k] + b*prev[k]) / (a + b)`` for every key ``k``.

    Args:
        prev: state dict of the stage before the lost one (last completed step).
        next: state dict of the stage after it.
        n_prev / n_next: their recorded clipped gradient norms of that step.
        options: exponent, eps, uniform (:func:`neighbour_weights`).
        keys: the lost stage's keys (both neighbours must hold each; their other keys, such as
            the last stage's output head, are ignored). None: both must hold the same keys.

    Floating tensors are combined in float64 and rounded once to their dtype; other tensors
    (counters) must be equal in both neighbours and are copied. Keys, shapes and dtypes must
    match (IncompatibleCheckpointError naming the key); a non-finite norm or tensor raises.
    The result holds new tensors (nothing aliases the inputs).

    Example:
        >>> import torch
        >>> out = average_neighbours({"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])},
        ...                          1.0, 3.0, CheckFreeOptions(eps=0.0))
        >>> out["w"]  # (3*3 + 1*1) / 4
        tensor([2.5000])
    """
    import torch

    b, a = neighbour_weights(n_prev, n_next, options)
    if keys is None:
        if set(prev) != set(next):
            only_p = sorted(set(prev) - set(next))
            only_n = sorted(set(next) - set(prev))
            raise IncompatibleCheckpointError(
                "CheckFree: the neighbours' states hold different keys "
                f"(only the previous stage: {only_p[:5]}, only the next: {only_n[:5]})"
            )
        wanted = list(prev)
    else:
        wanted = list(keys)
    out: dict[str, Tensor] = {}
    for key in wanted:
        for side, state in (("previous", prev), ("next", next)):
            if key not in state:
                raise IncompatibleCheckpointError(f"CheckFree: the {side} stage has no {key!r}")
            if not isinstance(state[key], torch.Tensor):
                raise IncompatibleCheckpointError(
                    f"CheckFree: {key!r} of the {side} stage is a {type(state[key]).__name__}, "
                    "not a tensor"
                )
        p, n = prev[key], next[key]
        if p.shape != n.shape or p.dtype != n.dtype:
            raise IncompatibleCheckpointError(
                f"CheckFree: {key!r} differs between the neighbours: previous "
                f"{p.dtype} {tuple(p.shape)}, next {n.dtype} {tuple(n.shape)}"
            )
        if not (p.is_floating_point() or p.is_complex()):
            if not torch.equal(p, n):
                raise IncompatibleCheckpointError(
                    f"CheckFree: {key!r} is a {p.dtype} tensor that differs between the "
                    "neighbours: it cannot be averaged"
                )
            out[key] = n.detach().clone()
            continue
        wide = torch.complex128 if p.is_complex() else torch.float64
        mixed = (n.detach().to(wide) * a + p.detach().to(wide) * b) / (a + b)
        if not bool(torch.isfinite(mixed).all()):
            raise ValueError(f"CheckFree: {key!r} of a neighbour holds non-finite values")
        out[key] = mixed.to(p.dtype)
    return out


def clip_and_record(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradients of one stage to ``max_norm`` and return the clipped gradient's L2 norm.

    The returned value is the bookkeeping ``n_k`` of this step (call it after the gradient
    all-reduce, before the optimizer step). Parameters without a gradient are skipped; no
    gradient at all gives 0.0. A non-finite norm is returned as it is (the averaging rule
    refuses it).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> round(clip_and_record([w], max_norm=1.0), 4)  # 5 clipped to 1 (torch's 1e-6 slack)
        1.0
    """
    import torch

    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
    grads = [p.grad.detach() for p in params if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g.to(torch.float64)) for g in grads])
    return float(torch.linalg.vector_norm(norms))


def fresh_optimizer(
    optimizer: torch.optim.Optimizer, *, lr_scale: float, params: Iterable[Any] | None = None
) -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class and hyperparameters, its state empty (zero
    moments, step count restarted), every group's learning rate times ``lr_scale``.

    Args:
        optimizer: the optimizer the stage was built with (its state is ignored).
        lr_scale: the learning-rate factor kept for the rebuilt stage.
        params: the parameters per group (default: the groups' own parameters, which the
            rebuilt weights were loaded into in place).

    A learning-rate schedule on the global step is rebuilt by the caller over the new
    optimizer with ``last_epoch`` at the current step; each group's ``initial_lr`` is scaled
    too, so such a scheduler keeps the factor (no warm-up restart).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = fresh_optimizer(torch.optim.Adam([w], lr=0.01), lr_scale=1.1)
        >>> round(opt.param_groups[0]["lr"], 6), len(opt.state)
        (0.011, 0)
    """
    if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
        raise ConfigError(f"fresh_optimizer: lr_scale must be a number > 0, got {lr_scale!r}")
    groups = []
    given = None if params is None else list(params)
    if given is not None and len(given) != len(optimizer.param_groups):
        raise ValueError(
            f"fresh_optimizer: {len(given)} parameter groups given, the optimizer has "
            f"{len(optimizer.param_groups)}"
        )
    for i, group in enumerate(optimizer.param_groups):
        settings = {k: v for k, v in group.items() if k != "params"}
        settings["lr"] = group["lr"] * lr_scale
        if "initial_lr" in group:
            settings["initial_lr"] = group["initial_lr"] * lr_scale
        groups.append({"params": list(group["params"]) if given is None else given[i], **settings})
    make: Any = type(optimizer)
    fresh: torch.optim.Optimizer = make(groups)
    return fresh


def swap_partner(stage: int, num_stages: int) -> int | None:
    """CheckFree+'s partner of an edge stage: the first stage's is the second, the last
    stage's the one before it; None for an interior stage (or a pipeline shorter than 4,
    where the edge pairs would overlap).

    Example:
        >>> [swap_partner(s, 6) for s in range(6)]
        [1, 0, None, None, 5, 4]
    """
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not in a pipeline of {num_stages} stages")
    if num_stages < 4:
        return None
    return {0: 1, 1: 0, num_stages - 2: num_stages - 1, num_stages - 1: num_stages - 2}.get(stage)


def copy_partner(
    partner: Mapping[str, Tensor],
    replicated: Mapping[str, Tensor] | None = None,
    *,
    keys: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """A lost edge stage under CheckFree+: its swap partner's tensors (``keys`` of them, or
    all), plus the edge's own (de)embedding layers from the replica on the partner's host.

    Example:
        >>> import torch
        >>> got = copy_partner({"block.w": torch.ones(1)}, {"embed.w": torch.zeros(1)})
        >>> sorted(got)
        ['block.w', 'embed.w']
    """
    import torch

    extra = dict(replicated or {})
    wanted = [k for k in (partner if keys is None else keys) if k not in extra]
    out: dict[str, Tensor] = {}
    for key in wanted:
        if key not in partner:
            raise IncompatibleCheckpointError(f"CheckFree+: the swap partner has no {key!r}")
        out[key] = partner[key].detach().clone()
    for key, value in extra.items():
        if not isinstance(value, torch.Tensor):
            raise IncompatibleCheckpointError(f"CheckFree+: replicated {key!r} is not a tensor")
        out[key] = value.detach().clone()
    return out


@dataclass(frozen=True)
class NeighbourState:
    """What a live neighbour sent: its stage, the step its state is, its state and its norm."""

    stage: int
    step: int
    state: Mapping[str, Tensor]
    grad_norm: float


#: fetch(stage) -> that live stage's state and norm of the last completed step (point to point)
Fetch = Callable[[int], NeighbourState]
#: replicated(stage) -> the (de)embedding tensors of ``stage`` held on its partner's host
Replicated = Callable[[int], Mapping[str, "Tensor"]]


@dataclass(frozen=True)
class CheckFreeSource:
    """A rebuilt stage state (a :class:`~recoverkit.recovery.base.Source` read from memory)."""

    step: int
    state: Mapping[str, Tensor]
    how: str

    @property
    def manifest(self) -> Manifest | None:
        return None

    @property
    def tier_name(self) -> str | None:
        return None

    def describe(self) -> str:
        return self.how

    def read(
        self,
        *,
        rank: int,
        allow_pickle: bool,
        sharded: Mapping[str, ShardedTensor] | None = None,
        entries: Collection[str] | None = None,
    ) -> dict[str, Any]:
        """``{"model": state}`` (the rebuilt stage has no optimizer state: a fresh one)."""
        tree: dict[str, Any] = {"model": dict(self.state)}
        return tree if entries is None else {k: v for k, v in tree.items() if k in entries}


class CheckFreeRecovery(RecoveryStrategy):
    """Rebuild ``stage`` from its neighbours when it is lost with no exact copy left.

    Args:
        stage: the stage this process rebuilds (it must be in ``loss.stages``).
        num_stages: the pipeline's length.
        fetch: a live neighbour's state and norm (called for each neighbour needed).
        keys: the rebuilt stage's state keys (default: the neighbours' common keys).
        replicated: CheckFree+ only: the edge stage's (de)embedding tensors from its partner's host.
        options: the rule's options (``options.plus`` enables edge stages).

    Put it last in a :class:`~recoverkit.recovery.chain.RecoveryChain`, after the exact
    strategies; the chain's log then says which one recovered. It refuses (CannotRecover) when
    the stage is not lost, when a neighbour it needs is lost too, when an edge stage is lost
    without CheckFree+, and when the neighbours' steps disagree with each other or with
    ``loss.step``. Only the process rebuilding the stage calls it; the neighbours serve
    ``fetch`` at the same time.
    """

    name = "checkfree"

    def __init__(
        self,
        *,
        stage: int,
        num_stages: int,
        fetch: Fetch,
        keys: Collection[str] | None = None,
        replicated: Replicated | None = None,
        options: CheckFreeOptions = CheckFreeOptions(),
    ) -> None:
        if num_stages < 2 or not 0 <= stage < num_stages:
            raise ConfigError(f"CheckFreeRecovery: stage {stage} of {num_stages} stages")
        self.stage, self.num_stages = stage, num_stages
        self.fetch, self.keys, self.replicated, self.options = fetch, keys, replicated, options
        self.name = "checkfree+" if options.plus else "checkfree"

    def recover(
        self, loss: Loss, survivors: Survivors, use: Use[T]
    ) -> Recovered[T] | CannotRecover:
        i = self.stage
        if i not in loss.stages:
            return CannotRecover(self.name, f"stage {i} is not lost")
        edge = i in (0, self.num_stages - 1)
        if edge:
            partner = swap_partner(i, self.num_stages) if self.options.plus else None
            if partner is None:
                why = "CheckFree+ is off" if not self.options.plus else "the pipeline is too short"
                return CannotRecover(self.name, f"stage {i} is an edge stage and {why}")
            needed = [partner]
        else:
            needed = [i - 1, i + 1]
        lost = [s for s in needed if s in loss.stages]
        if lost:
            return CannotRecover(self.name, f"stage {i}'s neighbour(s) {lost} are lost too")
        try:
            got = [self.fetch(s) for s in needed]
            for s, g in zip(needed, got):
                if g.stage != s:
                    raise IncompatibleCheckpointError(
                        f"asked stage {s} for its state, got stage {g.stage}'s"
                    )
        except (OSError, RecoverkitError, ValueError) as e:
            return CannotRecover(self.name, f"fetching the neighbours' state failed: {e}", e)
        steps = {g.step for g in got}
        if len(steps) != 1 or (loss.step is not None and loss.step not in steps):
            why = f"the neighbours are at steps {sorted(steps)}" + (
                "" if loss.step is None else f", step {loss.step} is wanted"
            )
            return CannotRecover(self.name, why)
        step = steps.pop()
        if edge:
            extras = self.replicated(i) if self.replicated is not None else {}
            state = copy_partner(got[0].state, extras, keys=self.keys)
            how = f"CheckFree+ copy of stage {needed[0]} at step {step}"
        else:
            prev, nxt = got
            b, a = neighbour_weights(prev.grad_norm, nxt.grad_norm, self.options)
            state = average_neighbours(
                prev.state, nxt.state, prev.grad_norm, nxt.grad_norm, self.options, keys=self.keys
            )
            how = (
                f"CheckFree average of stages {i - 1} and {i + 1} at step {step} "
                f"(weights {b / (a + b):.4g} / {a / (a + b):.4g}, norms "
                f"{prev.grad_norm:.4g} / {nxt.grad_norm:.4g})"
            )
        source = CheckFreeSource(step, state, how)
        return Recovered(self.name, source, use(source))
