"""Mean time to recovery: a worker SIGKILLed under ``torchrun --max-restarts`` comes back, per source.

A job (``python -m bench._workers mttr``: a Checkpointer, ``save_async`` every step, an MLP +
AdamW) is SIGKILLed after step ``die_at`` on torchrun's first attempt, once the saves made so far
have drained (a steady-state crash). torchrun (``--monitor-interval 0.1``) restarts it; the new
worker restores by itself and trains on. From wall-clock events of both attempts and the torchrun
agent's own log line of the death, each recovery is split into:

* **detection**: the SIGKILL -> the torchrun agent logs the worker's death;
* **relaunch**: -> the new interpreter reaches the worker module (the agent tearing down,
  re-rendezvous for 2 nodes, starting Python);
* **import**: ``import torch, recoverkit``, the gloo process group (2 nodes), the model;
* **start-up**: opening the Checkpointer (lock, tiers, the shared-memory job directory);
* **state transfer**: ``restore``: agreeing on the newest step, reading + verifying every byte,
  applying it (its bandwidth is compared with a memcpy of the state, and for the peer replica with
  the gloo point-to-point bandwidth, both measured in the same run);
* **first step**: the first training step after the restore;
* **steps lost**: the step killed at minus the step resumed from.

Sources (rows):

* **own shared memory** (``shm``): the shared-memory tier every step (it outlives the process);
  torchrun restarts the process on the same "node" and it maps the newest complete snapshot;
  ``shm-inplace``: the same, the restore run inside ``in_place_reads()`` (tensors copied straight
  from shared memory into the live ones, CRCs verified first);
* **peer replica** (``replica``): 2 simulated nodes, one torchrun agent each (``RECOVERKIT_NODE``
  per agent, a c10d rendezvous on 127.0.0.1), one rank per node, DDP; shared memory + a replica of
  every step on the other node. Node 1 is lost: its shared memory is deleted
  (``rm -rf <shm_dir>/recoverkit/<node>``) and its process SIGKILLed; both agents restart their
  workers; rank 1 gets its state from node 0's replica. The checkpoint root is one shared
  directory (the local tier needs a file system every rank sees), so it is not deleted: its
  newest step is ``save_every`` steps older, and a restore from it would show as steps lost;
* **local disk** and **persistent zarr tier**, one process (in-process host snapshot every step,
  the durable tier every ``save_every`` steps: after a SIGKILL the host snapshot is gone);
* **local disk, 2 nodes**: the peer-replica job's world, without the memory tiers;
* **torchft** (:mod:`bench._torchft`): two replica groups, one killed and healed live from the
  other, the same model; steps lost 0 by construction (the survivor's steps are kept), its
  detection is the survivor's stall until it commits a step alone.

A source whose tier kinds this recoverkit does not have (or torchft, when not installed) is
reported as not run, with the reason. Every torchrun of recoverkit runs with
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (with torch's default the agent's store is kept across
restarts and gloo's ``init_process_group`` on a restart fails or hangs in about half of the runs).

Run: ``python -m bench.bench_mttr [--smoke] [--size-mib 64] [--reps 3] [--cases shm,replica,...]
[--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any

from . import _torchft
from ._common import free_port
from ._workers import memory_tiers_missing, width_for
from .machine import median
from .report import fmt_bytes, publish

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("detection", "relaunch", "import", "startup", "transfer", "first_step")
#: (case, source tier, nodes: 1 = one process under one agent, 2 = one rank per node, 2 agents)
CASES = (("shm", "shm", 1), ("shm-inplace", "shm", 1), ("replica", "replica", 2), ("local", "local", 1), ("persistent", "persistent", 1),
         ("local-2node", "local", 2))
NAMES = {
    "shm": "own shared memory (1 process)",
    "shm-inplace": "own shared memory, in-place read (1 process)",
    "replica": "peer replica (2 nodes, node 1 lost)",
    "local": "local disk (1 process)",
    "persistent": "persistent zarr tier (1 process)",
    "local-2node": "local disk (2 nodes, process killed)",
    "torchft": "torchft: live from the healthy replica group",
}
ALL_CASES = tuple(c for c, _s, _n in CASES) + ("torchft",)
_DEATH = re.compile(r"^[EWI](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2}\.\d+) .*failed \(exitcode: -9\)", re.M)


def torchrun_env() -> dict[str, str]:
    """The environment of every recoverkit torchrun here: the agent's store is not shared."""
    return dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _death_time(log_text: str, near: float) -> float | None:
    """The wall-clock time of the agent's log line of a SIGKILLed worker (glog-style, local time)."""
    m = _DEATH.search(log_text)
    if not m:
        return None
    mon, day, hh, mm, ss = m.groups()
    lt = time.localtime(near)
    # the line has no year: the kill's
    return time.mktime((lt.tm_year, int(mon), int(day), int(hh), int(mm), 0, 0, 0, lt.tm_isdst)) + float(ss)


# --------------------------------------------------------------------------- one recovery
def _one(base: str, case: str, source: str, nodes: int, width: int, steps: int, save_every: int, die_at: int,
         i: int) -> dict[str, Any]:
    d = os.path.join(base, f"{case}-{i}")
    os.makedirs(d)
    shm_dir = tempfile.mkdtemp(prefix=f"rk-bench-mttr-{case}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else d)
    events = os.path.join(d, "events.jsonl")
    cfg = {"root": os.path.join(d, "ckpt"), "events": events, "source": source, "steps": steps,
           "save_every": save_every, "die_at": die_at, "width": width, "purl": f"file://{d}/zarr",
           "in_place": case.endswith("-inplace")}
    try:
        procs, logs = [], []
        rdzv = ["--standalone"] if nodes == 1 else [
            "--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id=mttr-{case}-{i}"]
        t = time.time()
        for n in range(nodes):
            env = dict(torchrun_env(), RECOVERKIT_SHM_DIR=shm_dir, RECOVERKIT_NODE=f"node{n}")
            cmd = _torchrun() + rdzv + ["--nproc-per-node=1", "--max-restarts=1", "--monitor-interval=0.1",
                                        "-m", "bench._workers", "mttr", json.dumps(cfg)]
            log = os.path.join(d, f"agent{n}.log")
            logs.append(log)
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 600
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=30)
        wall = time.time() - t
        texts = [open(f, errors="replace").read() for f in logs]
        codes = [p.returncode for p in procs]
        if any(codes):
            raise RuntimeError(f"{case}: torchrun exit codes {codes}:\n" + "\n".join(x[-2500:] for x in texts))
        shm_left = sum(len(fs) for _, _, fs in os.walk(shm_dir))
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
    evs = [json.loads(line) for line in open(events)] if os.path.exists(events) else []
    kill = next((e for e in evs if e["event"] == "kill"), None)
    if kill is None:
        raise RuntimeError(f"{case}: no rank was killed: {evs[-6:]}\n" + "\n".join(x[-2000:] for x in texts))
    # the second life of each rank: processes launched after the kill (a survivor's agent may
    # restart it for the membership change without counting an attempt, so not by attempt)
    pids = {e["pid"] for e in evs if e["event"] == "launched" and e["t"] > kill["t"]}
    after = [e for e in evs if e["pid"] in pids]
    # the phases are the killed rank's (its node was lost); the job is back when its slowest
    # rank made its first step
    firsts = [e for e in after if e["event"] == "first_step"]
    if len(firsts) != nodes:
        raise RuntimeError(f"{case}: {len(firsts)} of {nodes} ranks made a step after the restart: {evs[-12:]}")
    first = max(firsts, key=lambda e: e["t"])
    a1 = {e["event"]: e for e in after if e.get("rank", 0) == kill.get("rank", 0)}
    r = a1["restored"]
    died = _death_time(texts[nodes - 1], kill["t"])  # the killed rank's agent
    detect = (died - kill["t"]) if died is not None and died >= kill["t"] - 0.01 else None
    resumed = min(e["resumed"] or 0 for e in after if e["event"] == "restored")
    return {
        "case": case, "nodes": nodes, "source": source,
        "killed_at_step": kill["step"], "resumed_from": resumed, "steps_lost": kill["step"] - resumed,
        "detection": detect if detect is not None else 0.0,
        "detection_measured": detect is not None,
        "relaunch": a1["launched"]["t"] - kill["t"] - (detect or 0.0),
        "import": r["t_enter"] - a1["launched"]["t"],
        "startup": r["t_open"] - r["t_enter"],
        "transfer": r["t"] - r["t_open"],
        "first_step": first["t"] - r["t"],
        "mttr": first["t"] - kill["t"],
        "bytes": r["bytes"],
        "transfer_gbps": r["bytes"] / max(1e-9, r["t"] - r["t_open"]) / 1e9,
        "finished": sum(e["event"] == "done" for e in after) == nodes,
        "replica_held_at_kill": next((e["held"] for e in evs if e["event"] == "replicated"), None),
        "shm_files_left": shm_left,
        "torchrun_wall_s": wall,
    }


# --------------------------------------------------------------------------- the limits, same run
def memcpy_gbps(nbytes: int, reps: int = 5) -> float:
    """A plain 1-thread memcpy of ``nbytes`` (numpy), GB/s, median of ``reps``."""
    import numpy as np

    src = np.ones(max(1, nbytes), dtype=np.uint8)
    dst = np.empty_like(src)
    ts = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t)
    return nbytes / median(ts[1:]) / 1e9


def _p2p_rank(rank: int, port: int, nbytes: int, reps: int, q: Any) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=120))
        buf = torch.ones(nbytes, dtype=torch.uint8)
        ts = []
        for _ in range(reps + 1):
            dist.barrier()
            t = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
            else:
                dist.recv(buf, 0)
            ts.append(time.perf_counter() - t)
        if rank == 1:
            q.put(("ok", ts[1:]))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def gloo_p2p_gbps(nbytes: int, reps: int = 3, timeout_s: float = 120.0) -> float:
    """gloo point-to-point bandwidth between two processes on 127.0.0.1 (send -> recv), GB/s."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_p2p_rank, args=(r, port, nbytes, reps, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        status, value = q.get(timeout=timeout_s)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise RuntimeError(f"gloo p2p bandwidth: {value}")
    return nbytes / median(value) / 1e9


# --------------------------------------------------------------------------- run
def run(
    smoke: bool = False, size_mib: int | None = None, reps: int | None = None, workdir: str | None = None,
    cases: tuple[str, ...] = ALL_CASES, torchft_transport: str = "pg", schedule: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    size_mib = size_mib or (4 if smoke else 64)
    reps = reps or (1 if smoke else 3)
    width = width_for(size_mib << 20)
    steps, save_every, die_at = schedule or ((14, 5, 12) if smoke else (30, 10, 25))
    if not 0 < die_at < steps or save_every < 1:
        raise ValueError(f"need 0 < die_at < steps and save_every >= 1, got {(steps, save_every, die_at)}")
    base = tempfile.mkdtemp(prefix="rk-bench-mttr-", dir=workdir)
    runs: list[dict[str, Any]] = []
    not_run: dict[str, str] = {}
    torchft: dict[str, Any] | None = None
    state_bytes = width * width * 3 * 4 * 3
    try:
        for case, source, nodes in CASES:
            if case not in cases:
                continue
            why = memory_tiers_missing(source)
            if why:
                not_run[case] = why
                continue
            for i in range(reps):
                try:
                    runs.append(_one(base, case, source, nodes, width, steps, save_every, die_at, i))
                except Exception as e:  # noqa: BLE001 - one source failing leaves the others' rows
                    not_run[case] = f"failed: {str(e)[-1500:]}"
                    print(f"[mttr] {case} failed:\n{e}", file=sys.stderr, flush=True)
                    break
        if "torchft" in cases:
            why = _torchft.available()
            if why:
                not_run["torchft"] = why
            else:
                try:
                    torchft = _torchft.run_mttr(width, die_at=die_at, reps=reps, transport=torchft_transport,
                                                workdir=base)
                except Exception as e:  # noqa: BLE001
                    not_run["torchft"] = f"failed: {str(e)[-1500:]}"
                    print(f"[mttr] torchft failed:\n{e}", file=sys.stderr, flush=True)
        memcpy = memcpy_gbps(state_bytes)
        p2p = gloo_p2p_gbps(state_bytes) if any(r["case"] == "replica" for r in runs) or not smoke else None
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary: dict[str, dict[str, Any]] = {}
    for case in ALL_CASES:
        rs = [r for r in runs if r["case"] == case]
        if rs:
            summary[case] = {k: median([r[k] for r in rs]) for k in (*PHASES, "mttr", "steps_lost", "transfer_gbps")}
            summary[case]["runs"] = len(rs)
    if torchft is not None:
        s = torchft["summary"]
        summary["torchft"] = {
            "detection": s["detection"], "relaunch": s["relaunch"], "import": s["import"], "startup": 0.0,
            "transfer": s["join_transfer"], "first_step": s["first_step"], "mttr": s["mttr"], "steps_lost": 0,
            "transfer_gbps": s["transfer_gbps"], "runs": len(torchft["runs"]),
        }
    targets: dict[str, Any] = {}
    if "shm" in summary:
        targets["shm_transfer_vs_memcpy"] = summary["shm"]["transfer_gbps"] / memcpy
        targets["shm_steps_lost"] = summary["shm"]["steps_lost"]
    if "shm-inplace" in summary:
        targets["shm_inplace_transfer_vs_memcpy"] = summary["shm-inplace"]["transfer_gbps"] / memcpy
    if "replica" in summary and p2p:
        targets["replica_transfer_vs_gloo_p2p"] = summary["replica"]["transfer_gbps"] / p2p
        targets["replica_steps_lost"] = summary["replica"]["steps_lost"]
    return {
        "scenario": "mttr", "smoke": smoke, "state_bytes": state_bytes, "reps": reps, "cases": list(cases),
        "steps": steps, "save_every": save_every, "die_at": die_at,
        "memcpy_gbps": memcpy, "gloo_p2p_gbps": p2p, "summary": summary, "targets": targets, "runs": runs,
        "torchft": torchft, "not_run": not_run,
        "shm_files_left": sum(r["shm_files_left"] for r in runs),
        "runtime_s": time.perf_counter() - t0,
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"state {fmt_bytes(r['state_bytes'])} (MLP + AdamW); save_async every step (memory tiers every step, the disk "
        f"tier every {r['save_every']} steps); SIGKILL after step {r['die_at']}; torchrun --max-restarts=1 "
        f"--monitor-interval=0.1; median of {r['reps']}" + (" [smoke]" if r["smoke"] else "")
        + f"; runtime {r['runtime_s']:.0f} s",
        "",
        "| restored from | detection s | relaunch s | import s | start-up s | state transfer s (GB/s) | first step s "
        "| MTTR s | steps lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in ALL_CASES:
        s = r["summary"].get(case)
        if s is None:
            if case in r["not_run"]:
                lines.append(f"| {NAMES[case]} | not run: {r['not_run'][case].splitlines()[0][:160]} ||||||||")
            continue
        gbps = f" ({s['transfer_gbps']:.2f})" if s.get("transfer_gbps") else ""
        if case == "torchft" and s.get("transfer_gbps"):
            gbps = f" (its receive alone {s['transfer_gbps']:.2f})"
        lines.append(
            f"| {NAMES[case]} | {s['detection']:.2f} | {s['relaunch']:.2f} | {s['import']:.2f} | {s['startup']:.3f} | "
            f"{s['transfer']:.3f}{gbps} | {s['first_step']:.3f} | {s['mttr']:.2f} | {s['steps_lost']:.0f} |")
    lines.append("")
    lines.append(f"- limits in the same run: memcpy of the state {r['memcpy_gbps']:.2f} GB/s (1 thread)"
                 + (f"; gloo point-to-point {r['gloo_p2p_gbps']:.2f} GB/s (127.0.0.1)" if r["gloo_p2p_gbps"] else ""))
    t = r["targets"]
    if "shm_transfer_vs_memcpy" in t:
        lines.append(f"- own shared memory: state transfer {t['shm_transfer_vs_memcpy']:.2f}x memcpy (target >= 0.5: "
                     f"{'met' if t['shm_transfer_vs_memcpy'] >= 0.5 else 'MISSED'}); steps lost "
                     f"{t['shm_steps_lost']:.0f} (target 0: {'met' if t['shm_steps_lost'] == 0 else 'MISSED'})")
    if "shm_inplace_transfer_vs_memcpy" in t:
        v = t["shm_inplace_transfer_vs_memcpy"]
        lines.append(f"- own shared memory read in place (`recoverkit.restore.reader.in_place_reads()` around "
                     f"`restore`): {v:.2f}x memcpy (target >= 0.5: {'met' if v >= 0.5 else 'MISSED'})")
    if "replica_transfer_vs_gloo_p2p" in t:
        lines.append(f"- peer replica: state transfer {t['replica_transfer_vs_gloo_p2p']:.2f}x the gloo point-to-point "
                     f"bandwidth (target >= 0.5: {'met' if t['replica_transfer_vs_gloo_p2p'] >= 0.5 else 'MISSED'}); "
                     f"steps lost {t['replica_steps_lost']:.0f} (target 0: "
                     f"{'met' if t['replica_steps_lost'] == 0 else 'MISSED'})")
    lines += [
        "- state transfer is the whole `restore` (agreeing on the step, reading and verifying every byte, applying); "
        "its GB/s is the state's bytes over that time. Detection is the torchrun agent's log line of the death; "
        "relaunch includes the agent's teardown (and the 2-node re-rendezvous); import includes the process group and "
        "the model. 2 nodes: the phases of the killed rank, its first step when the slower rank made its own.",
    ]
    ft = r.get("torchft")
    if ft:
        s = ft["summary"]
        lines.append(
            f"- torchft ({ft['settings']['transport']} transport; lighthouse heartbeat timeout "
            f"{ft['settings']['lighthouse']['heartbeat_timeout_ms']} ms): detection is the surviving group's stall until "
            f"it commits a step alone; the healed group's state transfer column is joining the quorum + receiving the "
            f"state ({(s['transfer'] or 0) * 1e3:.1f} ms of it the transport's receive) + applying it; the survivor made "
            f"{s['survivor_steps_alone']:.0f} steps with half the replicas meanwhile; nothing is rolled back.")
    left = {x["case"]: x["shm_files_left"] for x in r["runs"] if x["shm_files_left"]}
    if left:
        lines.append("- files left in the run's shared-memory directory after the job ended normally: "
                     + ", ".join(f"{NAMES[c]} {n}" for c, n in left.items()))
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        rows = [(c, s) for c, s in r["summary"].items()]
        for y, (_c, s) in enumerate(rows):
            left = 0.0
            for j, ph in enumerate(PHASES):
                ax.barh(y, s[ph], left=left, color=f"C{j}", label=ph if y == 0 else None)
                left += s[ph]
        ax.set_yticks(range(len(rows)), [f"{NAMES.get(c, c)}\n({s['steps_lost']:.0f} steps lost)" for c, s in rows],
                      fontsize=7)
        ax.set_xlabel("seconds from the SIGKILL")
        ax.set_title("recovery timeline")
        ax.legend(loc="lower right", fontsize=7)

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--size-mib", type=int, default=None, help="state size (default 64; smoke 4)")
    ap.add_argument("--reps", type=int, default=None, help="restarts per source (default 3; smoke 1)")
    ap.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma-separated, of {','.join(ALL_CASES)}")
    ap.add_argument("--torchft-transport", default="pg", choices=["pg", "http"])
    ap.add_argument("--schedule", default=None, help="STEPS,SAVE_EVERY,DIE_AT (default 30,10,25; smoke 14,5,12): "
                    "steps per job, the disk tier's interval, the step killed after")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    cases = tuple(c.strip() for c in a.cases.split(",") if c.strip())
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(ALL_CASES)}")
    schedule = None
    if a.schedule:
        try:
            steps, every, die = (int(x) for x in a.schedule.split(","))
        except ValueError:
            ap.error(f"--schedule takes STEPS,SAVE_EVERY,DIE_AT, got {a.schedule!r}")
        schedule = (steps, every, die)
    r = run(a.smoke, a.size_mib, a.reps, a.workdir, cases, a.torchft_transport, schedule)
    text = table(r)
    print(text)
    publish("mttr", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
