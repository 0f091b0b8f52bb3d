"""Rank failure: one rank of a 2-4 rank gloo world is SIGKILLed mid-save.

Every world is forked from this process (torch imported once) and runs a real
``torch.distributed`` gloo group with its TCP store on rank 0. All ranks save step 1, then save
step 2 while the victim rank dies by a real SIGKILL (``FaultInjector.kill_at``) at a phase of the
two-phase commit: before or after writing its data, or, when the victim is rank 0 (the
coordinator, which also hosts the store), just before or after the manifest. Each surviving rank
records when its save raised; the victim records the instant before it died.

Figures per trial: no hang (every survivor returns within ``commit_timeout_s`` + slack), no
commit of step 2, every survivor raised ``CommitError`` (detection; must be 100 %), detection
latency per rank next to the timeout, the previous step still the newest valid one (restored),
temporary directories left (cleaned by the next start-up).

Run: ``python -m bench.bench_rank_failure [--smoke] [--timeout-s 5] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch  # noqa: F401 - imported before forking
import torch.distributed  # noqa: F401

from recoverkit import Checkpointer, CheckpointOptions

from ._common import free_port
from ._workers import fork_child, leftovers, small_model, train_step, warm
from .report import publish

SLACK_S = 20.0  # a survivor that has not returned by timeout + this is a hang


def _rank(w: int, rank: int, world: int, port: int, root: str, out: str, victim: int, phase: str, timeout_s: float,
          use_async: bool) -> None:
    import torch.distributed as dist

    from recoverkit.storage.faults import FaultInjector

    class Recorder(FaultInjector):
        def reached(self, phase_: str, *, step: int | None = None, rank: int | None = None) -> None:
            if armed and phase_ == phase and step == 2:
                with open(os.path.join(out, "killed.json"), "w") as f:
                    json.dump({"t": time.time(), "rank": rank_, "phase": phase_}, f)
            super().reached(phase_, step=step, rank=rank)

    rank_ = rank
    armed = False
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    faults = Recorder()
    ckpt = Checkpointer(root, options=CheckpointOptions(commit_timeout_s=timeout_s), faults=faults)
    model, opt = small_model(64)
    state = {"model": model, "optimizer": opt}
    train_step(model, opt, 1)
    ckpt.save(1, state)
    dist.barrier()
    if rank == victim:
        armed = True
        # no rank filter: this injector lives in the victim only (and the tiers announce the
        # manifest phases without a rank, so a rank-filtered rule would never fire there)
        faults.kill_at(phase=phase, step=2)
    train_step(model, opt, 2)
    res: dict[str, Any] = {"rank": rank}
    t0 = time.time()
    try:
        if use_async:
            h = ckpt.save_async(2, state)
            h.wait()
        else:
            ckpt.save(2, state)
        res["outcome"] = "committed"
    except Exception as e:  # noqa: BLE001 - the figure
        res["outcome"] = type(e).__name__
        res["message"] = str(e)[:400]
    res["t_error"] = time.time()
    res["t_save"] = t0
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(res, f)
    os._exit(0)  # peers are dead: no barrier, no teardown (gloo would wait or abort)


def _trial(base: str, world: int, victim: int, phase: str, use_async: bool, *, timeout_s: float, i: int) -> dict[str, Any]:
    d = os.path.join(base, f"t{i}")
    root, out = os.path.join(d, "ckpt"), os.path.join(d, "out")
    os.makedirs(out)
    port = free_port()
    t0 = time.monotonic()
    kids = [fork_child(_rank, r, world, port, root, out, victim, phase, timeout_s, use_async) for r in range(world)]
    deadline = t0 + timeout_s + SLACK_S + 30  # + start-up and step 1
    hung = []
    for r, k in enumerate(kids):
        k.finish(timeout_s=max(1.0, deadline - time.monotonic()))
        if r != victim and not os.path.exists(os.path.join(out, f"rank-{r}.json")):
            hung.append(r)
    errors = [line for k in kids for line in k.lines if line.startswith("E ")]
    if errors:
        raise RuntimeError(f"world {world} victim {victim} {phase}: {errors[0][:1500]}")
    if not kids[victim].killed:
        raise RuntimeError(f"world {world}: victim rank {victim} was not killed at {phase}: {kids[victim].lines[-5:]}")
    killed = json.load(open(os.path.join(out, "killed.json")))
    ranks = {}
    for r in range(world):
        p = os.path.join(out, f"rank-{r}.json")
        if r != victim and os.path.exists(p):
            ranks[r] = json.load(open(p))
    left_before = leftovers(root)
    with Checkpointer(root) as ckpt:  # the next start-up: takes the lock, cleans up
        latest = ckpt.latest()
        steps = ckpt.steps()
        model, opt = small_model(64, seed=5)
        restored = ckpt.restore({"model": model, "optimizer": opt})
    survivors = [r for r in range(world) if r != victim]
    latency = {r: ranks[r]["t_error"] - killed["t"] for r in survivors if r in ranks}
    detected = [r for r in survivors if r in ranks and ranks[r]["outcome"] in ("CommitError", "CommitTimeoutError")]
    return {
        "world": world, "victim": victim, "phase": phase, "path": "save_async" if use_async else "save",
        "timeout_s": timeout_s, "victim_died": bool(killed), "hung_ranks": hung,
        "survivors": len(survivors), "detected": len(detected),
        "outcomes": {r: ranks[r]["outcome"] for r in ranks},
        "messages": {r: ranks[r].get("message", "") for r in ranks},
        "latency_s": latency, "max_latency_s": max(latency.values(), default=None),
        "within_timeout": all(v <= timeout_s + 1.0 for v in latency.values()),
        "step2_committed": 2 in steps, "latest": latest, "restored": restored,
        "leftovers_before_startup": len(left_before), "leftovers_after_startup": len(leftovers(root)),
        "wall_s": time.monotonic() - t0,
    }


def run(smoke: bool = False, timeout_s: float | None = None, workdir: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    warm()
    timeout_s = timeout_s or (2.0 if smoke else 5.0)
    if smoke:
        plan = [(2, 1, "after_data", False), (3, 0, "before_manifest", False), (2, 1, "before_data", True)]
    else:
        plan = []
        for world in (2, 3, 4):
            for phase in ("before_data", "after_data"):
                plan.append((world, world - 1, phase, False))
            for phase in ("before_data", "after_data", "before_manifest", "after_manifest"):
                plan.append((world, 0, phase, False))
        plan += [(2, 1, "before_data", True), (4, 0, "after_data", True)]
    base = tempfile.mkdtemp(prefix="rk-bench-rank-", dir=workdir)
    try:
        trials = [_trial(base, *p, timeout_s=timeout_s, i=i) for i, p in enumerate(plan)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    survivors = sum(t["survivors"] for t in trials)
    return {
        "scenario": "rank_failure",
        "smoke": smoke,
        "timeout_s": timeout_s,
        "trials": len(trials),
        "hangs": sum(len(t["hung_ranks"]) for t in trials),
        "commits_of_failed_step": sum(t["step2_committed"] for t in trials),
        "surviving_ranks": survivors,
        "detected": sum(t["detected"] for t in trials),
        "detection_rate": sum(t["detected"] for t in trials) / max(1, survivors),
        "previous_step_latest": sum(t["latest"] == 1 and t["restored"] == 1 for t in trials),
        "all_within_timeout": all(t["within_timeout"] for t in trials),
        "runtime_s": time.perf_counter() - t0,
        "detail": trials,
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"{r['trials']} worlds, commit_timeout_s = {r['timeout_s']:g}" + (" [smoke]" if r["smoke"] else "")
        + f"; runtime {r['runtime_s']:.0f} s",
        "",
        f"- hangs: {r['hangs']} (required 0); step 2 committed: {r['commits_of_failed_step']} (required 0); "
        f"survivors that raised CommitError: {r['detected']}/{r['surviving_ranks']} ({100 * r['detection_rate']:.0f} %, required 100 %); "
        f"previous step still latest and restored: {r['previous_step_latest']}/{r['trials']}",
        "",
        "| world | victim | killed at | path | detection latency per surviving rank (s) | timeout | step 2 committed | latest | temporaries (before / after start-up) |",
        "|---:|---:|---|---|---|---:|---|---:|---|",
    ]
    for t in r["detail"]:
        lat = ", ".join(f"r{k}: {v:.2f}" for k, v in sorted(t["latency_s"].items(), key=lambda kv: int(kv[0])))
        lines.append(
            f"| {t['world']} | {t['victim']} | {t['phase']} | {t['path']} | {lat} | {t['timeout_s']:g} | "
            f"{'YES' if t['step2_committed'] else 'no'} | {t['latest']} | {t['leftovers_before_startup']} / {t['leftovers_after_startup']} |"
        )
    lines += ["", "- a dead rank 0 takes the rendezvous store with it: the others learn at once (store error); "
              "a dead non-zero rank is named by rank 0's gather timeout, so everyone learns after ~commit_timeout_s."]
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        for i, t in enumerate(r["detail"]):
            ys = list(t["latency_s"].values())
            ax.scatter([i] * len(ys), ys, color="C0" if t["victim"] else "C1", s=18)
        ax.axhline(r["timeout_s"], color="red", linestyle="--", label="commit_timeout_s")
        ax.set_xticks(range(len(r["detail"])), [f"w{t['world']} v{t['victim']}\n{t['phase']}" for t in r["detail"]],
                      rotation=90, fontsize=6)
        ax.set_ylabel("s from the kill to CommitError")
        ax.set_title("detection latency per surviving rank (orange: rank 0 killed)")
        ax.legend()

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--timeout-s", type=float, default=None, help="commit_timeout_s (default 5; smoke 2)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    r = run(a.smoke, a.timeout_s, a.workdir)
    text = table(r)
    print(text)
    publish("rank_failure", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
