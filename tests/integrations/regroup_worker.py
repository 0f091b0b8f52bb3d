"""The job of test_regroup.py: 4 gloo ranks on 2 simulated nodes that survive a lost node.

``python -m tests.integrations.regroup_worker OUT PG_TIMEOUT_S WAIT`` on each node's torchrun
agent (``RECOVERKIT_NODE`` names the node). Each rank writes ``pid-<node>-<rank>`` (its pid),
then all-reduces its launch rank + 1 every ~20 ms and, once the sum is right, writes
``step-<rank>``. WAIT is ``plain`` (a blocking all-reduce: a lost peer is seen when the
collective raises) or ``alive`` (:func:`wait_alive`: also when the heartbeat stops). The test then SIGKILLs one node (its agent and its workers) and writes
``killed`` (the wall time just before the kill). The survivors' next collective fails; they
call :func:`regroup`, all-reduce launch rank + 1 over the new group and write
``result-<launch rank>.json`` (the new membership, the sum, detection and re-forming
times), or, on a RegroupError, the error's reason; with ``RECOVERKIT_REGROUP_LINGER_S`` set,
they go on all-reducing in the new world that long. They end with ``barrier();
destroy_process_group(); os._exit(0)`` and write ``exit-<launch rank>`` just before.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta


def _write(path: str, payload: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def _killed_at(out: str, limit_s: float = 30.0) -> float | None:
    """The wall time the test recorded just before its SIGKILL (it writes it right after)."""
    deadline = time.monotonic() + limit_s
    path = os.path.join(out, "killed")
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                return float(f.read())
        except (FileNotFoundError, ValueError):
            time.sleep(0.02)
    return None


def main(out: str, pg_timeout_s: float, wait: str) -> None:
    import torch
    import torch.distributed as dist

    from recoverkit.distributed.regroup import Heartbeat, Membership, job_store, regroup, wait_alive
    from recoverkit.errors import PeerLostError, RegroupError

    node = os.environ["RECOVERKIT_NODE"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=pg_timeout_s))
    rank = dist.get_rank()
    _write(os.path.join(out, f"pid-{node}-{rank}"), os.getpid())
    store = job_store(timeout_s=10.0)
    membership = Membership.initial(store)
    heartbeat = Heartbeat(store, membership, interval_s=0.1, miss_s=1.0).start()
    world = dist.get_world_size()
    expected = world * (world + 1) / 2
    failure = None
    deadline = time.monotonic() + 120.0  # the test kills a node well before this
    while time.monotonic() < deadline:
        t = torch.tensor([float(rank + 1)])
        try:
            if wait == "alive":
                wait_alive(dist.all_reduce(t, async_op=True), heartbeat, timeout_s=60.0)
            else:
                dist.all_reduce(t)
        except (RuntimeError, PeerLostError) as e:  # a peer died: gloo's reset / timeout, or no beat
            failure = (time.time(), time.monotonic(), type(e).__name__, str(e).splitlines()[0][:200])
            break
        assert t.item() == expected, (t.item(), expected)
        if not os.path.exists(os.path.join(out, f"step-{rank}")):
            _write(os.path.join(out, f"step-{rank}"), rank)
        time.sleep(0.02)
    if failure is None:
        _write(os.path.join(out, f"result-{rank}.json"), {"error": "no failure seen"})
        os._exit(3)
    failed_wall, failed_mono, etype, emsg = failure
    killed = _killed_at(out)
    result: dict[str, object] = {
        "launch_rank": rank,
        "collective_error": f"{etype}: {emsg}",
        "detect_s": None if killed is None else failed_wall - killed,
        "heartbeat_detect_s": None,
    }
    try:
        m = regroup(store, membership, timeout_s=20.0, join_window_s=5.0, heartbeat=heartbeat, pg_timeout_s=pg_timeout_s)
    except RegroupError as e:
        result.update(error=e.reason, message=str(e)[:500], regroup_s=time.monotonic() - failed_mono)
        _write(os.path.join(out, f"result-{rank}.json"), result)
        heartbeat.stop()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    reformed = time.monotonic()
    t = torch.tensor([float(m.launch_rank + 1)])
    dist.all_reduce(t)
    lost_at = heartbeat.lost_at
    result.update(
        generation=m.generation,
        members=list(m.members),
        rank=m.rank,
        world_size=m.world_size,
        rank_map={str(k): v for k, v in m.rank_map.items()},
        lost=list(m.lost),
        sum=t.item(),
        reform_s=reformed - failed_mono,
        formed_in_s=m.formed_in_s,
        phases_s=dict(m.phases_s),
        heartbeat_detect_s=None if (lost_at is None or killed is None) else (failed_wall - killed) + (lost_at - failed_mono),
    )
    _write(os.path.join(out, f"result-{rank}.json"), result)
    linger = time.monotonic() + float(os.environ.get("RECOVERKIT_REGROUP_LINGER_S", "0"))
    while time.monotonic() < linger:  # training goes on in the new world
        dist.all_reduce(t)
        time.sleep(0.05)
    heartbeat.stop()
    dist.barrier()
    dist.destroy_process_group()
    _write(os.path.join(out, f"exit-{rank}"), 0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
