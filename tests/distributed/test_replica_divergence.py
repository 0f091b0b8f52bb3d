"""Data-parallel replicas compared by fingerprint (issue 12's online check): a real 2-rank gloo
world of DDP; a drifted parameter or optimizer moment is named, with the rank that drifted,
on every rank alike; agreeing replicas report nothing."""

from __future__ import annotations

import logging

import pytest
import torch

from recoverkit.health.divergence import ReplicaCheck, fingerprint
from tests.distributed.harness import run_world


def _world(rank: int, world: int, drift: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(1, 3):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=torch.Generator().manual_seed(step * 10 + rank))).sum().backward()
        opt.step()
    state = {"model": model.module, "optim": opt, "extra": torch.arange(4.0)}
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: messages.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("recoverkit").addHandler(handler)
    check = ReplicaCheck(every_steps=2, timeout_s=30)
    before = check.check(2, state)
    if rank == 1 and drift == "param":
        with torch.no_grad():
            w = model.module[0].weight
            bits = w.view(torch.int32)
            bits[3, 5] ^= 1  # one bit of one float, as memory corruption would
    if rank == 1 and drift == "moment":
        opt.state[model.module[2].bias]["exp_avg_sq"][0] += 1e-3
    if drift == "none":  # BatchNorm's running statistics differ between DDP's broadcasts
        out_bn = ReplicaCheck(every_steps=1, exclude=()).check(1, state)
    if rank == 0 and drift == "names":
        state["only-on-rank-0"] = torch.zeros(2)
    not_due = check.check(3, state)
    after = check.check(4, state)
    return {
        "bn": [(d.name, d.ranks) for d in out_bn] if drift == "none" else None,
        "before": before, "not_due": not_due,
        "after": [(d.name, d.ranks) for d in after or []],
        "logged": [m for m in messages if "diverged" in m and "step 4" in m],
    }


@pytest.mark.parametrize("drift", ["none", "param", "moment", "names"])
def test_a_drifted_replica_is_named_on_every_rank(drift):
    out = run_world(2, _world, drift)
    want = {
        "none": [],
        "param": [("model/0.weight", (1,))],
        "moment": [("optim/state/5/exp_avg_sq", (1,))],  # the 6th parameter: the last bias
        "names": [("(the set of replicated tensors)", (1,))],  # a tie: the lowest rank's is kept
    }[drift]
    for o in out:
        assert o["before"] == [] and o["not_due"] is None
        assert o["after"] == want, o
        assert bool(o["logged"]) == bool(want)
        if want:
            assert want[0][0] in o["logged"][0] and "ranks [1]" in o["logged"][0]
        if drift == "none":  # compared when asked: rank 1's differ from rank 0's (a tie)
            assert o["bn"] == [("model/1.running_mean", (1,)), ("model/1.running_var", (1,))], o["bn"]


def test_fingerprints_see_one_bit_dtype_and_shape():
    t = torch.arange(12, dtype=torch.float32)
    same = fingerprint(t.clone())
    assert fingerprint(t) == same
    flipped = t.clone()
    flipped.view(torch.int32)[7] ^= 1 << 30
    assert fingerprint(flipped) != same
    assert fingerprint(t.view(3, 4)) != same  # same bytes, another shape
    assert fingerprint(t.view(torch.int32)) != same  # same bytes, another dtype
    assert fingerprint(torch.tensor([], dtype=torch.bfloat16)) != fingerprint(torch.tensor([]))
    assert 0 <= fingerprint(t.to(torch.bfloat16)) < 1 << 64


def test_bad_settings_are_refused():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="every_steps"):
            ReplicaCheck(every_steps=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s"):
        ReplicaCheck(timeout_s=0)
