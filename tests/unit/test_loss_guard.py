"""The loss guard lives in recoverkit.health and judges as protect()'s guard always did."""

from __future__ import annotations

import math

import pytest
import torch

import recoverkit
from recoverkit.health.loss import LossGuard


def _reference(losses, spike_factor):
    """protect()'s judgement before the guard moved to health/ (kept here as the oracle)."""
    ema, seen, out = None, 0, []
    for value in losses:
        bad = not math.isfinite(value)
        if not bad and spike_factor is not None and ema is not None and seen >= 10:
            bad = value > spike_factor * ema
        if not bad:
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            seen += 1
        out.append(not bad)
    return out, ema


@pytest.mark.parametrize("spike_factor", [None, 1.5, 3.0])
def test_same_verdicts_and_average_as_before(spike_factor):
    g = torch.Generator().manual_seed(0)
    losses = (torch.rand(200, generator=g, dtype=torch.float64) * 2 + 1).tolist()
    for i in (3, 15, 40, 41, 90, 150):
        losses[i] *= 10  # spikes, one before the warm-up ends
    losses[60], losses[61], losses[120] = float("nan"), float("inf"), float("-inf")
    guard = LossGuard(spike_factor=spike_factor)
    verdicts = [guard.check(x) for x in losses]
    expected, ema = _reference(losses, spike_factor)
    assert verdicts == expected and guard.average == ema
    assert not all(verdicts)  # the non-finite losses at least
    if spike_factor == 1.5:
        assert verdicts[3] and not verdicts[15]  # spikes count only after 10 good losses


def test_tensors_are_judged_without_autograd():
    w = torch.ones(1, requires_grad=True)
    guard = LossGuard()
    assert guard.check((w * 2).sum()) and guard.average == 2.0
    assert not guard.check(w * float("nan"))
    assert guard.seen == 1  # the bad loss did not count


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="spike_factor"):
        LossGuard(spike_factor=0)
    with pytest.raises(ValueError, match="ema_weight"):
        LossGuard(ema_weight=0)


def test_protect_rolls_back_through_the_health_guard(tmp_path):
    """run.guard() uses a LossGuard with protect()'s spike_factor and rolls back on its verdict."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = iter([1.0, 1.0, float("nan"), 1.0, 1.0])
    seen = []
    with recoverkit.protect(
        str(tmp_path / "ckpt"),
        model=model,
        optimizer=opt,
        loader=range(4),
        save_every=1,
        spike_factor=2.0,
    ) as run:
        assert isinstance(run._loss_guard, LossGuard) and run._loss_guard.spike_factor == 2.0
        for batch in run:
            if not run.guard(next(losses)):
                seen.append(("rejected", batch, run.step))
                continue
            seen.append(("ok", batch, run.step))
    assert ("rejected", 2, 2) in seen  # batch 2 gave NaN at step 2: rolled back to step 2's save
    assert [b for what, b, _ in seen if what == "ok"] == [
        0,
        1,
        3,
    ]  # batch 2 skipped after the rollback
    assert run.step == 3
