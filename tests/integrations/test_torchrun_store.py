"""Commit coordination on a store that outlives the workers, as torchrun's rendezvous store does.

torchrun's agent hosts the store its workers share and keeps it, keys included, across worker
restarts. Here the test process plays the agent: it hosts a TCPStore, and two "attempts" of a
2-rank gloo world (the second after a rank of the first was SIGKILLed mid-save) coordinate
through it. The second attempt must agree on one new run id and commit every save on both
ranks, never reading the first attempt's answers. And over many saves (failed ones included)
the store's key count must come back to where it started: the keys of finished saves are
dropped, and a failed save raises CommitError on every rank.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from tests.distributed.harness import run_world

HOST = "127.0.0.1"


def _client(port: int):  # noqa: ANN202 - a torch TCPStore
    from torch.distributed import TCPStore

    return TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=60))


def _checkpointer(root: str, store, **kw):  # noqa: ANN001, ANN202
    from recoverkit import Checkpointer, CheckpointOptions
    from recoverkit.distributed.coordinator import attempt_coordinator

    opts = CheckpointOptions(commit_timeout_s=kw.pop("timeout_s", 30.0))
    return Checkpointer(root, options=opts, coordinator=attempt_coordinator(store, timeout_s=30.0), **kw)


def _first_attempt(rank, world, root, port):
    """Two saves commit; rank 1 is SIGKILLed in the middle of the third."""
    from recoverkit import CommitError
    from recoverkit.storage.faults import FaultInjector

    store = _client(port)
    faults = FaultInjector().kill_at(phase="after_data", step=3, rank=1)
    with _checkpointer(root, store, faults=faults, timeout_s=5.0) as ckpt:
        for step in (1, 2, 3):
            try:
                ckpt.save(step, {"x": torch.full((64,), float(10 * step + rank))})
            except CommitError as e:
                return {"run_id": ckpt.run_id, "failed": step, "error": str(e)}
    return {"run_id": ckpt.run_id, "failed": None}


def _second_attempt(rank, world, root, port):
    """A restart on the same store: rank 1 starts first, where the old keys would fool it.

    Rank 0 gives rank 1 a head start: until rank 1 has its Checkpointer, or for 3 s. Reading
    the dead attempt's keys, rank 1 would be done at once (and adopt the old run id); agreeing
    on a fresh namespace, it waits for rank 0, and rank 0 goes on after the 3 s.
    """
    import warnings

    store = _client(port)
    if rank == 1:
        ckpt = _checkpointer(root, store)
        store.set("test/rank1-built", "1")
    else:
        try:
            store.wait(["test/rank1-built"], timedelta(seconds=3))
        except Exception:  # noqa: BLE001 - rank 1 is waiting for this rank, as it should
            pass
        ckpt = _checkpointer(root, store)
    with ckpt:
        state = {"x": torch.zeros(64)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resumed = ckpt.restore(state)
        restored = state["x"][0].item()
        for step in (3, 4, 5):
            ckpt.save(step, {"x": torch.full((64,), float(10 * step + rank))})
        return {"run_id": ckpt.run_id, "resumed": resumed, "restored": restored}


def test_restart_on_a_kept_store_agrees_on_a_new_run_and_commits_every_save(tmp_path):
    from torch.distributed import TCPStore

    from recoverkit import Checkpointer
    from recoverkit.format.manifest import Manifest

    agent = TCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    root = str(tmp_path / "ckpt")

    first = run_world(2, _first_attempt, root, agent.port, final_barrier=False, timeout_s=120)
    assert first[1] is None  # SIGKILLed mid-save
    assert first[0]["failed"] == 3 and "rank 1" in first[0]["error"]

    second = run_world(2, _second_attempt, root, agent.port, timeout_s=120)
    run_ids = {r["run_id"] for r in second}
    assert len(run_ids) == 1, f"the ranks of one attempt disagree on the run id: {second}"
    assert run_ids.isdisjoint({first[0]["run_id"]}), "the restart adopted the dead attempt's run id"
    for rank, r in enumerate(second):
        assert r["resumed"] == 2 and r["restored"] == float(20 + rank)

    with Checkpointer(root) as ckpt:
        assert ckpt.steps() == [1, 2, 3, 4, 5][-len(ckpt.steps()):] and ckpt.latest() == 5
        manifest: Manifest = ckpt.manifest(5)
        assert manifest.run_id in run_ids
        assert sorted(b.rank for b in manifest.blobs) == [0, 1]  # both ranks' data is in the commit
        state = {"x": torch.zeros(64)}
        assert ckpt.restore(state) == 5 and state["x"][0].item() == 50.0  # rank 0's shard of step 5


def _many_saves(rank, world, root):
    """Sync saves, two failing ones (one per rank), then lazy saves; the store's key count each time."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    from recoverkit import Checkpointer, CheckpointOptions, CommitError
    from recoverkit.storage.faults import FaultInjector

    store = distributed_c10d._get_default_store()
    faults = FaultInjector().fail_at(phase="after_data", step=11, rank=1).fail_at(phase="before_data", step=12, rank=0)
    errors: dict[int, str] = {}
    counts = []
    with Checkpointer(root, options=CheckpointOptions(commit_timeout_s=60.0), faults=faults) as ckpt:
        dist.barrier()
        start = store.num_keys()
        for step in range(1, 31):
            try:
                ckpt.save(step, {"x": torch.full((32,), float(step + rank))})
            except CommitError as e:
                errors[step] = str(e)
            counts.append(store.num_keys())
        for step in range(31, 41):
            ckpt.save_async(step, {"x": torch.full((32,), float(step + rank))})
            ckpt.wait(60)
            counts.append(store.num_keys())
        dist.barrier()
        end = store.num_keys()
    return {"start": start, "end": end, "counts": counts, "errors": errors}


def test_store_keys_of_finished_saves_are_dropped_and_failures_reach_every_rank(tmp_path):
    results = run_world(2, _many_saves, str(tmp_path / "ckpt"), timeout_s=240)
    for rank, r in enumerate(results):
        # a failed save is a CommitError on every rank, naming the rank that failed
        assert sorted(r["errors"]) == [11, 12], (rank, r["errors"])
        assert "rank 1" in r["errors"][11] and "rank 0" in r["errors"][12]
        # the keys of 40 saves are gone once every rank is done; in flight, one save's at most
        assert r["end"] == r["start"], (rank, r["start"], r["end"])
        assert max(r["counts"]) - r["start"] <= 8, (rank, r["start"], r["counts"])
    assert os.listdir(str(tmp_path / "ckpt"))
