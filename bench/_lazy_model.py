"""The lazy-checkpoint benchmark's model and calibration: the state every method checkpoints.

Where it sits: the bottom of ``bench_lazy`` (:mod:`bench.bench_lazy` is the entry point), below
its phases (:mod:`bench._lazy_phases`); :mod:`bench._overhead_world` (``bench_overhead``'s ranks)
and :mod:`bench._torchft` train the same model. The flow: :func:`_model` builds an MLP of
:data:`LAYERS` square layers whose parameters plus AdamW's two moments come to the size asked
for, with AdamW's state materialised; :func:`_tensors` lists that state and :func:`_nbytes` sizes
it; :func:`_calibrate` times a plain memory copy of it and picks the batch whose
forward+backward (:func:`_fwd_bwd`) takes :data:`FWD_BWD_PER_MEMCPY` times as long;
:func:`_opt_step` and :func:`_state_dict` are the training step and the state dicts that
``torch.save`` and DCP write.
"""

from __future__ import annotations

from typing import Any

import torch

from .bench_limits import timed
from .machine import median

__all__ = [
    "FWD_BWD_PER_MEMCPY",
    "LAYERS",
    "_model",
    "_tensors",
    "_nbytes",
    "_fwd_bwd",
    "_opt_step",
    "_calibrate",
    "_state_dict",
]

FWD_BWD_PER_MEMCPY = 2.0  # forward+backward is calibrated to this multiple of a state memcpy
LAYERS = 8


# --------------------------------------------------------------------------- the model
def _model(total_mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """An MLP of LAYERS square layers whose params + 2 AdamW moments are ~total_mib."""
    per_layer_bytes = total_mib * 2**20 / 3 / LAYERS
    side = max(16, int((per_layer_bytes / 4) ** 0.5) // 16 * 16)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(LAYERS):
        layers.append(torch.nn.Linear(side, side, bias=False))
        if i < LAYERS - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():  # materialise AdamW's state
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)  # gradients stay allocated: steady memory and timings
    return model, opt, side


def _tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach() for p in model.parameters()]
    for s in opt.state.values():
        out += [v for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return out


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _fwd_bwd(model: torch.nn.Module, x: torch.Tensor) -> None:
    model(x).square().mean().backward()


def _opt_step(opt: torch.optim.Optimizer) -> None:
    opt.step()
    opt.zero_grad(set_to_none=False)


def _calibrate(
    model: torch.nn.Module, opt: torch.optim.Optimizer, side: int, tensors: list[torch.Tensor], reps: int, max_batch: int
) -> dict[str, Any]:
    """memcpy of the state into preallocated buffers, then a batch with fwd+bwd ~ 2x that."""
    bufs = [torch.empty_like(t) for t in tensors]

    def memcpy() -> None:
        for b, t in zip(bufs, tensors):
            b.copy_(t)

    memcpy_s = median(timed(memcpy, reps))
    bufs.clear()  # free the copies (the closure keeps the list itself)
    target = FWD_BWD_PER_MEMCPY * memcpy_s
    gen = torch.Generator().manual_seed(1)
    batch, fb = 16, 0.0
    tried: list[tuple[int, float]] = []
    for _ in range(4):  # fwd+bwd time is close to linear in the batch; a few refinements
        x = torch.randn(batch, side, generator=gen)
        fb = median(timed(lambda: _fwd_bwd(model, x), reps))  # noqa: B023
        tried.append((batch, fb))
        if abs(fb / target - 1) <= 0.1:
            break
        batch = max(1, min(max_batch, round(batch * target / fb)))
        if batch == tried[-1][0]:
            break
    # keep the closest batch tried
    batch, fb = min(tried, key=lambda bt: abs(bt[1] / target - 1))
    model.zero_grad(set_to_none=False)
    step_s = median(timed(lambda: opt.step(), max(1, reps // 2)))
    opt.zero_grad(set_to_none=False)
    nbytes = _nbytes(tensors)
    return {
        "memcpy_s": memcpy_s,
        "memcpy_gb_per_s": nbytes / memcpy_s / 1e9,
        "target_fwd_bwd_s": target,
        "batch": batch,
        "fwd_bwd_s": fb,
        "fwd_bwd_vs_memcpy": fb / memcpy_s,
        "optimizer_step_s": step_s,
        "tried": tried,
        "max_batch": max_batch,
        "torch_threads": torch.get_num_threads(),
    }


def _state_dict(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}
