"""The survivors' wait for a pipeline replacement (recoverkit.elastic.stage_join), without torchrun.

A gloo world of 2 (the survivors) and its real TCPStore. The wait is bounded: with nobody
joining, or only a hostile announcement (refused), or a joiner that acknowledges its
admission and never forms the group (the formation fails within ``admit_timeout_s``, the
survivors re-form from the old members), ``await_replacement`` raises
PipelineRecoveryError once ``timeout_s`` passed, naming the joiners it refused, and the
survivors are left with a working group. Giving up is agreed through the store: a survivor
whose own wait is longer gives up with the others. A malformed decision record is refused
by name. The joiner that does come is tested on the real
pipeline (test_checkfree_pipeline.py, mode ``replace``).

A rebuild that fails (every strategy refused) tells the survivors serving it, which raise
PipelineRecoveryError at once instead of waiting for a stage that will not come.
"""

from __future__ import annotations

import json
import time

SLACK_S = 30.0  # a loaded 2-core machine


def _wait(rank: int, world: int, case: str) -> dict:
    import torch
    import torch.distributed as dist

    from recoverkit.distributed.regroup import LAUNCH_RANKS, Membership, job_store
    from recoverkit.elastic.pipeline import PipelineRecoveryError
    from recoverkit.elastic.stage_join import await_replacement

    store = job_store(timeout_s=20)
    m = Membership.initial(store)
    if rank == 0 and case in ("hostile", "acks"):
        joiner = store.add(f"{m.namespace}/{LAUNCH_RANKS}", 1) - 1
        record = b"\xff{not json" if case == "hostile" else json.dumps({"pid": 12345, "host": "elsewhere"})
        store.set(f"{m.namespace}/joiners/{joiner}", record)
        if case == "acks":  # acknowledged on its behalf: it never forms the group
            store.set(f"{m.namespace}/g1/grow/ack/{joiner}", "1")
    dist.barrier()
    start = time.monotonic()
    out: dict = {}
    # "uneven": rank 1 would wait 600 s alone (past the test's bound); it gives up with rank 0
    timeout_s = 600.0 if case == "uneven" and rank == 1 else 1.0
    try:
        await_replacement(store, m, needed=1, scan_from=world, timeout_s=timeout_s, form_timeout_s=2.0,
                          pg_timeout_s=20.0, regroup_timeout_s=20.0, heartbeat=None)  # fmt: skip
        out["kind"] = "admitted"
    except PipelineRecoveryError as e:
        out.update(kind="gave up", message=str(e))
    out["waited_s"] = time.monotonic() - start
    t = torch.ones(1)
    dist.all_reduce(t)  # the group the survivors are left with works
    out["sum"] = float(t.item())
    return out


def _check(results: list[dict], refused: str) -> None:
    for res in results:
        assert res["kind"] == "gave up" and "no replacement joined within" in res["message"], res
        assert f"joiners refused: {refused}" in res["message"], res
        assert res["sum"] == 2.0, res
        assert res["waited_s"] < 1.0 + 2.0 + 2.0 + SLACK_S, res  # the wait, a formation, a regroup


def test_nobody_joins_and_the_wait_ends_at_its_bound():
    from tests.distributed.harness import run_world

    results = run_world(2, _wait, "nobody", timeout_s=120)
    print("\nwaited:", [round(r["waited_s"], 3) for r in results])
    _check(results, "[]")


def test_giving_up_is_agreed_so_a_survivor_with_a_longer_wait_gives_up_too():
    from tests.distributed.harness import run_world

    _check(run_world(2, _wait, "uneven", timeout_s=120), "[]")


def test_a_hostile_decision_or_request_is_refused_by_name():
    from datetime import timedelta

    import pytest
    import torch.distributed as dist

    from recoverkit.distributed.regroup import NAMESPACE, Membership
    from recoverkit.elastic.pipeline import PipelineRecoveryError
    from recoverkit.elastic.stage_join import await_replacement
    from tests.distributed.harness import free_port

    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=5))  # fmt: skip
    ns = f"{NAMESPACE}/1"
    m = Membership(namespace=ns, generation=0, members=(0, 1), launch_rank=0, previous=(0, 1))
    kw = dict(scan_from=2, timeout_s=1.0, form_timeout_s=1.0, pg_timeout_s=5.0, regroup_timeout_s=5.0, heartbeat=None)
    for bad in (b"\xff\xfe", b"[2]", b'{"joiners": [1], "next": 2}', b'{"joiners": [3, 2], "next": 4}',
                b'{"joiners": [], "next": 2}', b'{"joiners": [2], "next": 2}', b'{"joiners": [2], "next": 3, "x": 1}',
                b"x" * ((1 << 20) + 1)):  # fmt: skip
        store.set(f"{ns}/g1/pipeline/replacement", bad)
        with pytest.raises(PipelineRecoveryError, match="g1/pipeline/replacement: not a replacement decision"):
            await_replacement(store, m, needed=1, **kw)
    for needed in (0, -1, True, 10**6):
        with pytest.raises(ValueError, match="needed must be in"):
            await_replacement(store, m, needed=needed, **kw)


def test_a_hostile_announcement_is_refused_and_the_wait_ends_at_its_bound():
    from tests.distributed.harness import run_world

    _check(run_world(2, _wait, "hostile", timeout_s=120), "[2]")


def test_a_joiner_that_never_forms_the_group_is_dropped_and_the_survivors_regroup():
    from tests.distributed.harness import run_world

    results = run_world(2, _wait, "acks", timeout_s=120)
    print("\ngave up after:", [round(r["waited_s"], 3) for r in results])
    _check(results, "[2]")


def _rebuild_that_fails(rank: int, world: int) -> dict:
    """Rank 0 rebuilds stage 0 of 2 (an edge: plain CheckFree cannot, no replica): it tells
    rank 1, which serves stage 1, that it failed; rank 1 raises at once."""
    import torch

    from recoverkit.distributed.transport import ProcessGroupTransport
    from recoverkit.elastic.pipeline import PipelineRecoveryError
    from recoverkit.elastic.stage_recovery import rebuild_stage, serve_requests
    from recoverkit.recovery.checkfree import CheckFreeOptions

    def build(i: int) -> torch.nn.Module:
        torch.manual_seed(i)
        return torch.nn.Linear(4, 4)

    def make(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=0.01)

    transport = ProcessGroupTransport(timeout_s=30.0)
    start = time.monotonic()
    try:
        if rank == 0:
            rebuild_stage(transport, stage=0, num_stages=2, step=3, ranks={1: 1}, others=[1], module=build(0),
                          make_optimizer=make, replicate=False, template=build, options=CheckFreeOptions(),
                          timeout_s=30.0)  # fmt: skip
        else:
            serve_requests(transport, 0, num_stages=2, stage=1, module=build(1), step=3, norm=0.5, replica=None,
                           template=build, timeout_s=30.0)  # fmt: skip
        return {"kind": "returned"}
    except PipelineRecoveryError as e:
        return {"kind": "PipelineRecoveryError", "message": str(e), "s": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001 - the rebuilder's own error, reported
        return {"kind": type(e).__name__, "message": str(e)[:300], "s": time.monotonic() - start}


def test_a_rebuild_that_fails_fails_the_survivors_at_once():
    from tests.distributed.harness import run_world

    rebuilder, survivor = run_world(2, _rebuild_that_fails, timeout_s=120)
    assert rebuilder["kind"] != "returned", rebuilder
    assert survivor["kind"] == "PipelineRecoveryError", survivor
    # told by the rebuilder (a wait that timed out would be a PeerTimeoutError after 30 s)
    assert "rank 0 could not rebuild stage 0 at step 3" in survivor["message"], survivor
    print("\nthe survivor failed after", round(survivor["s"], 3), "s")
