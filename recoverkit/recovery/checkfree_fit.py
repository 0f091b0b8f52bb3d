"""CheckFree's optional fit: a rebuilt stage fitted to what the lost stage computed.

Where it sits: under :mod:`.checkfree` (whose ``CheckFreeOptions.distill_steps`` turns it on
and which re-exports it); the pipeline's replacement (``recoverkit.elastic.stage_recovery``)
and the convergence benchmark call :func:`distill_stage` after CheckFree's average, with the
lost stage's input -> output pairs of the last completed step that its neighbours hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError, IncompatibleCheckpointError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["MAX_DISTILL_STEPS", "Distilled", "distill_stage"]

#: the most fitting steps a rebuild may spend (each is a forward and backward of the stage)
MAX_DISTILL_STEPS = 10_000


@dataclass(frozen=True)
class Distilled:
    """What :func:`distill_stage` did: its steps, the fit's error before and after, its time."""

    steps: int
    first_mse: float
    last_mse: float
    seconds: float

    def describe(self) -> str:
        return (
            f"fitted to the lost stage's last step in {self.steps} steps "
            f"(mse {self.first_mse:.4g} -> {self.last_mse:.4g})"
        )


def distill_stage(
    module: torch.nn.Module,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    *,
    steps: int,
    lr: float,
) -> Distilled:
    """Fit a rebuilt stage to what the lost stage computed in the last completed step.

    ``inputs[j]`` is what the lost stage received for micro-batch ``j`` (its previous stage
    sent it) and ``outputs[j]`` what it produced (its next stage received it): the pairs its
    neighbours still hold when it is lost. ``steps`` full-batch Adam steps (learning rate
    ``lr``, betas 0.9 / 0.95, a separate optimizer: the training optimizer is untouched)
    minimise the mean squared error of ``module(inputs[j])`` against ``outputs[j]``, starting
    from the weights ``module`` holds (CheckFree's average). Gradients are cleared afterwards.

    Raises IncompatibleCheckpointError when the pairs do not fit the module (counts, shapes,
    dtypes) and ValueError when a tensor or the fit's error is not finite; on a diverged fit
    ``module`` is given back the weights it started from.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> m = torch.nn.Linear(4, 4)
        >>> x = [torch.randn(16, 4)]
        >>> y = [2.0 * x[0]]
        >>> d = distill_stage(m, x, y, steps=200, lr=0.05)
        >>> d.last_mse < d.first_mse / 100
        True
    """
    import time

    import torch
    import torch.nn.functional as F

    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_DISTILL_STEPS:
        raise ConfigError(f"distill_stage: steps must be an int in [1, {MAX_DISTILL_STEPS}], got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"distill_stage: lr must be a finite number > 0, got {lr!r}")
    if len(inputs) != len(outputs) or not inputs:
        raise IncompatibleCheckpointError(
            f"CheckFree: {len(inputs)} input(s) and {len(outputs)} output(s) of the lost stage: "
            "one pair per micro-batch needed"
        )
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise IncompatibleCheckpointError("CheckFree: the rebuilt stage has no trainable parameter to fit")
    device = params[0].device
    pairs = []
    for j, (x, y) in enumerate(zip(inputs, outputs)):
        for what, t in (("input", x), ("output", y)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise IncompatibleCheckpointError(
                    f"CheckFree: the lost stage's {what} {j} is not a floating-point tensor"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"CheckFree: the lost stage's {what} {j} holds non-finite values")
        pairs.append((x.detach().to(device), y.detach().to(device)))
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def error() -> Tensor:
        total: Tensor | None = None
        for j, (x, y) in enumerate(pairs):
            out = module(x)
            if not isinstance(out, torch.Tensor) or out.shape != y.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise IncompatibleCheckpointError(
                    f"CheckFree: the rebuilt stage maps micro-batch {j} to {got}; the lost stage's "
                    f"output was {tuple(y.shape)}"
                )
            e = F.mse_loss(out.float(), y.float())
            total = e if total is None else total + e
        assert total is not None
        return total / len(pairs)

    t0 = time.perf_counter()
    opt = torch.optim.Adam(params, lr=float(lr), betas=(0.9, 0.95))
    first = math.nan
    try:
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            e = error()
            if not bool(torch.isfinite(e)):
                raise ValueError(f"CheckFree: fitting the rebuilt stage diverged at step {i} ({float(e.detach())})")
            if i == 0:
                first = float(e.detach())
            e.backward()
            opt.step()
        with torch.no_grad():
            last = float(error())
        if not math.isfinite(last):
            raise ValueError(f"CheckFree: fitting the rebuilt stage diverged ({last})")
    except BaseException:
        module.load_state_dict(start)
        raise
    finally:
        for p in params:
            p.grad = None
    return Distilled(steps, first, last, time.perf_counter() - t0)
