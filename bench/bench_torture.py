"""Crash-consistency torture: hundreds of real SIGKILLs during save, commit, tier drains and GC.

Each *trial* is one life of a training job, forked from this process (a fork server: torch is
imported once, see ``bench/_workers.py``). The life resumes from whatever the previous life left in
the checkpoint root (trials of one mode form a chain on one root, so every start-up also cleans up
after a crash), trains and saves every step, and is SIGKILLed:

* **random**: at a uniformly random moment, by this process, while the child saves every step with
  blocking ``save`` (commit + retention inline), ``save_async`` (host snapshot, drain to local disk,
  retention in the drain thread), or ``save_async`` draining to local disk *and* the persistent zarr
  tier;
* **phase**: by ``FaultInjector.kill_at(phase=...)`` at every named phase of the commit protocol, for
  the blocking path, the async path and the persistent tier;
* **op**: by ``FaultInjector.kill_at(op=...)`` through ``FaultyFS`` at a chosen file-system call
  (segment write, manifest write, directory fsync, the commit rename, ``latest``, GC's unpublish
  rename and its tree removal).

Before every save the child sends the digest of the exact state it saves. After each kill a fresh
forked verifier opens the root (taking over the lock, cleaning up), restores the newest step and
compares its digest, then restores *every* selectable step of every tier on its own and compares it.

Figures: trials, valid restores (restore succeeded, digest matches what was saved at that step, no
step reported committed was lost; must be 100 %), partial steps accepted (a selectable step whose
content is not exactly one saved state; must be 0), committed steps that fail verification (must be
0), steps lost per kill (last step begun minus the step restored), and where the kills landed.

Run: ``python -m bench.bench_torture [--smoke] [--trials 500] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import torch  # noqa: F401 - imported once here, before any fork

import recoverkit  # noqa: F401
from recoverkit.storage.faults import PHASES

from ._common import tree_bytes
from ._workers import emit, fork_child, leftovers, small_model, state_digest, train_step, warm
from .report import fmt_bytes, publish

ZARR_PHASES = ("before_data", "after_data", "before_manifest", "after_rename", "retention")
#: (op, path fragment, what it is)
OPS = (
    ("write_segment", None, "segment write"),
    ("write_file", "manifest.json", "manifest write"),
    ("fsync_dir", None, "directory fsync"),
    ("rename", "step-", "commit rename"),
    ("replace", "latest", "latest pointer"),
    ("rename", ".trash-", "GC unpublish rename"),
    ("remove_tree", ".trash-", "GC tree removal"),
)
#: targeted kills at or after the commit point: the step being saved must be the one restored
POST_COMMIT = {"after_rename", "after_latest", "retention", "replace:latest", "rename:.trash-", "remove_tree:.trash-"}
WIDTH = 96  # 3 layers: ~330 KiB of parameters + AdamW moments


# --------------------------------------------------------------------------- the child
def _options(mode: str, purl: str | None) -> Any:
    from recoverkit import CheckpointOptions, RetentionPolicy, TierPolicy
    from recoverkit.config import StagingPolicy

    if mode == "persistent":
        tiers = TierPolicy(host_keep=1, local_every=1, persistent_url=purl, persistent_every=2)
    elif mode == "persistent_only":
        tiers = TierPolicy(host_keep=1, local_every=0, persistent_url=purl, persistent_every=1)
    else:
        tiers = TierPolicy(host_keep=1, local_every=1)
    return CheckpointOptions(
        retention=RetentionPolicy(keep_last=2), tiers=tiers, staging=StagingPolicy(budget_bytes=16 << 20), commit_timeout_s=30
    )


def _life(w: int, mode: str, root: str, purl: str | None, arm: dict[str, Any]) -> None:
    from recoverkit import Checkpointer, CheckpointNotFoundError
    from recoverkit.storage.faults import FaultInjector, FaultyFS

    class Recorder(FaultInjector):
        """Reports every phase (and the armed op) to the parent before a rule may fire."""

        def reached(self, phase: str, *, step: int | None = None, rank: int | None = None) -> None:
            emit(w, "P", phase, step)
            super().reached(phase, step=step, rank=rank)

        def on_op(self, op: str, *paths: str, when: str = "before") -> None:
            if op == arm.get("op") and when == "before":
                emit(w, "O", op, os.path.basename(paths[0]) if paths else "")
            super().on_op(op, *paths, when=when)

    faults = Recorder()
    fs = FaultyFS(faults) if arm.get("op") else None
    ckpt = Checkpointer(root, options=_options(mode, purl), faults=faults, fs=fs)
    model, opt = small_model(WIDTH)
    state: dict[str, Any] = {"model": model, "optimizer": opt, "step": 0}
    try:
        start = ckpt.restore(state)
    except CheckpointNotFoundError:
        start = 0
    emit(w, "S", start)
    blocking = mode == "save"
    handles: list[Any] = []
    step = start
    while True:
        step += 1
        targeted = bool(arm.get("phase")) and step == start + 3
        if targeted:
            if not blocking:
                ckpt.wait()  # the drain is idle: nothing newer can supersede the armed save
            faults.kill_at(phase=arm["phase"], step=step)
            emit(w, "A", arm["phase"], step)
        if arm.get("op") and step == start + 3:
            if not blocking:
                ckpt.wait()
            faults.kill_at(op=arm["op"], path_contains=arm.get("path"))
            emit(w, "A", arm["op"], step)
        train_step(model, opt, step)
        state["step"] = step
        emit(w, "B", step, state_digest(model, opt, step))
        if blocking:
            ckpt.save(step, state)
            emit(w, "C", step)
        else:
            handles.append(ckpt.save_async(step, state))
            if targeted:
                handles[-1].committed.wait(60)  # the kill fires in the drain while this waits
            keep = []
            for h in handles:
                if h.done():
                    if h.error is None:
                        emit(w, "C", h.step)
                    else:
                        emit(w, "F", h.step)
                else:
                    keep.append(h)
            handles = keep
        if step > start + 400:  # a kill that never came (should not happen): stop the life
            emit(w, "X", step)
            ckpt.close()
            return


def _verify(w: int, mode: str, root: str, purl: str | None, scratch: str) -> None:
    """Restore the newest step, then every selectable step of every tier; report digests."""
    import warnings

    from recoverkit import Checkpointer, CheckpointNotFoundError

    out: dict[str, Any] = {"leftovers_before": leftovers(root)}
    opts = _options(mode, purl)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.perf_counter()
        with Checkpointer(root, options=opts) as ckpt:
            out["open_s"] = time.perf_counter() - t
            out["leftovers_after"] = leftovers(root)
            model, opt = small_model(WIDTH, seed=1)
            state: dict[str, Any] = {"model": model, "optimizer": opt, "step": -1}
            t = time.perf_counter()
            try:
                got = ckpt.restore(state)
                out["restored"] = got
                out["digest"] = state_digest(model, opt, got)
                out["step_value"] = state["step"]
            except CheckpointNotFoundError as e:
                out["restored"] = None
                out["restore_error"] = str(e)
            out["restore_s"] = time.perf_counter() - t
            per_tier: dict[str, dict[int, str]] = {"local": {}, "persistent": {}}
            for s in ckpt.tier.steps():
                per_tier["local"][s] = _restore_digest(ckpt, s)
        if purl:  # the persistent copy on its own: an empty local root in front of it
            local = tempfile.mkdtemp(dir=scratch)
            with Checkpointer(local, options=opts) as pck:
                for s in pck.tiers["persistent"].steps():
                    per_tier["persistent"][s] = _restore_digest(pck, s)
            shutil.rmtree(local, ignore_errors=True)
        out["steps"] = per_tier
    out["warnings"] = [str(c.message)[:300] for c in caught]
    emit(w, "J", json.dumps(out))


def _restore_digest(ckpt: Any, s: int) -> str:
    model, opt = small_model(WIDTH, seed=2)
    state: dict[str, Any] = {"model": model, "optimizer": opt, "step": -1}
    try:
        got = ckpt.restore(state, step=s)
    except Exception as e:  # noqa: BLE001 - a selectable step that fails verification
        return f"ERROR {type(e).__name__}: {e}"[:300]
    if got != s or state["step"] != s:
        return f"ERROR restored {got} with counter {state['step']}"
    return state_digest(model, opt, s)


# --------------------------------------------------------------------------- one trial
def _trial(kind: str, mode: str, root: str, purl: str | None, scratch: str, digests: dict[int, set[str]],
           rng: random.Random, arm: dict[str, Any], window_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    child = fork_child(_life, mode, root, purl, arm)
    started = child.wait_for("S", 60)
    if started is None:
        child.kill()
        child.finish()
        raise RuntimeError(f"child did not start: {child.lines[-5:]}")
    fired_by = "none"
    if kind == "random":
        child.wait_for("C", 30)  # at least one save of this life went through
        child.drain_for(rng.uniform(0, window_s))
        child.kill()
        fired_by = "parent"
    child.finish(timeout_s=60)
    for line in child.lines:
        if line.startswith(("E ", "X ")):
            raise RuntimeError(f"{kind}/{mode} child failed: {line[:2000]}")
    began = [int(a[0]) for a in child.events("B")]
    for a in child.events("B"):
        digests.setdefault(int(a[0]), set()).add(a[1])
    committed = [int(a[0]) for a in child.events("C")]
    phases = child.events("P")
    last_phase = phases[-1][0] if phases else "none"
    armed = child.events("A")
    if kind != "random":
        target = arm.get("phase") or arm.get("op")
        fired_by = "injector" if child.killed and armed else "none"
        if kind == "op":
            ops = child.events("O")
            fired = bool(ops) and child.killed
        else:
            fired = child.killed and last_phase == target
        if not fired:
            raise RuntimeError(f"{kind} {target} in mode {mode} did not fire: {child.lines[-6:]}")
    life_s = time.perf_counter() - t0

    v = fork_child(_verify, mode, root, purl, scratch)
    v.finish(timeout_s=120)
    res = v.json()
    errs = [line for line in v.lines if line.startswith("E ")]
    if res is None:
        raise RuntimeError(f"verifier failed: {errs or v.lines[-5:]}")
    restored = res["restored"]
    last_begun = max(began) if began else int(started.split()[1])
    last_committed = max(committed) if committed else int(started.split()[1])
    ok_digest = restored is not None and res["digest"] in digests.get(restored, set())
    partial = 0
    committed_bad = 0
    selectable = 0
    for steps in res["steps"].values():
        for s, d in steps.items():
            selectable += 1
            if d.startswith("ERROR"):
                committed_bad += 1
            elif d not in digests.get(int(s), set()):
                partial += 1
    if restored is not None and not ok_digest:
        partial += 1
    lost_committed = restored is None or restored < last_committed
    target = arm.get("phase") or (f"{arm['op']}:{arm.get('path') or '*'}" if arm.get("op") else None)
    expected = None
    if armed:
        k = int(armed[0][1])
        expected = k if target in POST_COMMIT else k - 1
    return {
        "kind": kind,
        "mode": mode,
        "target": target,
        "expected_step": expected,
        "exact": expected is None or restored == expected,
        "killed": child.killed,
        "fired_by": fired_by,
        "last_phase": last_phase,
        "start": int(started.split()[1]),
        "last_begun": last_begun,
        "last_committed_reported": last_committed,
        "restored": restored,
        "valid": bool(ok_digest and not lost_committed and res.get("step_value") == restored and (expected is None or restored == expected)),
        "partial_accepted": partial,
        "committed_failing_verify": committed_bad,
        "selectable_steps": selectable,
        "steps_lost": None if restored is None else last_begun - restored,
        "leftovers_found": len(res["leftovers_before"]),
        "leftovers_after_startup": len(res["leftovers_after"]),
        "life_s": life_s,
        "verify_restore_s": res["restore_s"],
        "warnings": res["warnings"][:3],
    }


# --------------------------------------------------------------------------- the plan
def _plan(smoke: bool, random_trials: int, reps: int) -> list[tuple[str, str, dict[str, Any]]]:
    plan: list[tuple[str, str, dict[str, Any]]] = []
    split = {"save": 0.4, "async": 0.4, "persistent": 0.2}
    for mode, frac in split.items():
        plan += [("random", mode, {})] * max(1, round(random_trials * frac))
    for _ in range(reps):
        for mode in (("save",) if smoke else ("save", "async")):
            plan += [("phase", mode, {"phase": p}) for p in PHASES]
        if not smoke:
            plan += [("phase", "persistent_only", {"phase": p}) for p in ZARR_PHASES]
        ops = OPS[:1] + OPS[3:4] + OPS[5:7] if smoke else OPS
        for mode in (("save",) if smoke else ("save", "async")):
            plan += [("op", mode, {"op": op, "path": path}) for op, path, _ in ops]
    return plan


def run(smoke: bool = False, random_trials: int | None = None, reps: int | None = None, seed: int = 0,
        workdir: str | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    warm()
    random_trials = random_trials if random_trials is not None else (10 if smoke else 500)
    reps = reps if reps is not None else (1 if smoke else 3)
    window_s = 0.25 if smoke else 0.6
    rng = random.Random(seed)
    plan = _plan(smoke, random_trials, reps)
    base = tempfile.mkdtemp(prefix="rk-bench-torture-", dir=workdir)
    trials: list[dict[str, Any]] = []
    chains: dict[str, tuple[str, str | None, dict[int, set[str]]]] = {}
    try:
        # one chain (root + persistent store + digests) per (mode, fs wrapper)
        order = sorted(range(len(plan)), key=lambda i: rng.random())
        for i in order:
            kind, mode, arm = plan[i]
            key = f"{mode}{'-faultyfs' if kind == 'op' else ''}"
            if key not in chains:
                d = os.path.join(base, key)
                os.makedirs(d)
                purl = f"file://{d}/zarr" if mode.startswith("persistent") else None
                chains[key] = (os.path.join(d, "ckpt"), purl, {})
            root, purl, digests = chains[key]
            trials.append(_trial(kind, mode, root, purl, base, digests, rng, arm, window_s))
            if len(trials) % 50 == 0:
                print(f"[torture] {len(trials)}/{len(plan)} trials, {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
        sizes = {k: fmt_bytes(tree_bytes(os.path.dirname(v[0]))) for k, v in chains.items()}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return _summary(trials, smoke, time.perf_counter() - t_start, sizes, window_s, seed)


def _summary(trials: list[dict[str, Any]], smoke: bool, runtime: float, sizes: dict[str, str], window_s: float,
             seed: int) -> dict[str, Any]:
    n = len(trials)
    valid = sum(t["valid"] for t in trials)
    lost = [t["steps_lost"] for t in trials if t["steps_lost"] is not None]
    by_group: dict[str, dict[str, Any]] = {}
    for t in trials:
        g = f"{t['kind']} / {t['mode']}"
        s = by_group.setdefault(g, {"trials": 0, "valid": 0, "partial_accepted": 0, "committed_failing_verify": 0, "steps_lost": []})
        s["trials"] += 1
        s["valid"] += int(t["valid"])
        s["partial_accepted"] += t["partial_accepted"]
        s["committed_failing_verify"] += t["committed_failing_verify"]
        s["steps_lost"].append(t["steps_lost"])
    targets: dict[str, dict[str, int]] = {}
    for t in trials:
        if t["kind"] != "random":
            s = targets.setdefault(f"{t['kind']} {t['target']} ({t['mode']})", {"trials": 0, "valid": 0, "exact": 0, "restores": ""})
            s["trials"] += 1
            s["valid"] += int(t["valid"])
            s["exact"] += int(t["exact"])
            s["restores"] = "the step being saved" if t["target"] in POST_COMMIT else "the step before it"
    landed = collections.Counter(t["last_phase"] for t in trials if t["kind"] == "random")
    return {
        "scenario": "torture",
        "smoke": smoke,
        "seed": seed,
        "random_window_s": window_s,
        "trials": n,
        "sigkills": sum(t["killed"] for t in trials),
        "valid_restores": valid,
        "valid_restore_rate": valid / n if n else 0.0,
        "partial_steps_accepted": sum(t["partial_accepted"] for t in trials),
        "committed_steps_failing_verify": sum(t["committed_failing_verify"] for t in trials),
        "selectable_steps_checked": sum(t["selectable_steps"] for t in trials),
        "targeted_exact": sum(t["exact"] for t in trials if t["kind"] != "random"),
        "targeted_trials": sum(t["kind"] != "random" for t in trials),
        "committed_steps_lost": sum(1 for t in trials if t["restored"] is None or t["restored"] < t["last_committed_reported"]),
        "leftovers_found_after_kill": sum(t["leftovers_found"] > 0 for t in trials),
        "leftovers_after_startup": sum(t["leftovers_after_startup"] for t in trials),
        "steps_lost": {"histogram": dict(sorted(collections.Counter(lost).items())), "max": max(lost, default=0),
                       "mean": sum(lost) / len(lost) if lost else 0.0},
        "by_group": by_group,
        "targeted": targets,
        "random_kill_landed_after_phase": dict(landed.most_common()),
        "chain_sizes": sizes,
        "runtime_s": runtime,
        "detail": trials,
    }


# --------------------------------------------------------------------------- output
def table(r: dict[str, Any]) -> str:
    lines = [
        f"{r['trials']} trials, {r['sigkills']} real SIGKILLs" + (" [smoke]" if r["smoke"] else "")
        + f"; runtime {r['runtime_s']:.0f} s; state ~{WIDTH}x{WIDTH}x3 MLP + AdamW, keep_last=2",
        "",
        "| figure | value | required |",
        "|---|---:|---:|",
        f"| valid restores | {r['valid_restores']}/{r['trials']} ({100 * r['valid_restore_rate']:.1f} %) | 100 % |",
        f"| partial steps accepted | {r['partial_steps_accepted']} | 0 |",
        f"| committed steps failing verify (of {r['selectable_steps_checked']} checked) | {r['committed_steps_failing_verify']} | 0 |",
        f"| committed steps lost | {r['committed_steps_lost']} | 0 |",
        f"| temporaries left after a kill / after the next start-up | {r['leftovers_found_after_kill']} / {r['leftovers_after_startup']} | - / 0 |",
        f"| steps lost per kill: mean / max | {r['steps_lost']['mean']:.2f} / {r['steps_lost']['max']} | - |",
        "",
        "| group | trials | valid | partial accepted | steps lost (mean) |",
        "|---|---:|---:|---:|---:|",
    ]
    for g, s in r["by_group"].items():
        sl = [x for x in s["steps_lost"] if x is not None]
        lines.append(f"| {g} | {s['trials']} | {s['valid']} | {s['partial_accepted']} | {sum(sl) / max(1, len(sl)):.2f} |")
    lines += ["", "| targeted kill | must restore | trials | valid | exactly that step |", "|---|---|---:|---:|---:|"]
    for g, s in sorted(r["targeted"].items()):
        lines.append(f"| {g} | {s['restores']} | {s['trials']} | {s['valid']} | {s['exact']} |")
    lines += ["", "random kills landed after phase: " + ", ".join(f"{k} {v}" for k, v in r["random_kill_landed_after_phase"].items())]
    lines.append("steps lost histogram: " + ", ".join(f"{k}: {v}" for k, v in r["steps_lost"]["histogram"].items()))
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        h = r["steps_lost"]["histogram"]
        ax1.bar([int(k) for k in h], list(h.values()))
        ax1.set_xlabel("steps lost per kill (last begun - restored)")
        ax1.set_ylabel("trials")
        ax1.set_title(f"{r['trials']} kills: {100 * r['valid_restore_rate']:.0f} % valid, {r['partial_steps_accepted']} partial")
        landed = r["random_kill_landed_after_phase"]
        ax2.barh(list(landed), list(landed.values()))
        ax2.set_xlabel("random kills")
        ax2.set_title("last phase reached before a random kill")

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="~20 kills (< 45 s)")
    ap.add_argument("--trials", type=int, default=None, help="random-moment kills (default 500; smoke 8)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of every targeted kill (default 3; smoke 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    r = run(a.smoke, a.trials, a.reps, a.seed, a.workdir)
    text = table(r)
    print(text)
    publish("torture", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
