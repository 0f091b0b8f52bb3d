"""CheckFree's rule against hand-computed examples: the weights (norms, eps, exponent 1 and 2,
uniform), key-by-key averaging, per-stage clipping with its recorded norm, the fresh optimizer,
CheckFree+'s partners, and the strategy's place at the end of a recovery chain."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from recoverkit.errors import ConfigError, IncompatibleCheckpointError
from recoverkit.recovery import CannotRecover, Loss, RecoveryChain, RecoveryStrategy, Survivors
from recoverkit.recovery.base import Recovered
from recoverkit.recovery.checkfree import (
    CheckFreeOptions,
    CheckFreeRecovery,
    NeighbourState,
    average_neighbours,
    clip_and_record,
    copy_partner,
    fresh_optimizer,
    neighbour_weights,
    swap_partner,
)

PREV = {"w": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([0.0])}
NEXT = {"w": torch.tensor([3.0, 2.0, 0.5]), "b": torch.tensor([4.0])}


def test_the_documented_examples_run():
    import doctest

    import recoverkit.recovery.checkfree as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0


def test_weights_by_hand():
    # a = n_next**p + eps weighs the next stage, b = n_prev**p + eps the previous one
    assert neighbour_weights(0.5, 2.0) == (0.5 + 1e-4, 2.0 + 1e-4)
    assert neighbour_weights(0.5, 2.0, CheckFreeOptions(exponent=2.0)) == (0.25 + 1e-4, 4.0 + 1e-4)
    assert neighbour_weights(0.5, 2.0, CheckFreeOptions(uniform=True)) == (1.0, 1.0)
    assert neighbour_weights(0.0, 0.0) == (1e-4, 1e-4)  # eps keeps two zero norms usable
    with pytest.raises(ValueError, match="cannot be normalized"):
        neighbour_weights(0.0, 0.0, CheckFreeOptions(eps=0.0))


def test_average_exponent_one_by_hand():
    # norms 1 (previous) and 3 (next), eps 1e-4: a = 3.0001, b = 1.0001, a + b = 4.0002
    out = average_neighbours(PREV, NEXT, 1.0, 3.0)
    a, b = 3.0001, 1.0001
    expect_w = [(a * 3 + b * 1) / 4.0002, (a * 2 + b * -2) / 4.0002, 0.5]
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["w"], torch.tensor(expect_w, dtype=torch.float64).float())
    assert out["b"].item() == pytest.approx(4.0 * a / 4.0002, rel=1e-7)
    # the numbers themselves: 10.0004 / 4.0002 = 2.49997500..., 3.9999 ...
    assert out["w"][0].item() == pytest.approx(2.499975001, rel=1e-7)
    assert out["w"][1].item() == pytest.approx(0.99995, rel=1e-6)


def test_average_exponent_two_and_uniform_by_hand():
    two = average_neighbours(PREV, NEXT, 1.0, 3.0, CheckFreeOptions(exponent=2.0, eps=0.0))
    # a = 9, b = 1: (9*3 + 1)/10 = 2.8, (9*2 - 2)/10 = 1.6, b: 36/10
    assert torch.allclose(two["w"], torch.tensor([2.8, 1.6, 0.5]), rtol=0, atol=1e-7)
    assert two["b"].item() == pytest.approx(3.6, abs=1e-6)
    uni = average_neighbours(PREV, NEXT, 1.0, 3.0, CheckFreeOptions(uniform=True))
    assert torch.equal(uni["w"], torch.tensor([2.0, 0.0, 0.5]))
    assert torch.equal(uni["b"], torch.tensor([2.0]))


def test_heavier_norm_pulls_towards_that_neighbour():
    lean_next = average_neighbours(PREV, NEXT, 0.1, 0.9)["w"][0].item()
    lean_prev = average_neighbours(PREV, NEXT, 0.9, 0.1)["w"][0].item()
    assert lean_next == pytest.approx(1 + 2 * (0.9001 / 1.0002), rel=1e-6)
    assert lean_prev == pytest.approx(1 + 2 * (0.1001 / 1.0002), rel=1e-6)


def test_result_is_new_memory_and_keeps_dtype():
    prev = {"h": torch.ones(4, dtype=torch.bfloat16), "n": torch.tensor(3)}
    nxt = {"h": torch.full((4,), 3.0, dtype=torch.bfloat16), "n": torch.tensor(3)}
    out = average_neighbours(prev, nxt, 1.0, 1.0, CheckFreeOptions(eps=0.0))
    assert out["h"].dtype == torch.bfloat16 and torch.equal(
        out["h"], torch.full((4,), 2.0, dtype=torch.bfloat16)
    )
    assert out["n"].item() == 3 and out["n"].data_ptr() != nxt["n"].data_ptr()


def test_keys_select_the_lost_stages_own():
    nxt = {**NEXT, "head.weight": torch.zeros(2)}  # the last stage holds an extra head
    with pytest.raises(IncompatibleCheckpointError, match="only the next: \\['head.weight'\\]"):
        average_neighbours(PREV, nxt, 1.0, 1.0)
    out = average_neighbours(PREV, nxt, 1.0, 1.0, keys=["w", "b"])
    assert sorted(out) == ["b", "w"]
    with pytest.raises(IncompatibleCheckpointError, match="previous stage has no 'head.weight'"):
        average_neighbours(PREV, nxt, 1.0, 1.0, keys=["w", "head.weight"])


@pytest.mark.parametrize(
    "nxt, match",
    [
        (
            {"w": torch.zeros(4), "b": torch.zeros(1)},
            r"'w' differs.*float32 \(3,\).*float32 \(4,\)",
        ),
        ({"w": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(1)}, "'w' differs.*float64"),
        ({"w": torch.zeros(3), "c": torch.zeros(1)}, "different keys"),
        ({"w": torch.zeros(3), "b": 1.0}, "'b' of the next stage is a float"),
    ],
)
def test_mismatches_are_rejected_naming_the_key(nxt, match):
    with pytest.raises(IncompatibleCheckpointError, match=match):
        average_neighbours(PREV, nxt, 1.0, 1.0)


def test_differing_integer_tensors_cannot_be_averaged():
    with pytest.raises(IncompatibleCheckpointError, match="'n' is a torch.int64 tensor"):
        average_neighbours({"n": torch.tensor(1)}, {"n": torch.tensor(2)}, 1.0, 1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, True, "1"])
def test_non_finite_or_negative_norms_are_rejected(bad):
    with pytest.raises(ValueError, match="gradient norm n_next"):
        average_neighbours(PREV, NEXT, 1.0, bad)


def test_non_finite_weights_are_rejected():
    with pytest.raises(ValueError, match="'w' of a neighbour holds non-finite"):
        average_neighbours(PREV, {**NEXT, "w": torch.tensor([math.nan, 0.0, 0.0])}, 1.0, 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"exponent": 0.0}, "exponent"),
        ({"exponent": math.nan}, "exponent"),
        ({"eps": -1e-4}, "eps"),
        ({"lr_scale": 0}, "lr_scale"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"uniform": 1}, "uniform"),
        ({"eps": "1e-4"}, "eps must be a number"),
    ],
)
def test_options_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CheckFreeOptions(**kwargs)


def test_clip_and_record_returns_the_clipped_norm():
    w, v = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    w.grad, v.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # norm 5
    assert clip_and_record([w, v], max_norm=1.0) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(w.grad, torch.tensor([0.6, 0.0])) and torch.allclose(
        v.grad, torch.tensor([0.8])
    )
    w.grad, v.grad = torch.tensor([0.3, 0.0]), torch.tensor([0.4])  # below the bound: untouched
    assert clip_and_record([w, v], max_norm=1.0) == pytest.approx(0.5, rel=1e-6)
    assert torch.equal(v.grad, torch.tensor([0.4]))
    assert clip_and_record([torch.nn.Parameter(torch.zeros(1))], max_norm=1.0) == 0.0
    w.grad = torch.tensor([30.0, 40.0])
    v.grad = None
    assert clip_and_record([w, v], max_norm=math.inf) == pytest.approx(50.0)


def test_fresh_optimizer_is_empty_with_scaled_lr():
    w = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.AdamW([w], lr=0.01, betas=(0.8, 0.9), weight_decay=0.1)
    w.grad = torch.ones(3)
    old.step()
    assert old.state[w]["step"] == 1
    new = fresh_optimizer(old, lr_scale=1.1)
    assert type(new) is torch.optim.AdamW and len(new.state) == 0
    group = new.param_groups[0]
    assert group["params"][0] is w and group["lr"] == pytest.approx(0.011)
    assert group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.1
    assert old.param_groups[0]["lr"] == 0.01  # the old one untouched
    # a schedule on the global step built over it keeps the factor
    sched = torch.optim.lr_scheduler.LambdaLR(old, lambda s: 0.5)
    again = fresh_optimizer(old, lr_scale=1.2)
    assert again.param_groups[0]["initial_lr"] == pytest.approx(0.012)
    resumed = torch.optim.lr_scheduler.LambdaLR(again, lambda s: 0.5, last_epoch=10)
    assert again.param_groups[0]["lr"] == pytest.approx(0.006)
    del sched, resumed
    with pytest.raises(ConfigError, match="lr_scale"):
        fresh_optimizer(old, lr_scale=0)


def test_swap_partners_and_copy():
    assert [swap_partner(s, 4) for s in range(4)] == [1, 0, 3, 2]
    assert [swap_partner(s, 8) for s in range(8)] == [1, 0, None, None, None, None, 7, 6]
    assert swap_partner(1, 3) is None
    with pytest.raises(ValueError):
        swap_partner(4, 4)
    partner = {"block.w": torch.ones(2), "block.b": torch.zeros(1)}
    got = copy_partner(partner, {"embed.weight": torch.full((2,), 7.0)})
    assert torch.equal(got["block.w"], torch.ones(2)) and got["embed.weight"][0] == 7.0
    assert got["block.w"].data_ptr() != partner["block.w"].data_ptr()
    with pytest.raises(IncompatibleCheckpointError, match="partner has no 'head.w'"):
        copy_partner(partner, keys=["block.w", "head.w"])


class _Exact(RecoveryStrategy):
    """An exact strategy standing in front of CheckFree: it has a copy of the stage or not."""

    name = "stage snapshot"

    def __init__(self, copy):
        self.copy = copy

    def recover(self, loss, survivors, use):
        if self.copy is None:
            return CannotRecover(self.name, "no snapshot of stage 2 survived")
        return Recovered(self.name, _Src(self.copy), use(_Src(self.copy)))


class _Src:
    step, manifest, tier_name = 5, None, None

    def __init__(self, state):
        self.state = state

    def describe(self):
        return "a snapshot"

    def read(self, **_):
        return {"model": self.state}


def _fetcher(calls):
    states = {1: NeighbourState(1, 5, PREV, 1.0), 3: NeighbourState(3, 5, NEXT, 3.0)}

    def fetch(stage):
        calls.append(stage)
        return states[stage]

    return fetch


def test_chain_prefers_the_exact_copy_and_falls_back_to_checkfree(caplog):
    calls: list[int] = []
    checkfree = CheckFreeRecovery(stage=2, num_stages=4, fetch=_fetcher(calls))
    loss = Loss(step=5, ranks={2}, stages={2})
    use = lambda source: source.read(rank=2, allow_pickle=False)["model"]  # noqa: E731
    snapshot = {"w": torch.zeros(3), "b": torch.zeros(1)}
    got = RecoveryChain([_Exact(snapshot), checkfree]).run(loss, Survivors(), use)
    assert got.strategy == "stage snapshot" and got.value is snapshot and calls == []
    with caplog.at_level(logging.INFO, logger="recoverkit.recovery"):
        got = RecoveryChain([_Exact(None), checkfree]).run(loss, Survivors(), use)
    assert got.strategy == "checkfree" and calls == [1, 3] and got.step == 5
    assert torch.equal(got.value["w"], average_neighbours(PREV, NEXT, 1.0, 3.0)["w"])
    assert "recovered step 5 with checkfree from CheckFree average of stages 1 and 3" in caplog.text
    assert "stage snapshot could not: no snapshot of stage 2 survived" in caplog.text


def test_checkfree_refuses_what_it_cannot_rebuild():
    calls: list[int] = []
    cf = CheckFreeRecovery(stage=2, num_stages=4, fetch=_fetcher(calls))
    use = lambda s: s  # noqa: E731
    assert "not lost" in cf.recover(Loss(stages={1}), Survivors(), use).reason
    assert "[3] are lost too" in cf.recover(Loss(stages={2, 3}), Survivors(), use).reason
    assert "step 6 is wanted" in cf.recover(Loss(step=6, stages={2}), Survivors(), use).reason
    edge = CheckFreeRecovery(stage=3, num_stages=4, fetch=_fetcher(calls))
    assert "CheckFree+ is off" in edge.recover(Loss(stages={3}), Survivors(), use).reason
    plus = CheckFreeRecovery(
        stage=0,
        num_stages=4,
        fetch=_fetcher(calls),
        replicated=lambda s: {"embed.weight": torch.ones(1)},
        options=CheckFreeOptions(plus=True),
        keys=["w", "b"],
    )
    calls.clear()
    got = plus.recover(Loss(stages={0}), Survivors(), lambda s: s.read(rank=0, allow_pickle=False))
    assert isinstance(got, Recovered) and got.strategy == "checkfree+"
    assert calls == [1] and sorted(got.value["model"]) == ["b", "embed.weight", "w"]
    assert torch.equal(got.value["model"]["w"], PREV["w"])

    def broken(stage):
        raise ConnectionError(f"stage {stage} is gone")

    down = CheckFreeRecovery(stage=2, num_stages=4, fetch=broken)
    out = down.recover(Loss(stages={2}), Survivors(), use)
    assert isinstance(out, CannotRecover) and "stage 1 is gone" in out.reason


# ------------------------------------------------------------------ the pipeline's wire format
def test_stage_bytes_are_sized_by_the_receiver_and_messages_parsed_as_hostile():
    from recoverkit.elastic.stage_wire import (
        Message,
        edge_layout,
        layout_of,
        nbytes,
        pack,
        shared_layout,
        unpack,
    )
    from recoverkit.errors import IntegrityError

    state = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "n": torch.tensor([7])}
    layout = layout_of(state)
    assert nbytes(layout) == 6 * 4 + 8
    back = unpack(pack(state, layout), layout)
    assert torch.equal(back["w"], state["w"]) and back["n"].item() == 7
    with pytest.raises(IntegrityError, match="31 bytes .* takes 32"):
        unpack(torch.zeros(31, dtype=torch.uint8), layout)
    with pytest.raises(IncompatibleCheckpointError, match="'w' is torch.float32 \\(3,\\)"):
        pack({"w": torch.zeros(3), "n": torch.tensor([7])}, layout)
    with pytest.raises(IncompatibleCheckpointError, match="no 'n' to send"):
        pack({"w": state["w"]}, layout)
    edge = torch.nn.ModuleDict({"block": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 3)})
    partner = torch.nn.ModuleDict({"block": torch.nn.Linear(2, 2)})
    assert [k for k, _, _ in shared_layout(edge, partner)] == ["block.weight", "block.bias"]
    assert [k for k, _, _ in edge_layout(edge, partner)] == ["head.weight", "head.bias"]
    msg = Message(1, 2, 3, 40, 0.5)
    assert Message.decode(msg.encode(), num_stages=4, what="t") == msg
    for bad in (
        [9, 0, 0, 0, 0],
        [1, 4, 0, 0, 0],
        [1, 0, 0, 0.5, 0],
        [1, 0, 0, 0, -1],
        [1, 0, 0, 0, math.nan],
    ):
        with pytest.raises(IntegrityError, match="t: "):
            Message.decode(torch.tensor(bad, dtype=torch.float64), num_stages=4, what="t")
    with pytest.raises(IntegrityError, match="malformed"):
        Message.decode(torch.zeros(4, dtype=torch.float64), num_stages=4, what="t")


def test_pipeline_options_are_validated():
    from recoverkit.elastic.pipeline import PipelineOptions

    assert PipelineOptions(num_stages=4, n_microbatches=4).schedule == "gpipe"
    with pytest.raises(ConfigError, match="num_stages"):
        PipelineOptions(num_stages=1, n_microbatches=4)
    with pytest.raises(ConfigError, match="CheckFree\\+ needs >= 4 stages and an even"):
        PipelineOptions(num_stages=4, n_microbatches=3, checkfree=CheckFreeOptions(plus=True))
    with pytest.raises(ConfigError, match="Schedule1F1B needs at least num_stages \\(4\\)"):
        PipelineOptions(
            num_stages=4, n_microbatches=4, schedule="1f1b", checkfree=CheckFreeOptions(plus=True)
        )
    assert PipelineOptions(num_stages=4, n_microbatches=4, schedule="1f1b").schedule == "1f1b"
    with pytest.raises(ConfigError, match="pg_timeout_s"):
        PipelineOptions(num_stages=4, n_microbatches=4, pg_timeout_s=0)
    with pytest.raises(ConfigError, match="lr_schedule must be a function of the step"):
        PipelineOptions(num_stages=4, n_microbatches=4, lr_schedule=0.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="replacement_timeout_s must be seconds in \\[0, 1e6\\)"):
        PipelineOptions(num_stages=4, n_microbatches=4, replacement_timeout_s=-1)
    with pytest.raises(ConfigError, match="admit_timeout_s"):
        PipelineOptions(num_stages=4, n_microbatches=4, admit_timeout_s=0)
    assert PipelineOptions(num_stages=4, n_microbatches=4).replacement_timeout_s == 0.0  # spares only


def test_the_swapped_path_keeps_embedding_first_and_head_last():
    from recoverkit.elastic.swap_schedule import swap_path

    assert swap_path(6) == [
        ("embed", 0),
        ("blocks", 1),
        ("blocks", 0),
        ("blocks", 2),
        ("blocks", 3),
        ("blocks", 5),
        ("blocks", 4),
        ("head", 5),
    ]
    with pytest.raises(ConfigError, match=">= 4 stages"):
        swap_path(3)


def test_a_stage_replica_carries_the_learning_rate_a_checkfree_rebuild_scaled():
    """The replica ring's optimizer entries hold each group's base rate: a stage rebuilt by
    CheckFree (1.1x) and later restored exactly from its replica keeps 1.1x; a hostile rate
    (not finite, <= 0, or for a group the optimizer lacks) is refused."""
    from recoverkit.elastic.stage_wire import (
        layout_of,
        load_optimizer_entries,
        optimizer_entries,
        optimizer_layout,
        pack,
        unpack,
    )
    from recoverkit.errors import IntegrityError
    from recoverkit.recovery.checkfree import fresh_optimizer

    def make(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=0.005)

    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    rebuilt = fresh_optimizer(make(module), lr_scale=1.1)
    module(torch.randn(4, 3)).sum().backward()
    rebuilt.step()
    entries = optimizer_entries(rebuilt)
    layout = optimizer_layout(module, make)  # what the receiver sizes from its own optimizer
    assert layout == layout_of(entries)
    arrived = unpack(pack(entries, layout), layout)
    restored = make(module)
    load_optimizer_entries(restored, arrived)
    assert restored.param_groups[0]["lr"] == pytest.approx(0.0055)
    assert restored.param_groups[0]["initial_lr"] == pytest.approx(0.0055)
    for key, value in rebuilt.state_dict()["state"][0].items():
        assert torch.equal(restored.state_dict()["state"][0][key], value), key
    for bad in ({"lr.0": torch.tensor(float("nan"), dtype=torch.float64)},
                {"lr.0": torch.tensor(0.0, dtype=torch.float64)},
                {"lr.3": torch.tensor(0.1, dtype=torch.float64)}):  # fmt: skip
        with pytest.raises(IntegrityError, match="learning rate"):
            load_optimizer_entries(make(module), {**arrived, **bad})
