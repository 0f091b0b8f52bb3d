"""Effective training time under a fixed failure schedule: recoverkit vs restart-from-torch.save.

One model (an MLP + AdamW, default 24 MiB of state), one target (``--steps`` optimizer steps, batch 64) and
one failure schedule for every method: a SIGKILL every ``50 x t_step`` seconds of wall time from
the start of the run, where ``t_step`` is the failure-free, checkpoint-free step time measured
first (so on average a failure every 50 steps of useful work, at the same instants for every
method). Restarts are forks of this warm process (a fork server: no interpreter start or
``import torch``, which ``bench_mttr`` measures separately), so the figure isolates what the
checkpointing method costs: save stalls, work lost since the last durable checkpoint, restore.

Methods: recoverkit ``save_async`` every step into the shared-memory tier (issue 12: the snapshot
outlives the killed child, which restores from it; local disk every 50 steps), and the
disk-only configuration: ``save_async`` every step and every 5 steps (host snapshot + local disk
on each save, ``keep_last=2``; after a SIGKILL the host snapshot is gone, the disk restores);
``torch.save`` every 10 and every 50 steps (to a temporary file,
fsync, atomic rename, fsync of the directory: as durable as recoverkit's commit; restart loads
the file). Effective ratio = useful training time (steps x t_step) / wall time. The final model is
compared with the failure-free run's (bit-identical resume). A method that cannot finish (its
checkpoint interval is longer than the time between failures) is stopped at a wall-time cap and
its ratio counts only the progress it made durable.

Run: ``python -m bench.bench_effective [--smoke] [--steps 1000] [--size-mib 24] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

import torch  # noqa: F401 - imported once, before forking

from ._common import fsync_dir
from ._workers import (
    emit,
    fork_child,
    memory_tiers_missing,
    small_model,
    state_digest,
    train_step,
    warm,
    width_for,
)
from .report import fmt_bytes, publish

KILL_EVERY_STEPS = 50
SHM_DISK_EVERY = 50
METHODS = {
    "recoverkit shared memory every step (+ disk every 50)": ("rk-shm", 1),
    "recoverkit save_async every step": ("rk", 1),
    "recoverkit save_async every 5": ("rk", 5),
    "torch.save every 10": ("torch", 10),
    "torch.save every 50": ("torch", 50),
}


def _life(w: int, kind: str, every: int, root: str, width: int, steps: int, batch: int) -> None:
    model, opt = small_model(width)
    t = time.perf_counter()
    start = 0
    ckpt = None
    if kind in ("rk", "rk-shm"):
        from recoverkit import (
            Checkpointer,
            CheckpointNotFoundError,
            CheckpointOptions,
            RetentionPolicy,
            TierSpec,
        )
        from recoverkit.config import StagingPolicy

        nbytes = sum(p.numel() * 4 for p in model.parameters()) * 3
        if kind == "rk":  # every save to the host snapshot and the local disk
            tiers = [TierSpec.host(keep=1), TierSpec.local(every_steps=1)]
        else:  # every save to shared memory (it outlives the killed child), the disk every 50
            tiers = [TierSpec.shm(), TierSpec.local(every_steps=SHM_DISK_EVERY)]  # type: ignore[attr-defined]
        opts = CheckpointOptions(tiers=tiers, retention=RetentionPolicy(keep_last=2),
                                 staging=StagingPolicy(budget_bytes=3 * nbytes + (16 << 20)))
        ckpt = Checkpointer(root, options=opts)
        state: dict[str, Any] = {"model": model, "optimizer": opt, "step": 0}
        try:
            start = ckpt.restore(state)
        except CheckpointNotFoundError:
            start = 0
    elif kind == "torch":
        path = os.path.join(root, "ckpt.pt")
        if os.path.exists(path):
            sd = torch.load(path, weights_only=True)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optimizer"])
            start = int(sd["step"])
        os.makedirs(root, exist_ok=True)
    emit(w, "R", start, time.perf_counter() - t)
    for s in range(start + 1, steps + 1):
        train_step(model, opt, s, batch)
        if kind in ("rk", "rk-shm") and s % every == 0:
            assert ckpt is not None
            state["step"] = s
            ckpt.save_async(s, state)
        elif kind == "torch" and s % every == 0:
            _torch_save(root, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": s})
        emit(w, "S", s)
    if ckpt is not None:
        ckpt.close()
    emit(w, "D", state_digest(model, opt, steps))


def _torch_save(root: str, sd: dict[str, Any]) -> None:
    tmp = os.path.join(root, "ckpt.pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(sd, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, "ckpt.pt"))
    fsync_dir(root)


def _job(kind: str, every: int, root: str, width: int, steps: int, batch: int, period_s: float | None, cap_s: float) -> dict[str, Any]:
    t0 = time.monotonic()
    next_kill = t0 + period_s if period_s else float("inf")
    kills, restores, executed, digest = 0, [], 0, None
    durable = 0
    while True:
        child = fork_child(_life, kind, every, root, width, steps, batch)
        while not child.eof:
            now = time.monotonic()
            if now >= t0 + cap_s:
                break
            if now >= next_kill:
                break
            child.poll(min(next_kill, t0 + cap_s) - now)
        killed = False
        if not child.eof:
            child.kill()
            killed = True
        child.finish()
        for line in child.lines:
            if line.startswith("E "):
                raise RuntimeError(f"{kind}/{every}: {line[:1500]}")
            if line.startswith("R "):
                _, st, dt = line.split()
                restores.append(float(dt))
                durable = max(durable, int(st))
            elif line.startswith("S "):
                executed += 1
            elif line.startswith("D "):
                digest = line.split()[1]
        if killed:
            kills += 1
            next_kill += period_s or 0
        if digest is not None or time.monotonic() >= t0 + cap_s:
            break
    wall = time.monotonic() - t0
    return {"wall_s": wall, "kills": kills, "executed_steps": executed, "restore_s": restores, "digest": digest,
            "finished": digest is not None, "durable_progress": steps if digest else durable}


def run(smoke: bool = False, steps: int | None = None, size_mib: int | None = None, workdir: str | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    warm()
    steps = steps or (100 if smoke else 600)
    batch = 512 if smoke else 64  # forward+backward dominates the step, as in real training
    size_mib = size_mib or (2 if smoke else 24)
    width = width_for(size_mib << 20)
    base = tempfile.mkdtemp(prefix="rk-bench-effective-", dir=workdir)
    try:
        ref = _job("none", 0, os.path.join(base, "ref"), width, steps, batch, None, 3600)
        t_step = ref["wall_s"] / steps
        period = KILL_EVERY_STEPS * t_step
        cap = 2.5 * ref["wall_s"] + (20 if smoke else 10)  # smoke: room for a loaded machine's restarts
        results = {}
        not_run: dict[str, str] = {}
        for name, (kind, every) in METHODS.items():
            why = memory_tiers_missing("shm") if kind == "rk-shm" else None
            if why:
                not_run[name] = why
                continue
            # the children inherit a shared-memory directory of this method's own
            shm_dir = tempfile.mkdtemp(prefix="rk-bench-effective-", dir="/dev/shm" if os.path.isdir("/dev/shm") else base)
            os.environ["RECOVERKIT_SHM_DIR"] = shm_dir
            try:
                r = _job(kind, every, os.path.join(base, f"m{len(results)}"), width, steps, batch, period, cap)
            finally:
                r_left = sum(len(fs) for _, _, fs in os.walk(shm_dir))
                shutil.rmtree(shm_dir, ignore_errors=True)
                os.environ.pop("RECOVERKIT_SHM_DIR", None)
            r["shm_files_left"] = r_left
            r["effective"] = r["durable_progress"] * t_step / r["wall_s"]
            r["bit_identical"] = r["digest"] == ref["digest"]
            r["restore_s_median"] = sorted(r["restore_s"])[len(r["restore_s"]) // 2] if r["restore_s"] else 0.0
            r["lost_steps"] = r["executed_steps"] - (steps if r["finished"] else r["durable_progress"])
            results[name] = r
    finally:
        shutil.rmtree(base, ignore_errors=True)
    model_bytes = width * width * 3 * 4 * 3
    return {
        "scenario": "effective", "smoke": smoke, "steps": steps, "state_bytes": model_bytes,
        "t_step_s": t_step, "kill_period_s": period, "kill_every_steps": KILL_EVERY_STEPS, "cap_s": cap,
        "batch": batch, "reference_wall_s": ref["wall_s"], "methods": results, "not_run": not_run,
        "runtime_s": time.perf_counter() - t_start,
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"{r['steps']} steps of a {fmt_bytes(r['state_bytes'])} MLP + AdamW state; failure-free step {r['t_step_s'] * 1e3:.1f} ms; "
        f"SIGKILL every {r['kill_period_s']:.2f} s (= {r['kill_every_steps']} failure-free steps); restarts forked from a warm "
        f"process" + (" [smoke]" if r["smoke"] else "") + f"; runtime {r['runtime_s']:.0f} s",
        "",
        "| method | effective (useful / wall) | wall s | kills | steps executed | steps re-done or lost | restore s (median) | finished | final model bit-identical |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
        f"| no checkpoints, no failures (reference) | 1.000 | {r['reference_wall_s']:.1f} | 0 | {r['steps']} | 0 | - | yes | - |",
    ]
    for name, m in r["methods"].items():
        lines.append(
            f"| {name} | {m['effective']:.3f} | {m['wall_s']:.1f} | {m['kills']} | {m['executed_steps']} | {m['lost_steps']} | "
            f"{m['restore_s_median'] * 1e3:.1f} ms | {'yes' if m['finished'] else 'no (cap)'} | "
            f"{'yes' if m['bit_identical'] else ('-' if not m['finished'] else 'NO')} |"
        )
    for name, why in r.get("not_run", {}).items():
        lines.append(f"| {name} | not run: {why} ||||||||")
    lines += ["", "- a checkpoint interval at or above the time between failures makes no durable progress at all "
              "(each life ends before its first save): the torch.save-every-50 row shows what that costs.",
              "- shared memory: the killed child's snapshots outlive it (each method's children share one "
              "RECOVERKIT_SHM_DIR); the peer replica needs a second node and is measured by `mttr` and `overhead`."]
    left = {n: m["shm_files_left"] for n, m in r["methods"].items() if m.get("shm_files_left")}
    if left:
        lines.append(f"- files left in shared memory after the method's last child closed normally: {left}")
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        names = list(r["methods"])
        ax.barh(names, [r["methods"][n]["effective"] for n in names])
        ax.axvline(1.0, color="grey", linestyle="--")
        ax.set_xlabel("useful training time / wall time")
        ax.set_title(f"a SIGKILL every {r['kill_every_steps']} steps' worth of time")

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 600; smoke 100)")
    ap.add_argument("--size-mib", type=int, default=None, help="state size (default 24; smoke 2)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    r = run(a.smoke, a.steps, a.size_mib, a.workdir)
    text = table(r)
    print(text)
    publish("effective", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
