"""The convergence benchmark's pipeline simulator (bench/bench_checkfree.py): CheckFree+'s swap
schedule and the rebuild of a lost stage, checked against the same computation done by hand.

* a swapped (odd) micro-batch's gradient equals that of running the blocks in the swapped order
  by hand, and differs from the unswapped order's;
* a whole simulated step (two micro-batches, per-stage clipping with the norm recorded, AdamW)
  gives the parameters of the same step written out by hand;
* a lost interior stage becomes the gradient-norm weighted average of its neighbours; a lost
  edge stage copies its swap partner and the replicated (de)embedding under CheckFree+, and is
  re-initialised at random under CheckFree alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bench._llama import ModelSpec, block_state, edge_state
from bench.bench_checkfree import Sim
from recoverkit.recovery.checkfree import CheckFreeOptions, average_neighbours, clip_and_record

SPEC = ModelSpec(stages=6, layers_per_stage=1, dim=16, heads=2, ffn=40, seq_len=12)


def _sim(swap: bool = True) -> Sim:
    return Sim(SPEC, seed=3, lr=1e-2, warmup=1, swap=swap)


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, SPEC.seq_len + 1), generator=torch.Generator().manual_seed(seed))


def _by_hand(stages, batch: torch.Tensor, order: list[int]) -> torch.Tensor:
    x = stages[0].embed(batch[:, :-1])
    for k in order:
        for blk in stages[k].blocks:
            x = blk(x, stages[k].cos, stages[k].sin)
    logits = stages[-1].head(stages[-1].norm(x))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _grads(stages) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": p.grad.clone() for k, s in enumerate(stages) for n, p in s.named_parameters()}


def test_the_swap_schedule_pairs_each_edge_with_its_neighbour_on_odd_micro_batches():
    sim = _sim()
    assert sim.order(0) == sim.order(2) == [0, 1, 2, 3, 4, 5]
    assert sim.order(1) == sim.order(3) == [1, 0, 2, 3, 5, 4]
    assert _sim(swap=False).order(1) == [0, 1, 2, 3, 4, 5]


def test_swapped_micro_batch_gradient_equals_the_blocks_run_in_that_order_by_hand():
    sim = _sim()
    hand = copy.deepcopy(sim.stages)
    batch = _batch(1)
    sim.loss(batch, sim.order(1)).backward()
    _by_hand(hand, batch, [1, 0, 2, 3, 5, 4]).backward()
    got, want = _grads(sim.stages), _grads(hand)
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name
    # and the swap matters: the unswapped order gives another gradient
    plain = copy.deepcopy(hand)
    for s in plain:
        s.zero_grad(set_to_none=True)
    _by_hand(plain, batch, [0, 1, 2, 3, 4, 5]).backward()
    other = _grads(plain)
    assert not torch.equal(other["0.blocks.0.w2.weight"], want["0.blocks.0.w2.weight"])
    assert not torch.equal(other["5.blocks.0.wq.weight"], want["5.blocks.0.wq.weight"])


def test_a_simulated_step_equals_the_same_step_by_hand():
    sim = _sim()
    hand = copy.deepcopy(sim.stages)
    opts = [torch.optim.AdamW(s.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01) for s in hand]
    mbs = [_batch(10), _batch(11)]
    sim.train_step(0, mbs)
    for m, order in enumerate(([0, 1, 2, 3, 4, 5], [1, 0, 2, 3, 5, 4])):
        (_by_hand(hand, mbs[m], order) / 2).backward()
    norms = [clip_and_record(s.parameters(), 1.0) for s in hand]
    for o in opts:
        o.step()
    assert sim.norms == norms and all(n > 0 for n in norms)
    for k, (a, b) in enumerate(zip(sim.stages, hand)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), f"stage {k} {name}"


def _trained(steps: int = 2) -> Sim:
    sim = _sim()
    sim.refresh_replica()
    for step in range(steps):
        sim.train_step(step, [_batch(20 + 2 * step), _batch(21 + 2 * step)])
    return sim


def test_a_lost_interior_stage_is_the_norm_weighted_average_of_its_neighbours():
    sim = _trained()
    sim.norms[1], sim.norms[3] = 0.25, 0.75
    prev, nxt = block_state(sim.stages[1]), block_state(sim.stages[3])
    old_opt = sim.opts[2]
    sim.rebuild(2, "checkfree", 1.1)
    got = block_state(sim.stages[2])
    assert got.keys() == prev.keys()
    want = average_neighbours(prev, nxt, 0.25, 0.75, CheckFreeOptions())
    a, b = 0.75 + 1e-4, 0.25 + 1e-4  # the next stage weighs a, the previous b
    for key in got:
        assert torch.equal(got[key], want[key]), key
        assert torch.allclose(got[key], (a * nxt[key] + b * prev[key]) / (a + b), atol=1e-6), key
    assert sim.lr_scale[2] == 1.1 and sim.opts[2] is not old_opt and len(sim.opts[2].state) == 0
    assert all(p is q for p, q in zip(sim.opts[2].param_groups[0]["params"], sim.stages[2].parameters()))
    uniform = _trained()
    uniform.norms[1], uniform.norms[3] = 0.25, 0.75
    uniform.rebuild(2, "uniform", 1.1)
    w = "blocks.0.wq.weight"
    assert torch.allclose(block_state(uniform.stages[2])[w], (prev[w] + nxt[w]) / 2, atol=1e-6)


@pytest.mark.parametrize("edge,partner", [(0, 1), (5, 4)])
def test_checkfree_plus_rebuilds_an_edge_from_its_partner_and_the_replica(edge, partner):
    sim = _trained()
    replica = {k: v.clone() for k, v in sim.replica[edge].items()}
    live = edge_state(sim.stages[edge])
    assert any(not torch.equal(live[k], replica[k]) for k in live)  # trained since the replica was taken
    sim.rebuild(edge, "plus", 1.1)
    got = sim.stages[edge].state_dict()
    for key, value in block_state(sim.stages[partner]).items():
        assert torch.equal(got[key], value), key
    for key, value in replica.items():
        assert torch.equal(got[key], value), key
    assert set(got) == set(block_state(sim.stages[partner])) | set(replica)


def test_checkfree_alone_reinitialises_a_lost_edge():
    sim = _trained()
    before = block_state(sim.stages[0])
    sim.rebuild(0, "checkfree", 1.1)
    got = block_state(sim.stages[0])
    neighbour = block_state(sim.stages[1])
    w = "blocks.0.wq.weight"
    assert not torch.equal(got[w], before[w]) and not torch.equal(got[w], neighbour[w])
    assert got[w].std().item() == pytest.approx(0.02, rel=0.3)  # a fresh init, not a copy


def test_recorded_pairs_are_what_the_neighbours_hold_in_pipeline_order_only():
    """With ``record`` a step keeps each stage's (input, output) per micro-batch: a stage's
    output is its next stage's input (what that neighbour received), the first stage's input
    the embedding; under CheckFree+ only the micro-batches run in pipeline order are kept (the
    swapped ones did not pass between these neighbours)."""
    for swap, kept in ((False, 2), (True, 1)):
        sim = Sim(SPEC, seed=3, lr=1e-2, warmup=1, swap=swap, record=True)
        embed = copy.deepcopy(sim.stages[0])
        batches = [_batch(30), _batch(31)]
        sim.train_step(0, batches)
        assert [len(p) for p in sim.pairs] == [kept] * SPEC.stages
        for k in range(SPEC.stages - 1):
            for (_, out), (given, _) in zip(sim.pairs[k], sim.pairs[k + 1]):
                assert torch.equal(out, given)
        with torch.no_grad():
            assert torch.equal(sim.pairs[0][0][0], embed.embed_tokens(batches[0][:, :-1]))
    assert _sim().pairs == []  # nothing kept without record


def test_a_rebuilt_interior_stage_is_fitted_to_the_lost_stages_last_step():
    """``distill_steps``: after the average, the rebuilt stage maps the lost stage's last-step
    inputs closer to its outputs than the average did; edge stages and runs without pairs are
    not fitted."""
    sim = Sim(SPEC, seed=3, lr=1e-2, warmup=1, swap=False, record=True)
    for step in range(3):
        sim.train_step(step, [_batch(40 + 2 * step), _batch(41 + 2 * step)])
    pairs = sim.pairs[2]
    plain = copy.deepcopy(sim)
    plain.rebuild(2, "checkfree", 1.1)
    did = sim.rebuild(2, "checkfree", 1.1, distill_steps=30, lr=1e-2)
    assert "fitted to the lost stage's last step in 30 steps" in did

    def err(s: Sim) -> float:
        with torch.no_grad():
            return sum(float(F.mse_loss(s.stages[2].run_blocks(x), y)) for x, y in pairs)

    assert err(sim) < err(plain) / 2
    assert sim.lr_scale[2] == 1.1 and len(sim.opts[2].state) == 0  # the training optimizer is fresh
    assert "fitted" not in sim.rebuild(0, "checkfree", 1.1, distill_steps=30, lr=1e-2)
    assert "fitted" not in _trained().rebuild(2, "checkfree", 1.1, distill_steps=30, lr=1e-2)
