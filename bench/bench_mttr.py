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
(``TierPolicy(local_every=0, persistent_url=file://..., persistent_every=save_every)``), one process
per node; and **local disk, 2 ranks**: a 2-rank DDP job (gloo, ``--nproc-per-node 2``) whose rank 1
is SIGKILLed, so torchrun tears down the survivor too and restarts both (the phases are the slower
rank's; this module is that worker: ``python -m bench.bench_mttr --worker ...``). Every torchrun
runs with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with torch's default the agent's store is kept
across restarts and gloo's ``init_process_group`` on a restart fails or hangs in about half of the
runs (see the README, "torchrun"). The **host
snapshot** tier lives in the trainer's own staging pool (process memory): a SIGKILL destroys it, so
after a process kill it restores nothing and the restart falls back to the next tier. Nothing in
recoverkit keeps it alive in a surviving agent or peer yet (ElasWave peer replicas are not built).
What it *would* give is measured in-process: the rollback time of ``restore`` from the host snapshot
of the last step (0 steps lost) next to an in-process restore from local disk.

Run: ``python -m bench.bench_mttr [--smoke] [--size-mib 64] [--reps 3] [--ranks 1 2] [--out-dir DIR]``.
"""

from __future__ import annotations

# ruff: noqa: E402 - the imports follow T0 on purpose
import time

T0 = time.time()  # first thing: the moment a worker's interpreter reached the module (launch time)

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

import torch

from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy, TierPolicy
from recoverkit.config import StagingPolicy

from ._workers import event_log, small_model, train_step, width_for
from .machine import median
from .report import fmt_bytes, publish

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("launch", "import", "restore", "first_step")
#: (summary key, source tier, ranks) of each case
CASES = (("local", "local", 1), ("persistent", "persistent", 1), ("local-2rank", "local", 2))
NAMES = {"local": "local disk", "persistent": "persistent zarr tier", "local-2rank": "local disk, 2 ranks (DDP)"}


def torchrun_env() -> dict[str, str]:
    """The environment of every torchrun here: the agent's store is not shared with the workers."""
    return dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _one(
    base: str, case: str, source: str, ranks: int, width: int, steps: int, save_every: int, die_at: int, i: int
) -> dict[str, Any]:
    d = os.path.join(base, f"{case}-{i}")
    os.makedirs(d)
    root, events = os.path.join(d, "ckpt"), os.path.join(d, "events.jsonl")
    purl = f"file://{d}/zarr"
    args = [root, events, source, str(steps), str(save_every), str(die_at), str(width), purl]
    worker = ["bench._workers", "mttr"] if ranks == 1 else ["bench.bench_mttr", "--worker"]
    cmd = _torchrun() + [
        "--standalone", f"--nproc-per-node={ranks}", "--max-restarts=1", "--monitor-interval=0.1", "-m", *worker, *args,
    ]
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=torchrun_env())
    wall = time.time() - t
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}): {proc.stderr[-3000:]}")
    evs = [json.loads(line) for line in open(events)]
    kill = next(e for e in evs if e["event"] == "kill")
    # the job is back when its slowest rank made its first step: that rank's phases
    firsts = [e for e in evs if e["attempt"] == 1 and e["event"] == "first_step"]
    if len(firsts) != ranks:
        raise RuntimeError(f"{case}: {len(firsts)} of {ranks} ranks made a step after the restart")
    first = max(firsts, key=lambda e: e["t"])
    a1 = {e["event"]: e for e in evs if e["attempt"] == 1 and e["pid"] == first["pid"]}
    out = {
        "case": case,
        "ranks": ranks,
        "source": source,
        "killed_at_step": kill["step"],
        "resumed_from": a1["restored"]["resumed"],
        "steps_lost": kill["step"] - (a1["restored"]["resumed"] or 0),
        "launch": a1["launched"]["t"] - kill["t"],
        "import": a1["restored"]["t_enter"] - a1["launched"]["t"],  # + building the model
        "restore": a1["restored"]["t"] - a1["restored"]["t_enter"],
        "first_step": first["t"] - a1["restored"]["t"],
        "mttr": first["t"] - kill["t"],
        "finished": sum(e["event"] == "done" and e["attempt"] == 1 for e in evs) == ranks,
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


def _ranked_worker(argv: list[str]) -> None:
    """python -m bench.bench_mttr --worker ROOT EVENTS SOURCE STEPS SAVE_EVERY DIE_AT WIDTH [PURL]

    The multi-rank job: DDP over gloo under ``recoverkit.protect``, each rank's batch keyed by
    (step, rank). On torchrun's first attempt rank 1 SIGKILLs itself after step DIE_AT (once the
    saves made so far have drained). Every rank appends its events to EVENTS.
    """
    root, events, source, steps, save_every, die_at, width = argv[:7]
    purl = argv[7] if len(argv) > 7 else None
    steps_i, save_every_i, die_at_i, width_i = int(steps), int(save_every), int(die_at), int(width)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    log = event_log(events, rank=rank)

    log(event="launched", t=T0)
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import recoverkit

    log(event="imported", t=time.time())
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    net, opt = small_model(width_i)
    model = DistributedDataParallel(net)
    if source == "persistent":
        tiers = TierPolicy(host_keep=1, local_every=0, persistent_url=purl, persistent_every=save_every_i)
    else:
        tiers = TierPolicy(host_keep=1, local_every=save_every_i)
    nbytes = sum(p.numel() * 4 for p in net.parameters()) * 3
    opts = CheckpointOptions(
        tiers=tiers, retention=RetentionPolicy(keep_last=2), staging=StagingPolicy(budget_bytes=4 * nbytes + (16 << 20)),
        commit_timeout_s=10.0,
    )
    t_enter = time.time()
    with recoverkit.protect(root, model=model, optimizer=opt, loader=list(range(steps_i)), save_every=1, epochs=None,
                            max_steps=steps_i, options=opts) as run:
        log(event="restored", t=time.time(), t_enter=t_enter, resumed=run.resumed_from)
        first = True
        for _ in run:
            done = run.step + 1
            g = torch.Generator().manual_seed(1000 * done + rank)
            loss = model(torch.randn(16, width_i, generator=g)).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if first:
                log(event="first_step", t=time.time(), step=done)
                first = False
            if done == die_at_i and attempt == 0 and rank == 1:
                run.ckpt.wait()  # the saves made so far have drained (a steady-state crash)
                log(event="kill", t=time.time(), step=done)
                os.kill(os.getpid(), signal.SIGKILL)
    log(event="done", t=time.time(), step=run.step)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(
    smoke: bool = False, size_mib: int | None = None, reps: int | None = None, workdir: str | None = None,
    ranks: tuple[int, ...] = (1, 2),
) -> dict[str, Any]:
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
            for case, source, n in CASES:
                if n in ranks:
                    runs.append(_one(base, case, source, n, width, steps, save_every, die_at, i))
        host = _host_inprocess(width, save_every, base, 3)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary = {}
    for case, _source, _n in CASES:
        rs = [r for r in runs if r["case"] == case]
        if rs:
            summary[case] = {k: median([r[k] for r in rs]) for k in (*PHASES, "mttr", "steps_lost")}
    return {
        "scenario": "mttr", "smoke": smoke, "state_bytes": host["bytes"], "reps": reps, "ranks": list(ranks),
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
    for case, s in r["summary"].items():
        name = NAMES.get(case, case)
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
        "- 2 ranks: rank 1 is killed; the survivor's collective fails and torchrun restarts both; the phases are those of "
        "the rank that made its first step last, and its import includes init_process_group. Every torchrun ran with "
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.",
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
        ax.set_yticks(range(len(rows)), [f"{NAMES.get(c, c)}\n({s['steps_lost']:.0f} steps lost)" for c, s in rows])
        ax.set_xlabel("seconds from the SIGKILL")
        ax.set_title("recovery timeline under torchrun --max-restarts")
        ax.legend(loc="lower right")

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--size-mib", type=int, default=None, help="state size (default 64; smoke 4)")
    ap.add_argument("--reps", type=int, default=None, help="restarts per source (default 3; smoke 1)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                    help="process counts to measure (default: 1 and 2)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    r = run(a.smoke, a.size_mib, a.reps, a.workdir, tuple(a.ranks))
    text = table(r)
    print(text)
    publish("mttr", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _ranked_worker(sys.argv[2:])
    else:
        main()
