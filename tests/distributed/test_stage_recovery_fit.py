"""CheckFree's fit between real processes (gloo): :func:`rebuild_stage` of an interior stage
against :func:`serve_requests` on its two neighbours, with the neighbours' recorded pairs as
they are or made wrong on the sender's side.

Three ranks, three stages of the same ``Linear(4, 4)``: rank 1 rebuilds stage 1, ranks 0 and
2 serve stages 0 and 2 (stage 0's outputs are stage 1's inputs, stage 2's inputs its
outputs). Each rank reports what it returned or raised, and how long it took; every wait in
the protocol is bounded by TIMEOUT_S, and the assertions ask for much less: a refusal must
keep both ends in step, not be sorted out by a timeout.
"""

from __future__ import annotations

import time

import torch

from tests.distributed.harness import run_world

TIMEOUT_S = 20.0
STEP, ROWS, COUNT = 3, 2, 2


def _stage(i: int) -> torch.nn.Module:
    torch.manual_seed(10 + i)
    return torch.nn.Linear(4, 4)


def _pairs(i: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(20 + i)
    return [torch.randn(ROWS, 4, generator=g) for _ in range(COUNT)]


def _world(rank: int, world: int, case: str) -> dict:
    import torch.distributed as dist

    from recoverkit.distributed.transport import ProcessGroupTransport
    from recoverkit.elastic.stage_recovery import (
        Activations,
        FitPlan,
        rebuild_stage,
        serve_requests,
    )
    from recoverkit.recovery.checkfree import CheckFreeOptions

    transport = ProcessGroupTransport(group=dist.group.WORLD, timeout_s=TIMEOUT_S)
    options = CheckFreeOptions(distill_steps=8)

    def make_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=1e-2)

    start = time.monotonic()
    try:
        if rank == 1:
            got = rebuild_stage(
                transport,
                stage=1,
                num_stages=3,
                step=STEP,
                ranks={0: 0, 2: 2},
                others=[0, 2],
                module=_stage(1),
                make_optimizer=make_optimizer,
                replicate=False,
                options=options,
                timeout_s=TIMEOUT_S,
                template=_stage,
                fit=FitPlan(steps=8, lr_factor=1.0, count=COUNT, rows=(ROWS,) * COUNT),
            )
            value = got.source.describe()
        else:
            pairs = _pairs(rank)
            if rank == 0 and case == "rows":  # more rows than the step's split: a bad header
                pairs = [torch.randn(ROWS + 1, 4) for _ in range(COUNT)]
            if rank == 0 and case == "width":  # the header passes; the stage cannot take them
                pairs = [torch.randn(ROWS, 5) for _ in range(COUNT)]
            empty: tuple[torch.Tensor, ...] = ()
            recorded = Activations(
                rank, STEP, empty if rank == 0 else tuple(pairs), tuple(pairs) if rank == 0 else empty
            )
            value = serve_requests(
                transport,
                1,
                num_stages=3,
                stage=rank,
                module=_stage(rank),
                step=STEP,
                norm=0.5,
                replica=None,
                template=_stage,
                timeout_s=TIMEOUT_S,
                activations=recorded,
                count=COUNT,
            )
        return {"value": value, "s": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001 - reported, with the time it took
        return {"error": type(e).__name__, "message": str(e), "s": time.monotonic() - start}


def test_honest_pairs_are_served_and_fitted():
    first, rebuilt, last = run_world(3, _world, "honest", timeout_s=120)
    assert "then fitted to the lost stage's last step in 8 steps" in rebuilt["value"], rebuilt
    assert sorted(first["value"]) == ["neighbour of stage 1", "recorded outputs for stage 1"]
    assert sorted(last["value"]) == ["neighbour of stage 1", "recorded inputs for stage 1"]


def test_a_refused_header_keeps_both_ends_in_step():
    """Stage 0 sends a header whose rows differ from the rebuilder's split: the rebuild fails
    (the header names what is wrong) and every member learns it at once. Fails without the
    rebuilder's verdict on the header: stage 0 then sits in its payload send, the FAILED to
    it waits behind that, the transport breaks and stage 2 is never told; all three wait out
    TIMEOUT_S."""
    first, rebuilt, last = run_world(3, _world, "rows", timeout_s=120)
    assert rebuilt.get("error") == "IntegrityError", rebuilt
    assert "micro-batch 0 has 3 rows, this step's split gives 2" in rebuilt["message"], rebuilt
    for served in (first, last):
        assert served.get("error") == "PipelineRecoveryError", served
        assert "could not rebuild stage 1 at step 3" in served["message"], served
    for who in (rebuilt, first, last):
        assert who["s"] < TIMEOUT_S / 2, (rebuilt, first, last)


def test_pairs_the_stage_cannot_take_keep_the_plain_average():
    """Stage 0's outputs are 5 wide for a stage that takes 4 (a header that passes: only the
    rows are known to the rebuilder): the stage's forward raises inside the fit. What
    rebuild_stage promises for a fit that does not fit the stage: the plain average, the
    reason in its description, DONE to every member (fails without catching the forward's
    RuntimeError: the rebuild failed instead)."""
    first, rebuilt, last = run_world(3, _world, "width", timeout_s=120)
    assert "value" in rebuilt, rebuilt
    assert rebuilt["value"].startswith("CheckFree average of stages 0 and 2"), rebuilt
    assert "not fitted: the fit failed" in rebuilt["value"], rebuilt
    assert sorted(first["value"]) == ["neighbour of stage 1", "recorded outputs for stage 1"]
    assert sorted(last["value"]) == ["neighbour of stage 1", "recorded inputs for stage 1"]
