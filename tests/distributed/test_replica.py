"""Peer replication of shared-memory snapshots in real gloo worlds (simulated nodes).

Each rank is put on a simulated node (``RECOVERKIT_NODE``: ranks 0, 1 on node0, ranks 2, 3
on node1) with its shared memory under the test's own ``RECOVERKIT_SHM_DIR``. Each rank
writes its own snapshots into its shm slots (what the shm tier does) and offers them to the
replica tier; the replication thread copies them to the holder on the other node. Faults
are real: a transfer corrupted on arrival (the transport's ``on_arrival`` seam, before any
CRC check), a receiver slowed down in the middle of a round, a peer SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pytest

from tests.distributed.harness import run_world

SIZE = 256 << 10  # a snapshot's data bytes (an index is ~1 KiB: data transfers are the large ones)
BLOB = 64


def _data(owner: int, step: int, size: int = SIZE) -> bytes:
    import torch

    g = torch.Generator().manual_seed(100003 * owner + step)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g).numpy().tobytes()


def _write(slots, rank: int, world: int, step: int, data: bytes, run_id: str = "test") -> None:
    """Write ``data`` as rank ``rank``'s snapshot of ``step`` (a blob and one shard), as the shm tier does."""
    from recoverkit.format.checksum import crc32c
    from recoverkit.format.manifest import BlobRecord, ShardRecord
    from recoverkit.format.shm_index import data_file, make_index

    n, f = len(data), data_file(rank)
    w = slots.begin(step, n)
    w.view[:] = data
    blob = BlobRecord(rank, f, 0, BLOB, crc32c(data[:BLOB]))
    shard = ShardRecord(rank, f, BLOB, n - BLOB, crc32c(data[BLOB:]), (0,), (n - BLOB,))
    records = {"rank": rank, "blob": blob.to_json(), "shards": [["w", shard.to_json()]], "files": {f: n}}
    w.commit(
        make_index(
            step=step, run_id=run_id, world_size=world, rank=rank, records=records,
            shards_meta={"w": ["uint8", [n - BLOB]]}, aliases={}, data_bytes=n,
        )
    )  # fmt: skip


def _join(rank, shm_dir, root, per_node=2, **kw):
    from recoverkit.distributed.coordinator import default_coordinator
    from recoverkit.staging.replica import join_replication
    from recoverkit.storage.shm import ShmStore

    os.environ["RECOVERKIT_NODE"] = f"node{rank // per_node}"
    os.environ["RECOVERKIT_SHM_DIR"] = shm_dir
    coord = default_coordinator(timeout_s=60)
    tier = join_replication(root, coordinator=coord, scope="test", **kw)
    own = ShmStore(root, slots=3).slots(rank)  # 3: one may be pinned by a send in flight
    return tier, own


def _wait_for(cond, what, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"not reached within {timeout_s} s: {what}")


def _all_held(tier, step):
    h = tier.holdings()
    return all(h.get(o, {}).get(x) == step for o, hs in tier.placement.items() for x in hs)


def _replica_bytes(root, node, owner, shm_dir=None):
    from recoverkit.storage.shm import ShmStore

    slots = ShmStore(root, shm_dir=shm_dir, node=node).slots(owner, replica=True)
    step = slots.newest()
    with slots.open(step) as v:
        return step, bytes(v.data)


# ------------------------------------------------------------------ 4 ranks, 2 nodes
def _replicate(rank, world, shm_dir, root, steps):
    tier, own = _join(rank, shm_dir, root, k=1, timeout_s=30)
    assert tier.placement == {0: [2], 1: [3], 2: [0], 3: [1]}
    assert tier.nodes == ["node0", "node0", "node1", "node1"]
    for step in range(1, steps + 1):
        _write(own, rank, world, step, _data(rank, step))
        tier.offer(SimpleNamespace(step=step))
    _wait_for(lambda: _all_held(tier, steps), f"every replica of step {steps} held")
    out = {"holdings": tier.holdings(), "owners": tier.owners()}
    for owner in tier.owners():
        step, data = _replica_bytes(root, f"node{rank // 2}", owner)
        out[owner] = (step, data == _data(owner, step))
    stats = tier.stats
    tier.close()
    out["stats"] = stats
    out["stopped"] = tier.stats["stopped"]
    return out


def test_four_ranks_on_two_nodes_hold_each_others_snapshots_bit_exact(tmp_path):
    shm, root = str(tmp_path / "shm"), str(tmp_path / "root")
    results = run_world(4, _replicate, shm, root, 4, timeout_s=240)
    holder_of = {0: 2, 1: 3, 2: 0, 3: 1}
    for rank, r in enumerate(results):
        assert r["holdings"] == {o: {h: 4} for o, h in holder_of.items()}, r
        (owner,) = r["owners"]
        assert holder_of[owner] == rank
        assert r[owner] == (4, True), r  # the owner's bytes of its newest step, exactly
        assert r["stats"]["received"] >= 1 and r["stats"]["sent"] >= 1, r["stats"]
        assert r["stats"]["bad_transfers"] == 0 and r["stats"]["error"] is None, r["stats"]
        assert r["stopped"]
    # the replicas live in the other node's shared memory, beside its own ranks' snapshots
    for owner, holder in holder_of.items():
        node = f"node{holder // 2}"
        assert _replica_bytes(root, node, owner, shm) == (4, _data(owner, 4))


# ------------------------------------------------------------------ a corrupted transfer
def _corrupted(rank, world, shm_dir, root):
    flipped = []

    def flip(peer, payload):  # rank 2 (holder of rank 0): the first snapshot that lands
        if rank == 2 and not flipped and payload.numel() == SIZE:
            payload[BLOB + 100] ^= 0xFF  # inside the shard's record
            flipped.append(peer)

    tier, own = _join(rank, shm_dir, root, k=1, timeout_s=30, on_arrival=flip)
    _write(own, rank, world, 1, _data(rank, 1))
    tier.offer(SimpleNamespace(step=1))
    seen = []

    def held():
        h = tier.holdings()
        seen.append(h)
        return _all_held(tier, 1)

    _wait_for(held, "every replica of step 1 held after a retry")
    out = {"flipped": flipped, "stats": tier.stats, "seen": seen}
    if rank == 2:
        out["replica"] = _replica_bytes(root, "node1", 0)[1] == _data(0, 1)
    tier.close()
    return out


def test_a_corrupted_transfer_is_detected_not_kept_and_retried(tmp_path):
    shm, root = str(tmp_path / "shm"), str(tmp_path / "root")
    results = run_world(4, _corrupted, shm, root, timeout_s=240)
    r2 = results[2]
    assert r2["flipped"] == [0]
    assert r2["stats"]["bad_transfers"] == 1, r2["stats"]  # caught by the record CRCs
    assert r2["stats"]["received"] == 1  # the retry, committed once
    assert r2["replica"] is True
    assert results[0]["stats"]["sent"] >= 1 and results[0]["stats"]["transport_errors"] >= 1
    for r in results:  # never published before the good copy was committed
        for h in r["seen"]:
            assert set(h.get(0, {}).values()) <= {1}
    for r in (results[1], results[3]):
        assert r["stats"]["bad_transfers"] == 0


# ------------------------------------------------------------------ a slow receiver
def _slow(rank, world, shm_dir, root, steps):
    import threading

    from recoverkit.storage.shm import ShmStore

    counter = [0]
    during = []  # (rank 2) training steps completed while one receive was in flight
    gate = threading.Event()

    def slow(peer, payload):  # rank 2 receives rank 0's snapshots slowly: training goes on
        if rank == 2 and payload.numel() == SIZE and len(during) < 2:
            start = counter[0]
            deadline = time.monotonic() + 30
            while counter[0] < start + 3 and time.monotonic() < deadline and not gate.is_set():
                time.sleep(0.005)
            during.append(counter[0] - start)

    tier, own = _join(rank, shm_dir, root, k=1, timeout_s=60, on_arrival=slow)
    nodes = tier.nodes
    in_flight_steps: dict[int, int] = {}  # round in flight -> training steps seen during it
    violations = []
    for step in range(1, steps + 1):
        _write(own, rank, world, step, _data(rank, step))
        tier.offer(SimpleNamespace(step=step))
        counter[0] = step
        r = tier.stats["in_flight"]
        if r is not None:
            in_flight_steps[r] = in_flight_steps.get(r, 0) + 1
        for owner, held in tier.holdings().items():  # never a step not committed there
            for holder, s in held.items():
                committed = ShmStore(root, node=nodes[holder]).slots(owner, replica=True).steps()
                if not committed or max(committed) < s:
                    violations.append((owner, holder, s, committed))
        time.sleep(0.01)  # a training step
    gate.set()
    _wait_for(lambda: _all_held(tier, steps), f"every replica of step {steps} held", timeout_s=90)
    out = {
        "during": during, "stats": tier.stats, "violations": violations,
        "most_steps_in_one_round": max(in_flight_steps.values(), default=0),
    }  # fmt: skip
    tier.close()
    return out


def test_a_slow_receiver_never_stalls_training_and_newer_steps_supersede(tmp_path):
    shm, root = str(tmp_path / "shm"), str(tmp_path / "root")
    results = run_world(4, _slow, shm, root, 40, timeout_s=300)
    r0, r2 = results[0], results[2]
    assert r2["during"] and max(r2["during"]) > 1, r2  # the receiver's training kept stepping
    assert r0["most_steps_in_one_round"] > 1, r0  # so did the sender's, while its round waited
    assert r0["stats"]["superseded"] > 0, r0["stats"]  # steps made meanwhile were skipped
    assert r0["stats"]["sent"] < 40
    for r in results:
        assert r["violations"] == [], r["violations"]
        assert r["stats"]["error"] is None and r["stats"]["bad_transfers"] == 0


# ------------------------------------------------------------------ a dead peer
def _dead_peer(rank, world, shm_dir, root, timeout_s):
    tier, own = _join(rank, shm_dir, root, k=1, timeout_s=timeout_s)
    _write(own, rank, world, 1, _data(rank, 1))
    tier.offer(SimpleNamespace(step=1))
    _wait_for(lambda: _all_held(tier, 1), "every replica of step 1 held")
    if rank == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    _write(own, rank, world, 2, _data(rank, 2))
    tier.offer(SimpleNamespace(step=2))
    if rank == 1:  # rank 3's peer: its replication ends with the error, within the timeout
        _wait_for(lambda: tier.stats["stopped"], "rank 1's replication ended", timeout_s=timeout_s + 30)
    tier.close()  # returns, whatever the dead peer
    return tier.stats


def test_close_returns_when_a_peer_died(tmp_path):
    shm, root = str(tmp_path / "shm"), str(tmp_path / "root")
    results = run_world(4, _dead_peer, str(tmp_path / "shm"), root, 10.0, final_barrier=False, timeout_s=240)
    assert results[3] is None  # the victim never reported
    assert results[1]["error"] and "rank 3" in results[1]["error"], results[1]
    for r in (results[0], results[1], results[2]):
        assert r["stopped"]
    del shm


@pytest.mark.parametrize("k", [0, 1])
def test_a_world_of_one_replicates_nothing(tmp_path, monkeypatch, k):
    from recoverkit.distributed.coordinator import LocalCoordinator
    from recoverkit.staging.replica import join_replication

    monkeypatch.setenv("RECOVERKIT_SHM_DIR", str(tmp_path / "shm"))
    tier = join_replication(str(tmp_path / "root"), coordinator=LocalCoordinator(), k=k, node="solo")
    assert tier.placement == {0: []} and tier.transport is None
    assert tier.offer(SimpleNamespace(step=1)) is False
    assert tier.steps() == [] and tier.holdings() == {}
    tier.close()


# ------------------------------------------------------------------ over the holder's budget
def _over_budget(rank, world, shm_dir, root):
    import logging

    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger("recoverkit").addHandler(Keep(logging.WARNING))
    budget = 8192 if rank == 2 else None  # rank 2 holds rank 0's replicas: one slot takes 4 KiB
    tier, own = _join(rank, shm_dir, root, k=1, timeout_s=30, budget_bytes=budget)
    for step in (1, 2):
        _write(own, rank, world, step, _data(rank, step))
        tier.offer(SimpleNamespace(step=step))
    others = [(1, 3), (2, 0), (3, 1)]
    _wait_for(lambda: all(tier.holdings().get(o, {}).get(h) == 2 for o, h in others), "the other replicas held")
    out = {"holdings": tier.holdings(), "stats": tier.stats, "lines": lines}
    tier.close()
    return out


def test_a_snapshot_over_the_holders_budget_is_not_sent_and_its_owner_warns(tmp_path):
    shm, root = str(tmp_path / "shm"), str(tmp_path / "root")
    results = run_world(4, _over_budget, shm, root, timeout_s=240)
    for r in results:
        assert 0 not in r["holdings"], r["holdings"]  # never held, never published
    r0, r2 = results[0], results[2]
    assert r0["stats"]["sent"] == 0 and r2["stats"]["received"] == 0
    assert r2["stats"]["refused"] == 0  # not even offered: both ends knew the limit
    assert sum("exceeds what rank 2 takes" in m for m in r0["lines"]) == 1, r0["lines"]
    assert not list((tmp_path / "shm").rglob("replica-00000/slot-*.index"))


# ------------------------------------------------------------------ a refused announcement
def _refused(rank, world, shm_dir, root):
    tier, own = _join(rank, shm_dir, root, per_node=1, k=1, timeout_s=30)
    assert tier.placement == {0: [1], 1: [2], 2: [0]}  # a ring over 3 nodes
    # rank 0's snapshot claims another world: its holder (rank 1) refuses it, in the same
    # exchanges where rank 1's own snapshot goes to rank 2
    _write(own, rank, 7 if rank == 0 else world, 1, _data(rank, 1))
    tier.offer(SimpleNamespace(step=1))
    _wait_for(lambda: all(tier.holdings().get(o, {}).get(h) == 1 for o, h in ((1, 2), (2, 0))), "replicas held")
    out = {"holdings": tier.holdings(), "stats": tier.stats}
    if rank == 2:
        out["replica"] = _replica_bytes(root, "node2", 1, shm_dir) == (1, _data(1, 1))
    tier.close()
    return out


def test_a_refused_announcement_fails_only_its_own_transfer(tmp_path):
    shm, root = str(tmp_path / "shm"), str(tmp_path / "root")
    results = run_world(3, _refused, shm, root, timeout_s=240)
    for r in results:
        assert 0 not in r["holdings"], r["holdings"]
    r1, r2 = results[1]["stats"], results[2]["stats"]
    assert r1["refused"] == 1 and r1["received"] == 0, r1  # refused once: not announced again
    assert r2["received"] == 1 and results[2]["replica"] is True, r2  # rank 1's went through, once
    assert results[0]["stats"]["transport_errors"] >= 1  # the refusal reached its sender


# ------------------------------------------------------------------ a restarted job (a new run)
def _run(rank, world, shm_dir, root, run_id, steps):
    from recoverkit.storage.shm import ShmStore

    tier, own = _join(rank, shm_dir, root, k=1, timeout_s=30, run_id=run_id)
    first = tier.holdings()  # before this run replicated anything
    for step in steps:
        _write(own, rank, world, step, _data(rank, step), run_id=run_id)
        tier.offer(SimpleNamespace(step=step))
    _wait_for(lambda: _all_held(tier, steps[-1]), f"every replica of step {steps[-1]} held")
    tier.close()  # as after a crash: the shared memory stays
    (owner,) = tier.owners()
    kept = ShmStore(root, node=f"node{rank // 2}").slots(owner, replica=True).indexes()
    return {"first": first, "kept": [(i.step, i.run_id) for i in kept]}


def test_a_new_run_never_counts_nor_keeps_a_dead_runs_later_replicas(tmp_path):
    shm, root = str(tmp_path / "shm"), str(tmp_path / "root")
    before = run_world(4, _run, shm, root, "run-1", [1, 2, 3, 4, 5], timeout_s=240)
    assert all(r["kept"][-1] == (5, "run-1") for r in before), before
    # the job restarts from step 2 (say the disk's): its new run replicates 3 again
    after = run_world(4, _run, shm, root, "run-2", [3], timeout_s=240)
    for r in after:
        assert r["first"] == {}, r  # the dead run's replicas are not this run's holdings
        assert (3, "run-2") in r["kept"], r
        assert not [k for k in r["kept"] if k[1] == "run-1" and k[0] >= 3], r  # a dead timeline: dropped


def _one_node(rank, world, shm_dir, root):
    tier, own = _join(rank, shm_dir, root, per_node=world, k=1, timeout_s=30)
    _write(own, rank, world, 1, _data(rank, 1, 4096))
    out = {"placement": tier.placement, "transport": tier.transport, "offer": tier.offer(SimpleNamespace(step=1))}
    tier.close()
    return out


def test_ranks_on_one_node_replicate_nothing_and_build_no_group(tmp_path):
    results = run_world(2, _one_node, str(tmp_path / "shm"), str(tmp_path / "root"), timeout_s=120)
    assert results == [{"placement": {0: [], 1: []}, "transport": None, "offer": False}] * 2
