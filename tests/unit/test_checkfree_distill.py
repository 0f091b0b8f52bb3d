"""CheckFree's optional fit of a rebuilt stage to the lost stage's last step
(:func:`recoverkit.recovery.checkfree.distill_stage`): it recovers a known function from its
input -> output pairs, starts from the weights it is given, leaves the training optimizer and
the gradients alone, and refuses pairs that do not fit the stage or are not finite (the
weights it started from kept)."""

from __future__ import annotations

import pytest
import torch

from recoverkit.errors import ConfigError, IncompatibleCheckpointError
from recoverkit.recovery.checkfree import CheckFreeOptions, distill_stage


def _block(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))


def _pairs(lost: torch.nn.Module, n: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(4, 5, 8, generator=g) for _ in range(n)]
    with torch.no_grad():
        return xs, [lost(x) for x in xs]


def test_the_fit_moves_the_average_towards_the_lost_stage():
    lost, prev, nxt = _block(1), _block(2), _block(3)
    rebuilt = _block(4)
    with torch.no_grad():  # CheckFree's start: the plain average of the neighbours
        for r, p, n in zip(rebuilt.parameters(), prev.parameters(), nxt.parameters()):
            r.copy_((p + n) / 2)
    xs, ys = _pairs(lost)
    g = torch.Generator().manual_seed(8)
    held_out = torch.randn(4, 5, 8, generator=g)
    with torch.no_grad():
        before = float(torch.nn.functional.mse_loss(rebuilt(held_out), lost(held_out)))
    d = distill_stage(rebuilt, xs, ys, steps=300, lr=0.01)
    with torch.no_grad():
        after = float(torch.nn.functional.mse_loss(rebuilt(held_out), lost(held_out)))
    assert d.steps == 300 and d.seconds >= 0
    assert d.last_mse < d.first_mse / 20  # the pairs themselves are fitted
    assert after < before / 5  # and the lost function is recovered beyond them
    assert all(p.grad is None for p in rebuilt.parameters())
    assert "300 steps" in d.describe() and "mse" in d.describe()


def test_the_first_error_is_the_starting_weights_error():
    lost, rebuilt = _block(1), _block(2)
    xs, ys = _pairs(lost, n=2)
    with torch.no_grad():
        expected = sum(float(torch.nn.functional.mse_loss(rebuilt(x), y)) for x, y in zip(xs, ys)) / 2
    d = distill_stage(rebuilt, xs, ys, steps=1, lr=1e-3)
    assert d.first_mse == pytest.approx(expected, rel=1e-6)


def test_the_training_optimizer_is_untouched():
    lost, rebuilt = _block(1), _block(2)
    opt = torch.optim.AdamW(rebuilt.parameters(), lr=1e-3)
    xs, ys = _pairs(lost)
    distill_stage(rebuilt, xs, ys, steps=5, lr=1e-3)
    assert len(opt.state) == 0  # its moments stay zero: the fit used its own optimizer


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda xs, ys: (xs, ys[:-1]), IncompatibleCheckpointError, "one pair per micro-batch"),
        (lambda xs, ys: ([], []), IncompatibleCheckpointError, "one pair per micro-batch"),
        (lambda xs, ys: (xs, [y[..., :4] for y in ys]), IncompatibleCheckpointError, "output was"),
        (lambda xs, ys: ([x.long() for x in xs], ys), IncompatibleCheckpointError, "not a floating-point"),
        (lambda xs, ys: (xs, [y.masked_fill(y > 0, float("nan")) for y in ys]), ValueError, "non-finite"),
    ],
    ids=["counts", "empty", "shape", "dtype", "nan"],
)
def test_pairs_that_do_not_fit_are_refused_and_the_weights_kept(change, error, match):
    lost, rebuilt = _block(1), _block(2)
    start = {k: v.clone() for k, v in rebuilt.state_dict().items()}
    xs, ys = change(*_pairs(lost))
    with pytest.raises(error, match=match):
        distill_stage(rebuilt, xs, ys, steps=3, lr=1e-3)
    assert all(torch.equal(start[k], v) for k, v in rebuilt.state_dict().items())


def test_a_diverging_fit_gives_the_start_weights_back():
    lost, rebuilt = _block(1), _block(2)
    start = {k: v.clone() for k, v in rebuilt.state_dict().items()}
    xs, ys = _pairs(lost)
    ys = [y * 1e30 for y in ys]  # squared, the error overflows float32
    with pytest.raises(ValueError, match="diverged"):
        distill_stage(rebuilt, xs, ys, steps=3, lr=1e-3)
    assert all(torch.equal(start[k], v) for k, v in rebuilt.state_dict().items())


@pytest.mark.parametrize("steps", [0, -1, 10_001, 2.0, True])
def test_steps_and_rate_are_validated(steps):
    lost, rebuilt = _block(1), _block(2)
    xs, ys = _pairs(lost)
    with pytest.raises(ConfigError, match="steps"):
        distill_stage(rebuilt, xs, ys, steps=steps, lr=1e-3)
    with pytest.raises(ConfigError, match="lr"):
        distill_stage(rebuilt, xs, ys, steps=1, lr=float("nan"))


@pytest.mark.parametrize("value", [-1, 10_001, 1.5, True, "8"])
def test_the_option_is_validated(value):
    with pytest.raises(ConfigError, match="distill_steps"):
        CheckFreeOptions(distill_steps=value)
    assert CheckFreeOptions(distill_steps=64).distill_steps == 64
    assert CheckFreeOptions().distill_steps == 0  # the paper's rule by default
