"""An FSDP2 model's step under the elastic trainer: its reduction, and waits a heartbeat cuts short.

Where it sits: the trainer's ``wrap=`` for a model that ``fully_shard`` was applied to
(:func:`fsdp_wrap`), next to :mod:`.reshard` (its recovery). FSDP2 reduces in its backward
pass (reduce-scatter), as DDP does, so the trainer drives it like a DDP model:

    micro-batch 1..n-1   no_sync(): set_requires_gradient_sync(False), gradients accumulate
                         unsharded, nothing reduced
    micro-batch n        its backward reduce-scatters the sum over the ranks; mode "global":
                         FSDP's division by the world size switched off
                         (set_gradient_divide_factor(1.0) on every FSDP module), the loss
                         being divided by the global sample count already; "shrink": FSDP's
                         mean over the live ranks (TorchFT's behaviour)

Every micro-batch runs collectives (the forward's all-gathers too), and FSDP waits for them
itself, with no timeout but the group's. With ``abort=`` (the heartbeat's verdict, as for
DDP's :class:`~recoverkit.distributed.global_grad.SumHookState`) each FSDP module's
all-gather and reduce-scatter are issued asynchronously and waited for by
:func:`~recoverkit.distributed.global_grad.wait_collective`, which asks ``abort`` every
``poll_s``: a survivor whose collective never talks to the lost rank (the far side of gloo's
ring, blocked waiting for a send) gives it up when the heartbeat sees the loss (``miss_s``)
instead of at the group's timeout. The error (``PeerLostError``, ``PeerTimeoutError`` or the
backend's own) leaves the forward or the backward as it is and the trainer's watch of the
micro-batch makes it a loss. The custom collectives are FSDP2's own extension point
(``set_custom_all_gather`` / ``set_custom_reduce_scatter``), built on its default
implementations (a private module of torch 2.13: where it is missing, no polling, and the
group's timeout stays the bound).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..distributed.global_grad import POLL_S, Abort, wait_collective

__all__ = ["ShardedSync", "fsdp_wrap"]

def _defaults() -> tuple[Any, Any] | None:
    """FSDP2's default all-gather and reduce-scatter classes (a private module in torch 2.13,
    behind the public ``set_custom_*`` protocols), or None where this torch lacks them."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives as c
    except ImportError:  # pragma: no cover - another torch: FSDP's own waits (the group's timeout)
        return None
    found = getattr(c, "DefaultAllGather", None), getattr(c, "DefaultReduceScatter", None)
    return None if None in found else found


_DEFAULTS = _defaults()


def _polled(abort: Abort | None, timeout_s: float | None, poll_s: float) -> tuple[Any, Any] | None:
    """(all-gather, reduce-scatter) whose waits ask ``abort``; None where torch lacks them."""
    if _DEFAULTS is None:
        return None
    base_all_gather, base_reduce_scatter = _DEFAULTS

    def wait(work: Any, what: str) -> None:
        wait_collective(work, what, timeout_s=timeout_s, abort=abort, poll_s=poll_s)

    class AllGather(base_all_gather):  # type: ignore[misc,valid-type]
        def __call__(self, output_tensor: Any, input_tensor: Any, group: Any, async_op: bool = False) -> None:
            wait(super().__call__(output_tensor, input_tensor, group, async_op=True), "FSDP's all-gather")
            return None  # complete: nothing for FSDP to wait for

    class ReduceScatter(base_reduce_scatter):  # type: ignore[misc,valid-type]
        def __call__(self, output_tensor: Any, input_tensor: Any, group: Any, op: Any, async_op: bool = False) -> None:
            wait(super().__call__(output_tensor, input_tensor, group, op, async_op=True), "FSDP's reduce-scatter")
            return None

    return AllGather(), ReduceScatter()


class ShardedSync(torch.nn.Module):
    """An FSDP2 model as the trainer's ``wrap=`` result: ``no_sync()`` like DDP's (module doc).

    Args:
        module: the model ``fully_shard`` was applied to (its root).
        sum_: mode "global": gradients summed over the ranks, not averaged.
        abort, timeout_s, poll_s: every FSDP collective waited for by ``wait_collective``
            with these (``abort`` None and ``timeout_s`` None: FSDP's own waits).

    Calls go to the model; the trainer passes this wrapper to ``loss_fn``.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        sum_: bool,
        abort: Abort | None = None,
        timeout_s: float | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        super().__init__()
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(module, FSDPModule):
            raise TypeError(f"fsdp_wrap: expected a module that fully_shard was applied to, got {type(module).__name__}")
        fsdp: list[Any] = [m for m in module.modules() if isinstance(m, FSDPModule)]
        for m in fsdp:
            if sum_:
                m.set_gradient_divide_factor(1.0)
            comms = _polled(abort, timeout_s, poll_s) if abort is not None or timeout_s is not None else None
            if comms is not None:
                m.set_custom_all_gather(comms[0])
                m.set_custom_reduce_scatter(comms[1])
        self.module = module
        #: the collectives are polled (``abort``/``timeout_s`` given and supported by this torch)
        self.polled = (abort is not None or timeout_s is not None) and _DEFAULTS is not None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """The backward inside accumulates gradients without reducing them."""
        m: Any = self.module
        m.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            m.set_requires_gradient_sync(True)


def fsdp_wrap(
    mode: str = "global",
    *,
    abort: Abort | None = None,
    timeout_s: float | None = None,
    poll_s: float = POLL_S,
) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """The trainer's ``wrap=`` for an FSDP2 model in ``mode`` ("global": summed gradients;
    "shrink": FSDP's mean over the live ranks, TorchFT's; "ordered" is not supported: FSDP
    reduces every micro-batch's gradients of a rank together). ``abort`` (the heartbeat's
    verdict), ``timeout_s`` and ``poll_s`` bound FSDP's collectives (module doc).

    Example:
        >>> fsdp_wrap("ordered")
        Traceback (most recent call last):
        ...
        ValueError: fsdp_wrap: mode must be 'global' or 'shrink' (FSDP2 reduces in its backward pass), got 'ordered'
    """
    if mode not in ("global", "shrink"):
        raise ValueError(f"fsdp_wrap: mode must be 'global' or 'shrink' (FSDP2 reduces in its backward pass), got {mode!r}")

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return ShardedSync(model, sum_=mode == "global", abort=abort, timeout_s=timeout_s, poll_s=poll_s)

    return wrap
