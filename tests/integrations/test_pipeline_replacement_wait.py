"""The survivors' wait for a pipeline replacement (recoverkit.elastic.stage_join), without torchrun.

A gloo world of 2 (the survivors) and its real TCPStore. The wait is bounded: with nobody
joining, or only a hostile announcement (refused), or a joiner that acknowledges its
admission and never forms the group (the formation fails within ``admit_timeout_s``, the
survivors re-form from the old members), ``await_replacement`` raises
PipelineRecoveryError once ``timeout_s`` passed, naming the joiners it refused, and the
survivors are left with a working group. The joiner that does come is tested on the real
pipeline (test_checkfree_pipeline.py, mode ``replace``).
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
    if rank == 0 and case != "nobody":
        joiner = store.add(f"{m.namespace}/{LAUNCH_RANKS}", 1) - 1
        record = b"\xff{not json" if case == "hostile" else json.dumps({"pid": 12345, "host": "elsewhere"})
        store.set(f"{m.namespace}/joiners/{joiner}", record)
        if case == "acks":  # acknowledged on its behalf: it never forms the group
            store.set(f"{m.namespace}/g1/grow/ack/{joiner}", "1")
    dist.barrier()
    start = time.monotonic()
    out: dict = {}
    try:
        await_replacement(store, m, needed=1, scan_from=world, timeout_s=1.0, form_timeout_s=2.0,
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
        assert res["kind"] == "gave up" and "no replacement joined within 1.0 s" in res["message"], res
        assert f"joiners refused: {refused}" in res["message"], res
        assert res["sum"] == 2.0, res
        assert res["waited_s"] < 1.0 + 2.0 + 2.0 + SLACK_S, res  # the wait, a formation, a regroup


def test_nobody_joins_and_the_wait_ends_at_its_bound():
    from tests.distributed.harness import run_world

    results = run_world(2, _wait, "nobody", timeout_s=120)
    print("\nwaited:", [round(r["waited_s"], 3) for r in results])
    _check(results, "[]")


def test_a_hostile_announcement_is_refused_and_the_wait_ends_at_its_bound():
    from tests.distributed.harness import run_world

    _check(run_world(2, _wait, "hostile", timeout_s=120), "[2]")


def test_a_joiner_that_never_forms_the_group_is_dropped_and_the_survivors_regroup():
    from tests.distributed.harness import run_world

    results = run_world(2, _wait, "acks", timeout_s=120)
    print("\ngave up after:", [round(r["waited_s"], 3) for r in results])
    _check(results, "[2]")
