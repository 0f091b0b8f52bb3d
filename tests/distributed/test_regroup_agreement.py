"""regroup's agreement on a real TCPStore: live latecomers are waited for, the dead are not,
and every record read from the store is checked.

The multi-process test plays torchrun's role itself: the test process hosts the store, three
spawned processes form a gloo world over it, one is SIGKILLed while another is busy
"computing" (away from any collective) for 2 s. The busy one's heartbeat thread
acknowledges the regroup, so the first survivor waits for it instead of closing after
``ack_s``; without a heartbeat, the join window covers it. Either way the new world is
{0, 1} with dense ranks and a right all-reduce. Two losses in a row (4 -> 3 -> 2) give two
generations, each rank map relative to the generation before. A frozen peer (SIGSTOP) is
left behind through ``wait_alive`` without waiting for its stuck collective, a DDP wrapper of
the old group retired, a new one trained. The record tests write malformed values
where regroup reads its decision and counters, and end the store's server under a client.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from datetime import timedelta

import pytest

HOST = "127.0.0.1"


def _agree(rank: int, port: int, queue, slow_rank: int, use_heartbeat: bool) -> None:  # noqa: ANN001
    import torch
    import torch.distributed as dist

    from recoverkit.distributed.regroup import Heartbeat, Membership, regroup

    torch.set_num_threads(1)
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=20))
    dist.init_process_group("gloo", store=dist.PrefixStore("t/pg0", store), rank=rank, world_size=3, timeout=timedelta(seconds=10))
    m = Membership(namespace="t", generation=0, members=(0, 1, 2), launch_rank=rank, previous=(0, 1, 2))
    hb = Heartbeat(store, m, interval_s=0.1, miss_s=1.0).start() if use_heartbeat else None
    t = torch.ones(1)
    dist.all_reduce(t)
    store.set(f"ready/{rank}", "1")
    try:
        if rank == slow_rank:
            store.wait(["killed"], timedelta(seconds=30))
            time.sleep(2.0)  # busy computing while the others regroup
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            dist.all_reduce(t)
            time.sleep(0.01)
        queue.put((rank, "no failure seen"))
        os._exit(3)
    except RuntimeError:
        pass
    try:
        new = regroup(store, m, timeout_s=20.0, join_window_s=5.0, heartbeat=hb, pg_timeout_s=10.0)
        x = torch.tensor([float(rank + 1)])
        dist.all_reduce(x)
        queue.put((rank, {"members": list(new.members), "rank": new.rank, "rank_map": new.rank_map, "sum": x.item()}))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - reported to the test
        queue.put((rank, f"{type(e).__name__}: {e}"))
    if hb is not None:
        hb.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("use_heartbeat", [True, False], ids=["heartbeat", "join-window"])
def test_a_live_latecomer_is_waited_for_and_the_dead_left_out(use_heartbeat):
    import torch.distributed as dist

    store = dist.TCPStore(HOST, 0, is_master=True, timeout=timedelta(seconds=30))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(r, store.port, queue, 1, use_heartbeat)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        store.wait([f"ready/{r}" for r in range(3)], timedelta(seconds=60))
        os.kill(procs[2].pid, signal.SIGKILL)
        store.set("killed", "1")
        results = dict(queue.get(timeout=60) for _ in range(2))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    for rank in (0, 1):
        assert results[rank] == {"members": [0, 1], "rank": rank, "rank_map": {0: 0, 1: 1}, "sum": 3.0}, results
    assert [p.exitcode for p in procs] == [0, 0, -signal.SIGKILL]


def _twice(rank: int, port: int, queue) -> None:  # noqa: ANN001
    """4 ranks; launch rank 3 dies, then launch rank 1: two regroups, 4 -> 3 -> 2."""
    import torch
    import torch.distributed as dist

    from recoverkit.distributed.regroup import Heartbeat, Membership, regroup

    torch.set_num_threads(1)
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=20))
    dist.init_process_group("gloo", store=dist.PrefixStore("t2/pg0", store), rank=rank, world_size=4, timeout=timedelta(seconds=10))
    m = Membership(namespace="t2", generation=0, members=(0, 1, 2, 3), launch_rank=rank, previous=(0, 1, 2, 3))
    hb = Heartbeat(store, m, interval_s=0.1, miss_s=1.0).start()
    rounds = []
    t = torch.ones(1)
    dist.all_reduce(t)
    store.set(f"ready0/{rank}", "1")
    for generation in (1, 2):
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                dist.all_reduce(t)
                time.sleep(0.01)
            queue.put((rank, f"no failure seen before generation {generation}"))
            os._exit(3)
        except RuntimeError:
            pass
        try:
            m = regroup(store, m, timeout_s=20.0, heartbeat=hb, pg_timeout_s=10.0)
        except Exception as e:  # noqa: BLE001 - reported to the test
            queue.put((rank, f"{type(e).__name__}: {e}"))
            os._exit(0)
        x = torch.tensor([float(rank + 1)])
        dist.all_reduce(x)
        rounds.append({"generation": m.generation, "members": list(m.members), "rank": m.rank, "rank_map": m.rank_map, "sum": x.item()})
        store.set(f"ready{generation}/{rank}", "1")
    queue.put((rank, rounds))
    hb.stop()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_losses_two_generations():
    import torch.distributed as dist

    store = dist.TCPStore(HOST, 0, is_master=True, timeout=timedelta(seconds=30))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_twice, args=(r, store.port, queue)) for r in range(4)]
    for p in procs:
        p.start()
    try:
        store.wait([f"ready0/{r}" for r in range(4)], timedelta(seconds=60))
        os.kill(procs[3].pid, signal.SIGKILL)
        store.wait([f"ready1/{r}" for r in range(3)], timedelta(seconds=60))
        os.kill(procs[1].pid, signal.SIGKILL)
        results = dict(queue.get(timeout=60) for _ in range(2))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    for launch, final_rank in ((0, 0), (2, 1)):
        first, second = results[launch]
        assert first == {"generation": 1, "members": [0, 1, 2], "rank": launch, "rank_map": {0: 0, 1: 1, 2: 2}, "sum": 6.0}
        # generation 2 maps generation 1's ranks: launch 2 was rank 2, is now rank 1
        assert second == {"generation": 2, "members": [0, 2], "rank": final_rank, "rank_map": {0: 0, 2: 1}, "sum": 4.0}
    assert [p.exitcode for p in procs] == [0, -signal.SIGKILL, 0, -signal.SIGKILL]


def _frozen(rank: int, port: int, queue) -> None:  # noqa: ANN001
    """3 ranks with a DDP model; rank 2 is frozen (SIGSTOP) mid-run by the test."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from recoverkit.distributed.regroup import Heartbeat, Membership, regroup, retire, wait_alive
    from recoverkit.errors import PeerLostError

    torch.set_num_threads(1)
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=20))
    dist.init_process_group("gloo", store=dist.PrefixStore("t3/pg0", store), rank=rank, world_size=3, timeout=timedelta(seconds=60))
    m = Membership(namespace="t3", generation=0, members=(0, 1, 2), launch_rank=rank, previous=(0, 1, 2))
    hb = Heartbeat(store, m, interval_s=0.1, miss_s=1.0).start()
    torch.manual_seed(0)
    ddp = DDP(torch.nn.Linear(8, 2))
    ddp(torch.randn(4, 8)).sum().backward()
    store.set(f"ready/{rank}", "1")
    t = torch.ones(1)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            work = dist.all_reduce(t, async_op=True)
            wait_alive(work, hb, timeout_s=30.0)
            time.sleep(0.01)
        queue.put((rank, "no failure seen"))
        os._exit(3)
    except PeerLostError as e:
        why = str(e)
    m = regroup(store, m, timeout_s=20.0, heartbeat=hb, pg_timeout_s=10.0)
    old = [ddp]
    del ddp
    retire(old)  # its reducer holds the old group, whose collective is stuck for 60 s
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    model = DDP(torch.nn.Linear(8, 2))  # a wrapper of the new group trains
    model(torch.randn(4, 8)).sum().backward()
    queue.put((rank, {"why": why, "members": list(m.members), "sum": x.item(), "stuck_still_pending": not work.is_completed()}))
    hb.stop()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_a_frozen_peer_is_left_behind_without_waiting_for_its_stuck_collective():
    """wait_alive raises on the heartbeat; regroup and retire do not wait for the old group's
    collective, stuck on the frozen rank for the group's 60 s timeout: the new world has
    all-reduced and trained a DDP step while that collective is still pending."""
    import torch.distributed as dist

    store = dist.TCPStore(HOST, 0, is_master=True, timeout=timedelta(seconds=30))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_frozen, args=(r, store.port, queue)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        store.wait([f"ready/{r}" for r in range(3)], timedelta(seconds=60))
        os.kill(procs[2].pid, signal.SIGSTOP)
        results = dict(queue.get(timeout=60) for _ in range(2))
    finally:
        procs[2].kill()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    for rank in (0, 1):
        res = results[rank]
        assert isinstance(res, dict), results
        assert res["members"] == [0, 1] and res["sum"] == 3.0, res
        assert "stopped beating" in res["why"] or "started a regroup" in res["why"], res
        assert res["stuck_still_pending"], res
    assert [p.exitcode for p in procs[:2]] == [0, 0]


def _membership(rank: int = 0):  # noqa: ANN202
    from recoverkit.distributed.regroup import Membership

    return Membership(namespace="r", generation=0, members=(0, 1, 2, 3), launch_rank=rank, previous=(0, 1, 2, 3))


@pytest.fixture
def store():
    import torch.distributed as dist

    s = dist.TCPStore(HOST, 0, is_master=True, timeout=timedelta(seconds=5))
    yield s


@pytest.mark.parametrize(
    "record",
    [b"not json", b"\xff\xfe", b"{}", b"[]", b"[0, 0]", b"[1, 0]", b"[0, 7]", b"[0, true]", b"[0, -1]",
     b"[0, 1.0]", b"[0, 1, 2, 3, 4]", b"[" + b"0, " * 400_000 + b"0]"],
    ids=["text", "binary", "object", "empty", "duplicate", "unsorted", "stranger", "bool", "negative",
         "float", "too-many", "huge"],
)
def test_a_malformed_decision_is_refused(store, record):
    from recoverkit.distributed.regroup import regroup
    from recoverkit.errors import RegroupError

    store.set("r/g1/decided", record)
    with pytest.raises(RegroupError) as e:
        regroup(store, _membership(), timeout_s=5.0, join_window_s=0.1)
    assert e.value.reason == "invalid", e.value
    assert "r/g1/decided" in str(e.value)


def test_a_malformed_join_count_is_refused_not_fatal_to_the_connection(store):
    from recoverkit.distributed.regroup import regroup
    from recoverkit.errors import RegroupError

    store.set("r/g1/count", "lots")  # regroup's own add would fail on it: the server drops the client
    with pytest.raises(RegroupError) as e:
        regroup(store, _membership(), timeout_s=5.0, join_window_s=0.1)
    assert e.value.reason in ("invalid", "store_lost"), e.value


def test_agreed_without_this_rank_is_excluded(store):
    from recoverkit.distributed.regroup import regroup
    from recoverkit.errors import RegroupError

    store.set("r/g1/decided", "[1, 2]")
    with pytest.raises(RegroupError) as e:
        regroup(store, _membership(0), timeout_s=5.0, join_window_s=0.1)
    assert e.value.reason == "excluded" and not e.value.store_lost, e.value


def test_a_store_whose_server_ended_raises_store_lost():
    import torch.distributed as dist

    from recoverkit.distributed.regroup import regroup
    from recoverkit.errors import RegroupError

    server = dist.TCPStore(HOST, 0, is_master=True, timeout=timedelta(seconds=5))
    client = dist.TCPStore(HOST, server.port, is_master=False, timeout=timedelta(seconds=5))
    del server
    start = time.monotonic()
    with pytest.raises(RegroupError) as e:
        regroup(client, _membership(), timeout_s=5.0, join_window_s=0.1)
    assert e.value.store_lost, e.value
    assert time.monotonic() - start < 30  # a bound, not a speed: no hang


def test_heartbeats_see_a_stopped_peer_and_acknowledge_a_regroup(store):
    from recoverkit.distributed.regroup import Heartbeat, Membership

    m = [Membership(namespace="h", generation=0, members=(0, 1), launch_rank=r, previous=(0, 1)) for r in (0, 1)]
    with Heartbeat(store, m[0], interval_s=0.05, miss_s=0.5) as a:
        b = Heartbeat(store, m[1], interval_s=0.05, miss_s=0.5).start()
        time.sleep(0.3)
        assert not a.lost() and not b.lost()
        store.add("h/g1/count", 1)  # a regroup of generation 1 started
        store.wait(["h/g1/alive/0", "h/g1/alive/1"], timedelta(seconds=10))
        assert a.lost() and a.lost_at is not None and not a.dead()  # told, before anyone is dead
        b.stop()
        deadline = time.monotonic() + 10
        while not a.dead() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.dead() == {1}
        store.set("h/hb/1", "garbage")  # an unreadable beat is no beat, and the thread goes on
        time.sleep(0.2)
        assert a.store_error is None and a.dead() == {1}


def test_options_are_checked(store):
    from recoverkit.distributed.regroup import Heartbeat, regroup
    from recoverkit.errors import ConfigError

    with pytest.raises(ConfigError, match="interval_s"):
        Heartbeat(store, _membership(), interval_s=1.0, miss_s=0.5)
    with pytest.raises(ConfigError, match="join_window_s"):
        regroup(store, _membership(), timeout_s=1.0, join_window_s=2.0)
