"""Gradients normalized by the global sample count, in real gloo worlds of 4, 3 and 2 ranks.

The same float64 model (dropout on, keyed to the micro-batch), data and
:class:`GlobalBatchSampler` are trained for 20 steps at each world size, with each gradient
path: DDP with :func:`sum_allreduce_hook`, :func:`allreduce_grads_sum`, and the deterministic
:class:`OrderedGradSum` (plain, and over a DDP model run under ``no_sync``). The world-4 run also changes its world mid-run (4 ranks, then 3 on a
subgroup: the shape of a shrink). Checked against the failure-free 4-rank run:

* deterministic mode: losses and final parameters bit-identical at every world size and
  across the world change;
* SUM all-reduce (DDP hook and helper): within 1e-12 relative (the figure measured is printed);
* "shrink the batch" (rank 3's share dropped, mean over the 3 live ranks) and training
  without keyed random streams: visibly different.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_world

STEPS, SWITCH_AT = 20, 7
NUM_SAMPLES, GLOBAL_BATCH, MICRO_BATCH, SEED = 120, 24, 4, 3


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_SAMPLES, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 1, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ w / 2) + 0.05 * torch.randn(NUM_SAMPLES, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 32),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(32, 1),
    ).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    return x, y, model, opt


def _train(rank, mode, plan):
    """Train ``STEPS`` steps. ``plan[k]`` is ``(group, world, rank_in_group)`` for step k, or
    ``None`` when this rank is not in the world any more. Returns (losses, params)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from recoverkit.distributed.global_grad import (
        OrderedGradSum,
        allreduce_grads_sum,
        grad_sync,
        sum_allreduce_hook,
    )
    from recoverkit.state.global_batch import GlobalBatchSampler
    from recoverkit.state.keyed_rng import keyed_rng

    x, y, model, opt = _setup()
    torch.manual_seed(100 + rank)  # every rank's own outer stream differs, as in a real job
    sampler = GlobalBatchSampler(NUM_SAMPLES, GLOBAL_BATCH, MICRO_BATCH, seed=SEED)
    net = model
    if mode in ("ddp", "ddp_ordered"):
        net = DDP(model)
        if mode == "ddp":
            net.register_comm_hook(None, sum_allreduce_hook)
    losses = []
    for step in range(STEPS):
        if plan[step] is None:
            break
        group, world, me = plan[step]
        share = 4 if mode == "shrink" else world  # shrink: rank 3's share of the 4-rank plan is lost
        mbs = sampler.assign(sampler.step, me, share)
        G = sampler.batch_size(sampler.step)
        local = sum(len(mb) for mb in mbs)
        norm = local if mode == "shrink" else G
        ordered = (
            OrderedGradSum(net.parameters(), group)
            if mode in ("ordered", "unkeyed", "ddp_ordered")
            else None
        )
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, mb in enumerate(mbs):
            rows = list(mb.samples)
            # ordered with DDP: every micro-batch under no_sync(), OrderedGradSum reduces
            last = i == len(mbs) - 1 and mode != "ddp_ordered"
            with grad_sync(net, last=last):
                if mode == "unkeyed":
                    out = net(x[rows])
                else:
                    with keyed_rng(SEED, *mb.key):
                        out = net(x[rows])
                loss = ((out - y[rows]) ** 2).sum() / norm
                loss.backward()
            if ordered is not None:
                ordered.add(mb.index, loss.detach())
            else:
                loss_sum += loss.detach()
        if ordered is not None:
            step_loss = ordered.reduce(len(sampler.micro_batches(sampler.step)))
        else:
            if mode in ("sum", "shrink"):
                allreduce_grads_sum(model.parameters(), group, mode="shrink" if mode == "shrink" else "global")
            dist.all_reduce(loss_sum, group=group)
            step_loss = loss_sum.item() / (world if mode == "shrink" else 1)
        losses.append(step_loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sampler.advance()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()
    return losses, params


def _world(rank, world):
    import torch.distributed as dist

    torch.set_num_threads(1)
    same = [(None, world, rank)] * STEPS
    out = {mode: _train(rank, mode, same) for mode in ("ordered", "sum", "ddp", "ddp_ordered")}
    if world in (3, 4):
        out["unkeyed"] = _train(rank, "unkeyed", same)
    if world == 3:
        out["shrink"] = _train(rank, "shrink", same)
    if world == 4:
        sub = dist.new_group([0, 1, 2])
        after = (sub, 3, rank) if rank < 3 else None
        plan = [(None, 4, rank)] * SWITCH_AT + [after] * (STEPS - SWITCH_AT)
        for mode in ("ordered", "sum"):
            out["switch_" + mode] = _train(rank, mode, plan)
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def runs():
    return {w: run_world(w, _world, timeout_s=300) for w in (4, 3, 2)}


def _rel(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


def test_ranks_agree_and_training_learns(runs):
    for world, ranks in runs.items():
        for mode, (losses, params) in ranks[0].items():
            assert len(losses) == STEPS
            for r in range(1, world):
                if mode.startswith("switch") and r == 3:
                    continue
                assert _rel(ranks[r][mode][1], params) <= 1e-15, (world, mode, r)
    ref_losses = runs[4][0]["ordered"][0]
    assert sum(ref_losses[-5:]) < 0.5 * sum(ref_losses[:5]), ref_losses


def test_deterministic_mode_is_bit_identical_at_every_world_size(runs):
    ref = runs[4][0]["ordered"]
    for world in (4, 3, 2):
        assert runs[world][0]["ordered"] == ref, world
        assert runs[world][0]["ddp_ordered"] == ref, world  # DDP under no_sync, reduced in order
    assert runs[4][0]["switch_ordered"] == ref  # 4 ranks for 7 steps, then 3


def test_sum_allreduce_stays_within_1e12_of_the_failure_free_run(runs):
    ref_losses, ref_params = runs[4][0]["ordered"]
    worst = {}
    for world in (4, 3, 2):
        for mode in ("sum", "ddp"):
            losses, params = runs[world][0][mode]
            worst[(world, mode)] = max(
                _rel(params, ref_params), max(_rel([a], [b]) for a, b in zip(losses, ref_losses))
            )
    losses, params = runs[4][0]["switch_sum"]
    worst[("4->3", "sum")] = max(_rel(params, ref_params), _rel(losses, ref_losses))
    print("max relative deviation from the deterministic 4-rank run:", worst)
    assert max(worst.values()) <= 1e-12, worst


def test_shrinking_the_batch_or_unkeyed_dropout_visibly_diverges(runs):
    ref_losses, ref_params = runs[4][0]["ordered"]
    losses, params = runs[3][0]["shrink"]
    print("shrink-the-batch relative deviation: params", _rel(params, ref_params), "losses", _rel(losses, ref_losses))
    assert _rel(params, ref_params) > 1e-3 and _rel(losses, ref_losses) > 1e-3
    # without keyed streams a micro-batch's dropout depends on the rank that runs it
    a, b = runs[4][0]["unkeyed"], runs[3][0]["unkeyed"]
    assert _rel(a[1], b[1]) > 1e-6


def _refusals(rank, world):
    import torch.distributed as dist

    from recoverkit.distributed.global_grad import OrderedGradSum, allreduce_grads_sum

    torch.set_num_threads(1)
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    out = {}
    # a rank that ran no micro-batch (no .grad) takes part with zeros
    if rank == 0:
        p.grad = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    allreduce_grads_sum([p])
    out["idle"] = p.grad.tolist()
    if rank == 1:
        p.grad = None  # again a rank without micro-batches: the mean over 2 live ranks halves
    allreduce_grads_sum([p], mode="shrink")
    out["shrink"] = p.grad.tolist()
    try:
        allreduce_grads_sum([p], mode="mean")
    except ValueError as e:
        out["mode"] = str(e)
    errors = []
    for case in ("duplicate", "missing", "too_many", "ok"):
        ordered = OrderedGradSum([p])
        mine = {
            "duplicate": [0],  # both ranks claim micro-batch 0
            "missing": [rank * 2],  # nobody runs 1 and 3
            "too_many": [0, 1, 2] if rank == 0 else [],
            "ok": [rank, rank + 2],
        }[case]
        for i in mine:
            p.grad = torch.full((3,), float(i + 1), dtype=torch.float64)
            ordered.add(i, loss=float(i))
        try:
            out["loss"] = ordered.reduce(4 if case != "too_many" else 2)
            out["sum"] = p.grad.tolist()
        except RuntimeError as e:
            errors.append((case, str(e)))
    out["errors"] = errors
    dist.barrier()
    return out


def test_reduction_helpers_refuse_a_wrong_plan_on_every_rank():
    for res in run_world(2, _refusals, timeout_s=120):
        assert res["idle"] == [1.0, 2.0, 4.0] and res["shrink"] == [0.5, 1.0, 2.0]
        assert "mode must be" in res["mode"]
        assert res["loss"] == 0.0 + 1.0 + 2.0 + 3.0 and res["sum"] == [10.0] * 3
        cases = dict(res["errors"])
        assert sorted(cases) == ["duplicate", "missing", "too_many"]
        assert "already sent" in cases["duplicate"]
        assert "[1, 3]" in cases["missing"]
        assert "holds 3 micro-batches; the step has 2" in cases["too_many"]


def _late_peer(rank, world):
    import time

    from recoverkit.distributed.global_grad import OrderedGradSum

    torch.set_num_threads(1)
    p = torch.nn.Parameter(torch.zeros(2))
    if rank == 1:
        time.sleep(6)  # never joins the reduction
        return None
    ordered = OrderedGradSum([p], timeout_s=1.0)
    p.grad = torch.ones(2)
    ordered.add(0)
    try:
        ordered.reduce(1)
    except TimeoutError as e:
        return str(e)
    return "no error"


def test_a_peer_that_never_reduces_is_a_timeout_not_a_hang():
    res = run_world(2, _late_peer, timeout_s=120, final_barrier=False)
    assert res[0] is not None and "did not complete within 1.0 s" in res[0], res


def _abandoned(rank, world):
    """Rank 1 never joins; rank 0's waits are cut short by ``abort()`` (group timeout: 60 s)."""
    import time

    from recoverkit.distributed.global_grad import OrderedGradSum, allreduce_grads_sum
    from recoverkit.errors import PeerLostError

    torch.set_num_threads(1)
    if rank == 1:
        time.sleep(4)  # never joins the reductions
        return None
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    asked = {"n": 0}
    start = time.monotonic()

    def abort():
        asked["n"] += 1
        if time.monotonic() - start < 0.3:
            return None
        return "launch rank(s) [1] stopped beating"

    out = {}
    p.grad = torch.ones(2, dtype=torch.float64)
    try:
        allreduce_grads_sum([p], abort=abort, poll_s=0.05)
    except PeerLostError as e:
        # from the moment abort() would name a reason to the error: at most about one poll
        out["sum"] = (type(e).__name__, str(e), asked["n"], time.monotonic() - start - 0.3)
    ordered = OrderedGradSum([p], abort=abort, poll_s=0.05)
    p.grad = torch.ones(2, dtype=torch.float64)
    ordered.add(0)
    try:
        ordered.reduce(1)
    except PeerLostError as e:
        out["ordered"] = (type(e).__name__, str(e))
    out["total_s"] = time.monotonic() - start
    return out


def test_abort_cuts_a_pending_wait_short_with_its_reason():
    """The far side of a ring waits for a send that no dead peer's reset ever ends: its
    ``abort()`` (a heartbeat's verdict) gives the wait up, long before the group's timeout."""
    res = run_world(2, _abandoned, timeout_s=120, final_barrier=False)[0]
    name, message, asked, after_s = res["sum"]
    assert name == "PeerLostError" and asked > 1, res  # polled, then given up
    assert message == "the gradient all-reduce given up while pending: launch rank(s) [1] stopped beating"
    assert res["ordered"][0] == "PeerLostError" and "stopped beating" in res["ordered"][1], res
    assert "all-gather given up while pending" in res["ordered"][1], res
    assert res["total_s"] < 30, res  # no hang: the group's timeout is 60 s
    print(f"\nabort: given up {after_s:.4f} s after abort() had a reason to name (poll 0.05 s); both waits in {res['total_s']:.3f} s")


def _reset(rank, world, how):
    import os
    import signal
    import time

    from recoverkit.distributed.global_grad import allreduce_grads_sum

    torch.set_num_threads(1)
    if rank == 1:
        time.sleep(0.5)  # rank 0 is waiting in the all-reduce by now
        os.kill(os.getpid(), signal.SIGKILL)
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p.grad = torch.ones(2, dtype=torch.float64)
    kw = {"abort": lambda: None, "poll_s": 0.05} if how == "polled" else {}
    start = time.monotonic()
    try:
        allreduce_grads_sum([p], timeout_s=30.0, **kw)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                "timeout": isinstance(e, TimeoutError), "message": str(e)[:200], "s": time.monotonic() - start}
    return "no error"


@pytest.mark.parametrize("how", ["polled", "one wait"])
def test_a_peers_connection_reset_is_its_own_error_not_a_timeout(how):
    res = run_world(2, _reset, how, timeout_s=120, final_barrier=False)[0]
    assert isinstance(res, dict), res
    assert not res["timeout"] and "RuntimeError" in res["mro"], res  # the backend's own error
    assert "did not complete within" not in res["message"], res
    print(f"\nreset ({how}): {res['type']} after {res['s']:.3f} s: {res['message'][:80]}")


def _ddp_abandoned(rank, world):
    """A DDP model with the SUM hook whose waits ask ``abort()``: rank 1 never runs its backward."""
    import time

    from torch.nn.parallel import DistributedDataParallel

    from recoverkit.distributed.global_grad import SumHookState, sum_allreduce_hook

    torch.set_num_threads(1)
    start = time.monotonic()

    def abort():
        return "launch rank(s) [1] stopped beating" if time.monotonic() - start > 0.3 else None

    ddp = DistributedDataParallel(torch.nn.Linear(3, 1).double())
    ddp.register_comm_hook(SumHookState(abort=abort, poll_s=0.05), sum_allreduce_hook)
    if rank == 1:
        time.sleep(4)  # never reduces
        return None
    start = time.monotonic()
    try:
        ddp(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
    except RuntimeError as e:
        return {"message": str(e)[:300], "s": time.monotonic() - start}
    return "no error"


def test_the_ddp_sum_hook_can_be_cut_short_and_refuses_bad_waits():
    from recoverkit.distributed.global_grad import SumHookState

    res = run_world(2, _ddp_abandoned, timeout_s=120, final_barrier=False)[0]
    assert isinstance(res, dict), res
    assert "the DDP gradient all-reduce given up while pending: launch rank(s) [1] stopped beating" in res["message"], res
    assert res["s"] < 30, res  # no hang: the group's timeout is 60 s
    print(f"\nDDP hook: backward given up after {res['s']:.3f} s (abort() names a reason from 0.3 s)")
    for bad in ({"poll_s": 0}, {"poll_s": True}, {"timeout_s": -1.0}, {"timeout_s": float("nan")}):
        with pytest.raises(ValueError, match="poll_s|timeout_s"):
            SumHookState(**bad)
