"""The convergence benchmark's training of one method against one failure schedule.

Where it sits: between the simulator (:mod:`bench._checkfree_sim`) and the summary
(:mod:`bench._checkfree_summary`), called by :func:`bench.bench_checkfree.run` once per method
and rate. The flow of :func:`run_method`: before each executed iteration the stages the
schedule names are lost; checkpoint-restart tears the job down and restores the newest
checkpoint from disk (really), rolling back; snapshot restores each lost stage from its
per-step copy; the CheckFree methods rebuild it (:meth:`Sim.rebuild`); then the step runs,
checkpoint-restart saves every ``ckpt_every`` steps, CheckFree+ refreshes its (de)embedding
replica, and every ``eval_every`` steps a curve point records the validation loss with the
counts the clock is charged for later (:func:`bench._checkfree_clock.clock`).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import torch

from ._checkfree_clock import Timing
from ._checkfree_sim import (
    CHECKFREE,
    FALLBACK,
    NO_FAILURE,
    PLUS,
    RESTARTS,
    SEED,
    SNAPSHOT,
    SWAP_ONLY,
    Sim,
)
from ._llama import Batches, ModelSpec
from .machine import median

__all__ = ["run_method"]


def run_method(mode: str, z: dict[str, Any], spec: ModelSpec, batches: Batches, valid: list[torch.Tensor],
               timing: Timing, schedule: dict[int, list[int]], workdir: str, max_steps: int,
               target: float | None, ckpt_every: int = 0, seed: int = SEED) -> dict[str, Any]:
    """Trains one method against one failure schedule; returns its curve and what happened.
    ``seed``: the model's initialisation (``batches`` carries the data order's)."""
    from recoverkit import Checkpointer, CheckpointOptions, TierSpec
    from recoverkit.distributed.coordinator import LocalCoordinator
    from recoverkit.recovery.checkfree import CheckFreeOptions

    lr_scale = float(z.get("lr_scale", CheckFreeOptions().lr_scale))  # the rebuilt stage's rate factor
    distill = int(z.get("distill_steps", CheckFreeOptions().distill_steps))  # a rebuilt stage's fit
    sim_args = {"spec": spec, "seed": seed, "lr": z["lr"], "warmup": z["warmup"], "record": distill > 0}
    sim = Sim(**sim_args, swap=mode in (PLUS, SWAP_ONLY))
    if mode == PLUS:
        sim.refresh_replica()
    how = {CHECKFREE: "checkfree", FALLBACK: "checkfree", PLUS: "plus", "uniform": "uniform", "copy": "copy", "random": "random"}.get(mode)
    ckpt = None
    root = os.path.join(workdir, f"ckpt-{mode}")
    opts = CheckpointOptions(tiers=[TierSpec.local(every_steps=1)])
    saving = mode in RESTARTS or mode == FALLBACK
    if saving:
        shutil.rmtree(root, ignore_errors=True)
        ckpt = Checkpointer(root, options=opts, coordinator=LocalCoordinator())
        ckpt.save(0, sim.state())  # the initial state: a failure before the first save restarts from it
    steps, step = z["steps"], 0
    n = {"iteration": 0, "saves": 0, "restarts": 0, "recoveries": 0,  # what the clock is charged for
         "replica_steps": 0, "exact_recoveries": 0, "distill_steps": 0}
    if mode == SNAPSHOT:
        sim.take_snapshot()  # the initial state: a failure before the first step restores it
    curve = [{"step": 0, "val": sim.evaluate(valid), **n}]
    failures: list[dict[str, Any]] = []
    train_losses: list[float] = []
    step_times: list[float] = []
    save_times: list[float] = []
    restore_times: list[float] = []
    lost_steps = 0
    t0 = time.perf_counter()
    reached = False
    try:
        while step < max_steps and not (step >= steps and (target is None or reached or mode in (NO_FAILURE, SNAPSHOT, *RESTARTS))):
            it = n["iteration"]
            lost = [] if mode in (NO_FAILURE, SWAP_ONLY) else schedule.pop(it, [])
            # checkfree-fallback: an edge stage lost (CheckFree refuses it) rolls every stage back
            edge_lost = mode == FALLBACK and any(k in (0, spec.stages - 1) for k in lost)
            if lost and (mode in RESTARTS or edge_lost):
                assert ckpt is not None
                ckpt.close()  # the job is gone; a new one restores the newest checkpoint from disk
                sim = Sim(**sim_args, swap=False)
                w = time.perf_counter()
                with Checkpointer(root, options=opts, coordinator=LocalCoordinator()) as reader:
                    back = int(reader.restore(sim.state()))
                restore_times.append(time.perf_counter() - w)
                ckpt = Checkpointer(root, options=opts, coordinator=LocalCoordinator())
                failures.append({"iteration": it, "stages": lost, "step": step,
                                 "action": f"rolled back to step {back}"})
                lost_steps += step - back
                step = back
                n["restarts"] += 1
            elif lost and mode == SNAPSHOT:
                for k in lost:
                    did = sim.restore_snapshot(k)
                    failures.append({"iteration": it, "stages": [k], "step": step, "action": did})
                n["exact_recoveries"] += 1  # one replacement per stage, in parallel: one recovery time
            elif lost:
                fits = 0
                for k in lost:
                    did = sim.rebuild(k, how or "random", lr_scale, distill, sim.lr_at(step))
                    failures.append({"iteration": it, "stages": [k], "step": step, "action": did})
                    fits = max(fits, distill if "fitted" in did else 0)
                n["recoveries"] += 1  # one replacement per stage, in parallel: one recovery time
                n["distill_steps"] += fits  # the replacements fit in parallel too
            mbs = [batches.train(step, m) for m in range(z["micro_batches"])]
            w = time.perf_counter()
            train_losses.append(sim.train_step(step, mbs))
            step_times.append(time.perf_counter() - w)
            step += 1
            n["iteration"] += 1
            if mode == SNAPSHOT:  # outside the timed step: its cost is charged from the real pipeline's replica
                sim.take_snapshot()
                n["replica_steps"] += 1
            if ckpt is not None and step % ckpt_every == 0:
                w = time.perf_counter()
                ckpt.save(step, sim.state())
                save_times.append(time.perf_counter() - w)
                n["saves"] += 1
            if mode == PLUS and step % z["replicate_every"] == 0:
                sim.refresh_replica()
            if step % z["eval_every"] == 0:
                val = sim.evaluate(valid)
                curve.append({"step": step, "val": val, **n})
                reached = reached or (target is not None and val <= target)
    finally:
        if ckpt is not None:
            ckpt.close()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "mode": mode, "curve": curve, "failures": failures, "steps": step, **{k + "_total": v for k, v in n.items()},
        "stage_failures": sum(len(f["stages"]) for f in failures),
        "ckpt_every": ckpt_every if saving else None,
        "lost_steps": lost_steps, "train_loss_last": train_losses[-1] if train_losses else None,
        "step_times": step_times, "save_times": save_times, "restore_times": restore_times,
        "step_s_measured": median(step_times) if step_times else None, "runtime_s": time.perf_counter() - t0,
    }
