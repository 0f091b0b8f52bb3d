"""capture/check/apply (all or nothing) and the random streams."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from recoverkit.errors import IncompatibleCheckpointError
from recoverkit.state import (
    ResumableSampler,
    RNGState,
    Stateful,
    apply,
    capture,
    check,
    decode,
    encode,
)
from recoverkit.state.flatten import flatten, unflatten


def _save_load(captured):
    """capture -> flatten -> encode -> decode -> unflatten, with the tensors cloned."""
    skeleton, refs = flatten(captured)
    tensors = {}
    for r in refs:
        tensors[r.key] = tensors[r.alias_of] if r.alias_of else r.tensor.detach().clone()
    return unflatten(decode(encode(skeleton)), tensors)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, snap):
    return all(torch.equal(v, snap[k]) for k, v in module.state_dict().items())


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def test_capture_takes_state_dicts_and_keeps_plain_values():
    model, counter, t = torch.nn.Linear(3, 2), _Counter(), torch.ones(2)
    assert (
        isinstance(model, Stateful)
        and isinstance(counter, Stateful)
        and not isinstance(t, Stateful)
    )
    got = capture({"model": model, "c": counter, "t": t, "step": 4})
    assert set(got["model"]) == {"weight", "bias"} and got["c"] == {"n": 0} and got["step"] == 4
    assert (
        got["t"] is t and got["model"]["weight"].data_ptr() == model.weight.data_ptr()
    )  # nothing copied


def test_apply_restores_every_kind_of_entry():
    src = {
        "model": torch.nn.Linear(3, 2),
        "c": _Counter(),
        "t": torch.nn.Parameter(torch.arange(3.0)),
        "step": 7,
    }
    src["c"].n = 5
    saved = _save_load(capture(src))
    dst = {
        "model": torch.nn.Linear(3, 2),
        "c": _Counter(),
        "t": torch.nn.Parameter(torch.zeros(3)),
        "step": 0,
    }
    t_before = dst["t"]
    apply(dst, saved)
    assert _unchanged(dst["model"], src["model"].state_dict())
    assert dst["c"].n == 5 and dst["step"] == 7
    assert dst["t"] is t_before and torch.equal(dst["t"], src["t"])  # in place, same object


def test_shape_mismatch_changes_nothing():
    good, bad = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    saved = _save_load(
        capture(
            {"a": torch.nn.Linear(4, 2), "b": torch.nn.Linear(4, 3), "c": _Counter(), "step": 9}
        )
    )
    target = {"a": good, "b": bad, "c": _Counter(), "step": 1}
    snaps = {"a": _snapshot(good), "b": _snapshot(bad)}
    target["c"].n = 42
    with pytest.raises(
        IncompatibleCheckpointError,
        match=r"'b'\['weight'\]: saved tensor \[3, 4\].*target \[2, 4\]",
    ):
        apply(target, saved)
    assert _unchanged(good, snaps["a"]) and _unchanged(
        bad, snaps["b"]
    )  # not even the entry that fits
    assert target["c"].n == 42 and target["step"] == 1


@pytest.mark.parametrize(
    ("target", "saved", "match"),
    [
        ({"m": torch.nn.Linear(2, 2)}, {"m": {"weight": torch.zeros(2, 2)}}, r"missing \['bias'\]"),
        ({"m": torch.nn.Linear(2, 2)}, {"m": {"weight": torch.zeros(2, 2), "bias": torch.zeros(2), "x": 1}},
         r"unexpected \['x'\]"),
        ({"m": torch.nn.Linear(2, 2)}, {"m": {"weight": torch.zeros(2, 2, dtype=torch.float64), "bias": torch.zeros(2)}},
         "float64"),
        ({"a": 1, "b": 2}, {"a": 1, "c": 3}, r"missing \['b'\]; unexpected \['c'\]"),
        ({"t": torch.zeros(3)}, {"t": [0, 0, 0]}, "holds list"),
        ({"t": torch.zeros(3)}, {"t": torch.zeros(3, dtype=torch.int64)}, "int64"),
        ({"s": ResumableSampler(10)}, {"s": ResumableSampler(11).state_dict()}, "11 samples"),
    ],
)  # fmt: skip
def test_check_names_what_does_not_fit(target, saved, match):
    with pytest.raises(IncompatibleCheckpointError, match=match):
        check(target, saved)


def test_optimizer_groups_are_checked():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    two_groups = torch.optim.SGD([{"params": a.parameters()}, {"params": b.parameters()}], lr=0.1)
    one_group = torch.optim.SGD(list(a.parameters()) + list(b.parameters()), lr=0.1)
    three_params = torch.optim.SGD([{"params": [a.weight]}, {"params": b.parameters()}], lr=0.1)
    with pytest.raises(
        IncompatibleCheckpointError, match="saved 2 parameter groups, the optimizer has 1"
    ):
        check({"o": one_group}, {"o": two_groups.state_dict()})
    with pytest.raises(
        IncompatibleCheckpointError, match="group 0 has 2 saved parameters, the optimizer has 1"
    ):
        check({"o": three_params}, {"o": two_groups.state_dict()})
    check({"o": two_groups}, {"o": _save_load(two_groups.state_dict())})


def _draws():
    return (
        [random.random() for _ in range(3)] + [random.getrandbits(70)],
        np.random.rand(3).tolist() + [float(np.random.randn())],
        torch.rand(3).tolist() + torch.randn(2).tolist(),
    )


def test_rng_round_trip_repeats_every_stream():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    _draws()
    np.random.randn()  # leave a cached gaussian in numpy's state
    saved = _save_load(capture({"rng": RNGState()}))
    first = _draws()
    _draws()  # move on
    apply({"rng": RNGState()}, saved)
    assert _draws() == first


def test_rng_state_is_checked_before_anything_changes():
    model = torch.nn.Linear(2, 2)
    snap = _snapshot(model)
    saved = _save_load(capture({"m": torch.nn.Linear(2, 2), "rng": RNGState()}))
    saved["rng"]["python"] = [3, [1, 2], None]  # not a getstate() tuple
    with pytest.raises(IncompatibleCheckpointError, match="python"):
        apply({"m": model, "rng": RNGState()}, saved)
    assert _unchanged(model, snap)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_cuda_states_without_cuda_warn_and_restore_the_rest():
    sd = RNGState().state_dict()
    expected = torch.rand(2)
    sd["cuda"] = [torch.get_rng_state()]
    with pytest.warns(UserWarning, match="1 CUDA device.*this process has 0"):
        RNGState().load_state_dict(sd)
    assert torch.equal(torch.rand(2), expected)


@pytest.mark.gpu
def test_cuda_rng_round_trip():
    saved = _save_load(capture({"rng": RNGState()}))
    assert len(saved["rng"]["cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda")
    torch.rand(4, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply({"rng": RNGState()}, saved)
    assert torch.equal(torch.rand(4, device="cuda"), first)


def test_resumed_training_is_bit_identical():
    """model + optimizer + RNG (dropout) + step through the whole state path."""

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
        )
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train(model, opt, steps):
        for _ in range(steps):
            x = torch.randn(8, 6)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    model, opt = make()
    train(model, opt, 3)
    saved = _save_load(capture({"model": model, "optimizer": opt, "step": 3, "rng": RNGState()}))
    train(model, opt, 4)

    model2, opt2 = make()
    torch.manual_seed(123)  # a restarted process has other random streams
    state = {"model": model2, "optimizer": opt2, "step": 0, "rng": RNGState()}
    apply(state, saved)
    assert state["step"] == 3
    train(model2, opt2, 4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
