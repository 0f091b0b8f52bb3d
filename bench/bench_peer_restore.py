"""A memory restore's peer transfer next to gloo point-to-point, in the same processes.

2 ranks (gloo on 127.0.0.1), a replicated state of ``--size-mib`` (float32 tensors, written
by one owner rank each, so each rank stages about half) saved with ``save_async`` to the
host tier (``--tier shm``: the shared-memory tier, each rank a simulated node of its own, so
the other owner's regions come over the transport too); then, in the same two processes:

* **gloo p2p one way**: ``dist.send`` -> ``dist.recv`` of the bytes a rank fetches, into a
  preallocated buffer (the transport's limit, as ``bench_mttr`` measures it);
* **gloo p2p both ways**: the same bytes sent by each rank to the other at once (a restore
  of a data-parallel job moves both ways at once);
* **fetch**: the transfers of ``Checkpointer.restore`` (``distributed.fetch.run_transfers``
  inside the memory restore: the other owner's regions received into one buffer per
  transfer, every region's CRC checked as it lands), GB/s of the bytes received;
* **restore**: the whole ``restore`` (the exchanges, the fetch, the local CRC pass, the copy
  into the live tensors), GB/s of the state's bytes.

Every figure is the median of ``--reps``; the targets: fetch >= 0.5x gloo p2p. The JSON
(``--json``) also holds, per rank, the seconds per restore spent in the transport's phases
and the memory restore's steps (``parts_s``: preparing the buffers, the exchanges, the
checks as bytes land, the local CRC pass, the whole ``recover``), to see where the rest of
a restore goes.

Run: ``python -m bench.bench_peer_restore [--smoke] [--size-mib 256] [--reps 3] [--tier host|shm]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any

from ._common import free_port
from .machine import median


def _state(size_mib: int, rank: int) -> dict[str, Any]:
    import torch

    from recoverkit.state.sharded import replicated

    n = 8
    per = (size_mib << 20) // n // 4
    g = torch.Generator().manual_seed(1234)
    return {"w": replicated({f"t{i}": torch.randn(per, generator=g) for i in range(n)})}


def _save_and_crash(ckpt: Any, state: Any) -> None:
    """Node loss, first world: save, wait until every replica is held, end without closing
    (a crash: the shared memory and the replicas stay)."""
    ckpt.save_async(1, state)
    ckpt.wait()
    replica = ckpt.tiers["replica"]
    deadline = time.monotonic() + 300
    while not all(replica.holdings().get(o, {}).get(h) == 1 for o, hs in replica.placement.items() for h in hs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas not held after 300 s: {replica.holdings()}")
        time.sleep(0.05)
    replica.close()  # its thread and group end; what it holds stays in shared memory


def _worker(rank: int, port: int, root: str, size_mib: int, reps: int, tier: str, q: Any, phase: str = "both") -> None:
    try:
        os.environ["RECOVERKIT_NODE"] = f"node{rank}"  # shm: one simulated node per rank
        os.environ["RECOVERKIT_SHM_DIR"] = os.path.join(root, "shm")
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if os.environ.get("RK_BENCH_DEBUG"):
            import faulthandler

            faulthandler.dump_traceback_later(60, exit=True)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=300))  # fmt: skip
        import recoverkit.recovery.memory as memory

        try:  # one attempt of the restore, in a module of its own
            attempt: Any = importlib.import_module("recoverkit.recovery.memory_attempt")
        except ImportError:  # an older recoverkit (a comparison run): in recovery.memory itself
            attempt = memory
        from recoverkit import Checkpointer, CheckpointOptions, TierSpec
        from recoverkit.config import StagingPolicy

        state = _state(size_mib, rank)
        live = state["w"].obj  # the tensors restored in place
        want = {k: v.clone() for k, v in live.items()}
        nbytes = sum(v.numel() * 4 for v in want.values())
        memory_tier = TierSpec.host() if tier == "host" else TierSpec.shm()
        tiers = [memory_tier, TierSpec.local(every_steps=0)]
        if phase != "both":  # a node loss: the shm tier and a replica of each rank on the other node
            tiers = [TierSpec.shm(), TierSpec.replica(k=1), TierSpec.local(every_steps=0)]
        opts = CheckpointOptions(capture_rng=False, tiers=tiers,
                                 staging=StagingPolicy(budget_bytes=2 * nbytes + (64 << 20)))  # fmt: skip
        if phase == "save":
            _save_and_crash(Checkpointer(root, options=opts), state)
            q.put(("ok", rank, {}))
            dist.barrier()
            dist.destroy_process_group()
            q.close()
            q.join_thread()
            os._exit(0)
        fetched: list[tuple[float, int]] = []
        real = attempt.run_transfers

        def timed(transport: Any, transfers: Any, **kw: Any) -> int:
            transfers = list(transfers)
            t = time.perf_counter()
            got = real(transport, transfers, **kw)
            fetched.append((time.perf_counter() - t, sum(x.nbytes for x in transfers if x.dst == rank)))
            return got

        attempt.run_transfers = timed  # timing only: the transfers are the real ones
        from recoverkit.distributed.transport import ProcessGroupTransport

        parts: dict[str, float] = {}

        def clocked(owner: Any, name: str, key: Any = None) -> None:
            real_fn = getattr(owner, name, None)
            if real_fn is None:  # an older recoverkit (a comparison run): nothing to clock
                return

            def wrapper(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return real_fn(*a, **k)
                finally:
                    label = f"{name}:{a[1] if key is not None else ''}"
                    parts[label] = parts.get(label, 0.0) + time.perf_counter() - t

            setattr(owner, name, wrapper)

        clocked(ProcessGroupTransport, "_phase", key=1)
        for owner, names in ((attempt._Attempt, ("_check_landed", "_exchange", "_prepare", "_run")),
                             (memory.MemoryRestore, ("transport_for", "_applied_everywhere", "drop_transport", "recover")),
                             (attempt, ("_verify",))):  # fmt: skip
            for name in names:
                clocked(owner, name)
        with Checkpointer(root, options=opts) as ckpt:
            if phase == "both":
                ckpt.save_async(1, state)
                ckpt.wait()
            restores = []
            for _ in range(reps + 1):
                for v in live.values():
                    v.zero_()
                dist.barrier()
                t = time.perf_counter()
                step = int(ckpt.restore(state))
                restores.append(time.perf_counter() - t)
                got = state["w"].obj if hasattr(state["w"], "obj") else state["w"]
                bad = [k for k in want if not torch.equal(got[k], want[k])]
                assert step == 1 and not bad, f"step {step}: not bit-exact: {bad} {type(state['w'])}"
        moved = fetched[-1][1] if fetched else 0
        most = torch.tensor([moved], dtype=torch.int64)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)  # the p2p moves what the fetching rank fetched
        moved = int(most.item())
        buf = torch.ones(max(moved, 1), dtype=torch.uint8)
        back = torch.empty_like(buf)
        one_way, both_ways = [], []
        for _ in range(reps + 1):
            dist.barrier()
            t = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
            else:
                dist.recv(buf, 0)
            one_way.append(time.perf_counter() - t)
            dist.barrier()
            t = time.perf_counter()
            works = [dist.isend(buf, 1 - rank), dist.irecv(back, 1 - rank)]
            for w in works:
                w.wait()
            both_ways.append(time.perf_counter() - t)
        q.put(("ok", rank, {
            "state_bytes": nbytes, "fetched_bytes": moved,
            "fetch_s": [s for s, _ in fetched[1:]], "restore_s": restores[1:],
            "p2p_one_way_s": one_way[1:], "p2p_both_ways_s": both_ways[1:],
            "parts_s": {k: v / (reps + 1) for k, v in parts.items()},
        }))  # fmt: skip
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(("error", rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"))
    q.close()
    q.join_thread()  # the result is in the pipe before the process ends
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _world(root: str, size_mib: int, reps: int, tier: str, phase: str, timeout_s: float) -> dict[int, Any]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, root, size_mib, reps, tier, q, phase)) for r in (0, 1)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    try:
        while len(got) < 2:
            status, rank, value = q.get(timeout=timeout_s)
            if status != "ok":
                raise RuntimeError(f"rank {rank}: {value}")
            got[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return got


def run(size_mib: int, reps: int, tier: str = "host", timeout_s: float = 600.0, lose_node: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rk-bench-peer-") as root:
        if lose_node:  # one world saves and crashes; node1's memory is deleted; a new world restores
            _world(root, size_mib, reps, "shm", "save", timeout_s)
            shutil.rmtree(os.path.join(root, "shm", "recoverkit", "node1"))
            got = _world(root, size_mib, reps, "shm", "restore", timeout_s)
        else:
            got = _world(root, size_mib, reps, tier, "both", timeout_s)
    r1 = got[1]  # the receiving rank of the one-way p2p
    fetch = r1["fetched_bytes"] / median(r1["fetch_s"]) / 1e9
    one = r1["fetched_bytes"] / median(r1["p2p_one_way_s"]) / 1e9
    both = r1["fetched_bytes"] / median(r1["p2p_both_ways_s"]) / 1e9
    restore = r1["state_bytes"] / median(r1["restore_s"]) / 1e9
    return {
        "size_mib": size_mib, "reps": reps, "tier": tier, "lose_node": lose_node, "state_bytes": r1["state_bytes"], "fetched_bytes": r1["fetched_bytes"],
        "fetch_gbps": fetch, "p2p_one_way_gbps": one, "p2p_both_ways_gbps": both, "restore_gbps": restore,
        "fetch_vs_p2p_one_way": fetch / one, "fetch_vs_p2p_both_ways": fetch / both, "ranks": got,
    }


def table(r: dict[str, Any]) -> str:
    return "\n".join([
        (f"node lost: rank 1's shared memory deleted, its state from rank 0's replica and snapshot, "
         f"{r['fetched_bytes'] / 2**20:.0f} MiB fetched by rank 1 alone, state {r['state_bytes'] / 2**20:.0f} MiB, "
         f"median of {r['reps']}" if r.get("lose_node") else
         f"{r['tier']} tier, state {r['state_bytes'] / 2**20:.0f} MiB, {r['fetched_bytes'] / 2**20:.0f} MiB fetched per rank, "
         f"median of {r['reps']}"),
        "| | GB/s |", "|---|---:|",
        f"| gloo p2p one way | {r['p2p_one_way_gbps']:.2f} |",
        f"| gloo p2p both ways at once | {r['p2p_both_ways_gbps']:.2f} |",
        f"| memory restore fetch (verified as it lands) | {r['fetch_gbps']:.2f} |",
        f"| whole restore (state bytes) | {r['restore_gbps']:.2f} |",
        f"- fetch vs gloo p2p: {r['fetch_vs_p2p_one_way']:.2f}x one way, {r['fetch_vs_p2p_both_ways']:.2f}x both ways "
        f"(target >= 0.5: {'met' if r['fetch_vs_p2p_one_way'] >= 0.5 else 'MISSED'})",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--size-mib", type=int, default=None, help="state size (default 256; smoke 8)")
    ap.add_argument("--reps", type=int, default=None, help="restores (default 3; smoke 1)")
    ap.add_argument("--tier", default="host", choices=["host", "shm"], help="the memory tier restored from")
    ap.add_argument("--lose-node", action="store_true",
                    help="shm tier with a replica of each rank on the other node; rank 1's node memory is lost "
                         "between a saving world and a restoring one, so rank 1 fetches its whole state one way")
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args(argv)
    r = run(a.size_mib or (8 if a.smoke else 256), a.reps or (1 if a.smoke else 3), a.tier, lose_node=a.lose_node)
    print(table(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return r


if __name__ == "__main__":
    main()
