"""Mean time to recovery: a worker SIGKILLed under ``torchrun --max-restarts`` comes back.

A job under ``recoverkit.protect`` (``bench/_workers.py mttr``) saves lazily every step (host
snapshot every step; a durable tier every ``--save-every`` steps), and on torchrun's first attempt
SIGKILLs itself after step ``--die-at`` (once the saves made so far have drained). torchrun
(``--monitor-interval 0.1``) restarts it; the new worker resumes by itself. From wall-clock events
both attempts append to one file we report, per source the state comes back from:

* **restart/launch**: the kill -> the new interpreter reaches the worker module (torchrun noticing
  the death, tearing down, starting Python);
* **import**: ``import torch, recoverkit`` and building the model and optimizer;
* **restore read**: entering ``protect`` (Checkpointer start-up, discovery, read + verify every
  byte, apply);
* **first step**: the first training step after the resume;
* **steps lost**: the step killed at minus the step resumed from.

Sources: **local disk** (segment files, every ``save_every`` steps) and the **persistent zarr tier**
(``TierPolicy(local_every=0, persistent_url=file://..., persistent_every=save_every)``). The **host
snapshot** tier lives in the trainer's own staging pool (process memory): a SIGKILL destroys it, so
after a process kill it restores nothing and the restart falls back to the next tier. Nothing in
recoverkit keeps it alive in a surviving agent or peer yet (ElasWave peer replicas are not built).
What it *would* give is measured in-process: the rollback time of ``restore`` from the host snapshot
of the last step (0 steps lost) next to an in-process restore from local disk.

Run: ``python -m bench.bench_mttr [--smoke] [--size-mib 64] [--reps 3] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy, TierPolicy
from recoverkit.config import StagingPolicy

from ._workers import small_model, train_step, width_for
from .machine import median
from .report import fmt_bytes, publish

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("launch", "import", "restore", "first_step")


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _one(base: str, source: str, width: int, steps: int, save_every: int, die_at: int, i: int) -> dict[str, Any]:
    d = os.path.join(base, f"{source}-{i}")
    os.makedirs(d)
    root, events = os.path.join(d, "ckpt"), os.path.join(d, "events.jsonl")
    purl = f"file://{d}/zarr"
    cmd = _torchrun() + [
        "--standalone", "--nproc-per-node=1", "--max-restarts=1", "--monitor-interval=0.1",
        "-m", "bench._workers", "mttr", root, events, source, str(steps), str(save_every), str(die_at), str(width), purl,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    wall = time.time() - t
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}): {proc.stderr[-3000:]}")
    evs = [json.loads(line) for line in open(events)]
    a1 = {e["event"]: e for e in evs if e["attempt"] == 1}
    kill = next(e for e in evs if e["event"] == "kill")
    first = a1["first_step"]
    out = {
        "source": source,
        "killed_at_step": kill["step"],
        "resumed_from": a1["restored"]["resumed"],
        "steps_lost": kill["step"] - (a1["restored"]["resumed"] or 0),
        "launch": a1["launched"]["t"] - kill["t"],
        "import": a1["restored"]["t_enter"] - a1["launched"]["t"],  # + building the model
        "restore": a1["restored"]["t"] - a1["restored"]["t_enter"],
        "first_step": first["t"] - a1["restored"]["t"],
        "mttr": first["t"] - kill["t"],
        "finished": any(e["event"] == "done" and e["attempt"] == 1 for e in evs),
        "torchrun_wall_s": wall,
    }
    return out


def _host_inprocess(width: int, save_every: int, base: str, reps: int) -> dict[str, Any]:
    """Rollback in a live process: restore from the host snapshot vs from local disk."""
    model, opt = small_model(width)
    nbytes = sum(p.numel() * 4 for p in model.parameters()) * 3
    state = {"model": model, "optimizer": opt}
    opts = CheckpointOptions(tiers=TierPolicy(host_keep=1, local_every=save_every), retention=RetentionPolicy(keep_last=2),
                             staging=StagingPolicy(budget_bytes=4 * nbytes + (16 << 20)))
    host, local = [], []
    with Checkpointer(os.path.join(base, "host"), options=opts) as ckpt:
        for s in range(1, 2 * save_every + 4):
            train_step(model, opt, s)
            ckpt.save_async(s, state)
        ckpt.wait()
        last = s
        for _ in range(reps):
            t = time.perf_counter()
            got = ckpt.restore(state)  # the newest step is only in host memory
            host.append(time.perf_counter() - t)
            assert got == last, (got, last)
    with Checkpointer(os.path.join(base, "host"), options=CheckpointOptions(lock=False)) as ck2:
        for _ in range(reps):
            t = time.perf_counter()
            got_local = ck2.restore(state)
            local.append(time.perf_counter() - t)
    return {"host_restore_s": median(host), "local_restore_s": median(local), "host_step": last,
            "local_step": got_local, "host_steps_lost": 0, "local_steps_lost": last - got_local, "bytes": nbytes}


def run(smoke: bool = False, size_mib: int | None = None, reps: int | None = None, workdir: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    size_mib = size_mib or (4 if smoke else 64)
    reps = reps or (1 if smoke else 3)
    width = width_for(size_mib << 20)
    steps, save_every, die_at = (14, 5, 12) if smoke else (30, 10, 25)
    base = tempfile.mkdtemp(prefix="rk-bench-mttr-", dir=workdir)
    runs: list[dict[str, Any]] = []
    try:
        for i in range(reps):
            for source in ("local", "persistent"):
                runs.append(_one(base, source, width, steps, save_every, die_at, i))
        host = _host_inprocess(width, save_every, base, 3)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary = {}
    for source in ("local", "persistent"):
        rs = [r for r in runs if r["source"] == source]
        summary[source] = {k: median([r[k] for r in rs]) for k in (*PHASES, "mttr", "steps_lost")}
    return {
        "scenario": "mttr", "smoke": smoke, "state_bytes": host["bytes"], "reps": reps,
        "steps": steps, "save_every": save_every, "die_at": die_at,
        "summary": summary, "host_inprocess": host, "runs": runs,
        "host_after_process_kill": "not restorable: the snapshot lives in the killed process's staging pool",
        "runtime_s": time.perf_counter() - t0,
    }


def table(r: dict[str, Any]) -> str:
    h = r["host_inprocess"]
    lines = [
        f"state {fmt_bytes(r['state_bytes'])} (MLP + AdamW); lazy save every step, durable tier every {r['save_every']} steps; "
        f"SIGKILL after step {r['die_at']}; median of {r['reps']}" + (" [smoke]" if r["smoke"] else "")
        + f"; runtime {r['runtime_s']:.0f} s",
        "",
        "| restored from | restart/launch s | import s | restore read s | first step s | MTTR s | steps lost |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| host snapshot (after a process kill) | - | - | not available | - | falls back to the next tier | - |",
    ]
    for src, s in r["summary"].items():
        name = "local disk" if src == "local" else "persistent zarr tier"
        lines.append(f"| {name} | {s['launch']:.2f} | {s['import']:.2f} | {s['restore']:.3f} | {s['first_step']:.3f} | "
                     f"{s['mttr']:.2f} | {s['steps_lost']:.0f} |")
    lines += [
        "",
        f"- host snapshot in a live process (rollback, e.g. the loss guard): restore {h['host_restore_s'] * 1e3:.1f} ms, "
        f"0 steps lost, vs an in-process restore from local disk {h['local_restore_s'] * 1e3:.1f} ms "
        f"({h['local_steps_lost']} steps lost). After a SIGKILL the host snapshot is gone with the process: "
        "no surviving agent or peer keeps it today.",
        "- restart/launch includes torchrun noticing the death (monitor interval 0.1 s) and starting a new interpreter; "
        "import includes building the model; restore read is protect() entry (start-up, discovery, verified read, apply).",
    ]
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        rows = list(r["summary"].items())
        for y, (_src, s) in enumerate(rows):
            left = 0.0
            for j, ph in enumerate(PHASES):
                ax.barh(y, s[ph], left=left, color=f"C{j}", label=ph if y == 0 else None)
                left += s[ph]
        ax.set_yticks(range(len(rows)), [f"{src}\n({s['steps_lost']:.0f} steps lost)" for src, s in rows])
        ax.set_xlabel("seconds from the SIGKILL")
        ax.set_title("recovery timeline under torchrun --max-restarts")
        ax.legend(loc="lower right")

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--size-mib", type=int, default=None, help="state size (default 64; smoke 4)")
    ap.add_argument("--reps", type=int, default=None, help="restarts per source (default 3; smoke 1)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    r = run(a.smoke, a.size_mib, a.reps, a.workdir)
    text = table(r)
    print(text)
    publish("mttr", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
