"""The convergence benchmark's wall clock: what a step, a save, a restart and a recovery cost.

Where it sits: after the simulator (:mod:`bench._checkfree_sim`), before the summary
(:mod:`bench._checkfree_summary`), in ``bench_checkfree``. The flow: :func:`measure` times a
simulated step, a blocking :class:`recoverkit.Checkpointer` save and a restore here;
:func:`charged` turns them into a :class:`Timing`, taking detection, the spare and the fetch
from the real pipeline's published figures (:func:`pipeline_figures`, ``checkfree_pipeline.json``)
or bench_mttr's restart phases (:func:`mttr_figures`, ``mttr.json``), each figure with its
source; :func:`clock` charges a curve point's counts (iterations, saves, restarts, recoveries)
to simulated seconds. Published JSON is read as hostile input: only finite numbers >= 0 count.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ._checkfree_sim import Sim
from ._llama import Batches, block_state
from .machine import median

__all__ = [
    "REPO",
    "PIPELINE_JSON",
    "Timing",
    "published",
    "pipeline_figures",
    "mttr_figures",
    "measure",
    "charged",
    "clock",
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_JSON = "checkfree_pipeline.json"


@dataclass
class Timing:
    """Seconds charged to the simulated clock, and where each figure came from."""

    step_s: float
    save_s: float
    restore_s: float
    detection_s: float
    relaunch_s: float  # a new process (or job) up and its model built, before any state arrives
    fetch_s: float  # the neighbours' weights to the replacement process
    replica_overhead: float = 0.0  # snapshot: the per-step replica's cost over a plain step (fraction)
    replica_recover_s: float = 0.0  # snapshot: detection + re-forming + the replica's state loaded
    replica_extra_s: float = 0.0  # the real pipeline's replica step - its plain step (shown, not charged)
    # checkpoint-restart on the real pipeline: SIGKILL -> torchrun restarted every worker and
    # the pipeline formed again, before the restore (None: not measured, the in-process one)
    job_relaunch_s: float | None = None
    # recoverkit's in-process rollback on the real pipeline (StagePipeline with stage
    # checkpoints): SIGKILL -> the group re-formed with a spare, before the restore (None: not
    # measured, CheckFree's detection + relaunch)
    rollback_ready_s: float | None = None
    # a CheckFree rebuild's fit (distill_steps), per fitting step: one stage's forward and
    # backward over the step's m micro-batches, m of a pipeline step's m + S - 1 slots
    distill_step_s: float = 0.0
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def restart_s(self) -> float:
        """checkpoint-restart: the whole job detected dead, relaunched and restored from disk
        (torchrun's restart of every worker where measured, else :attr:`inprocess_restart_s`)."""
        if self.job_relaunch_s is None:
            return self.inprocess_restart_s
        return self.job_relaunch_s + self.restore_s

    @property
    def inprocess_restart_s(self) -> float:
        """checkpoint-restart with the job's processes kept (recoverkit's in-process rollback,
        ``StagePipeline(checkpoints=...)``): a spare brought in as CheckFree's is, every stage
        restored from disk; measured on the real pipeline where published, plus this model's
        restore. What checkfree-fallback's edge stages get; no stock launcher does it."""
        ready = self.rollback_ready_s if self.rollback_ready_s is not None else self.detection_s + self.relaunch_s
        return ready + self.restore_s

    @property
    def recover_s(self) -> float:
        """CheckFree: one replacement process up and rebuilt from its neighbours."""
        return self.detection_s + self.relaunch_s + self.fetch_s


def _num(d: Any, *keys: str) -> float | None:
    """The first of ``keys`` in mapping ``d`` that is a finite number >= 0 (hostile input)."""
    if not isinstance(d, dict):
        return None
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
            return float(v)
    return None


def published(dirs: tuple[str, ...], name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, object) of every ``name`` in ``dirs`` that reads as a JSON object, in order
    (one that is missing or malformed is skipped; its fields are the caller's to check)."""
    for d in dirs:
        path = os.path.join(d, name)
        try:
            with open(path) as f:
                got = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(got, dict):
            yield path, got


def pipeline_figures(dirs: tuple[str, ...]) -> tuple[dict[str, Any], str] | None:
    """The real pipeline's published figures (``checkfree_pipeline.json``): per step, detection,
    re-forming the group with the spare, the neighbours' weights fetched; and its model."""
    for path, r in published(dirs, PIPELINE_JSON):
        src = r.get("summary") if isinstance(r.get("summary"), dict) else r
        got: dict[str, Any] = {
            "step_s": _num(src, "step_s", "per_step_s", "step_median_s"),
            "detection_s": _num(src, "detection_s", "detect_s"),
            "relaunch_s": _num(src, "relaunch_s", "regroup_s", "replacement_s"),
            "fetch_s": _num(src, "fetch_s", "rebuild_s", "transfer_s"),
        }
        setup = r.get("setup") if isinstance(r.get("setup"), dict) else {}
        stages, model = setup.get("stages"), setup.get("model")
        got["stages"] = stages if isinstance(stages, int) and not isinstance(stages, bool) else None
        got["model"] = model[:200] if isinstance(model, str) else None
        rep = r.get("replica") if isinstance(r.get("replica"), dict) else {}
        got["replica_step_s"] = _num(rep, "step_s")
        got["replica_overhead"] = _num(rep, "step_overhead")
        if got["replica_overhead"] is None and got["replica_step_s"] and got["step_s"]:
            got["replica_overhead"] = max(0.0, got["replica_step_s"] / got["step_s"] - 1.0)
        parts = [_num(rep, k) for k in ("detection_s", "relaunch_s", "fetch_s")]
        got["replica_recover_s"] = None if None in parts else sum(p for p in parts if p is not None)
        restart = r.get("restart") if isinstance(r.get("restart"), dict) else {}
        got["job_relaunch_s"] = _num(restart, "job_ready_s")
        rollback = r.get("rollback") if isinstance(r.get("rollback"), dict) else {}
        ready = [_num(rollback, k) for k in ("detection_s", "regroup_s")]
        got["rollback_ready_s"] = None if None in ready else sum(x for x in ready if x is not None)
        if any(got[k] is not None for k in ("step_s", "detection_s", "relaunch_s", "fetch_s")):
            return got, path
    return None


def mttr_figures(dirs: tuple[str, ...]) -> tuple[dict[str, float], str] | None:
    """bench_mttr's restart phases from local disk (one process): detection, relaunch + import."""
    for path, r in published(dirs, "mttr.json"):
        summary = r.get("summary")
        row = summary.get("local") if isinstance(summary, dict) else None
        det, rel, imp, start = (_num(row, k) for k in ("detection", "relaunch", "import", "startup"))
        if None not in (det, rel, imp, start):
            assert det is not None and rel is not None and imp is not None and start is not None
            return {"detection_s": det, "relaunch_s": rel + imp + start}, path
    return None


def measure(sim_args: dict[str, Any], batches: Batches, micro_batches: int, workdir: str, reps: int) -> dict[str, float]:
    """A simulated step, a blocking checkpoint save and a restore of every stage, measured here."""
    from recoverkit import Checkpointer, CheckpointOptions, TierSpec
    from recoverkit.distributed.coordinator import LocalCoordinator

    sim = Sim(**sim_args, swap=False)
    times = []
    for step in range(reps + 2):
        mbs = [batches.train(step, m) for m in range(micro_batches)]
        t = time.perf_counter()
        sim.train_step(step, mbs)
        times.append(time.perf_counter() - t)
    root = os.path.join(workdir, "calibrate")
    saves, restores = [], []
    opts = CheckpointOptions(tiers=[TierSpec.local(every_steps=1)])
    with Checkpointer(root, options=opts, coordinator=LocalCoordinator()) as ckpt:
        for i in range(reps):
            t = time.perf_counter()
            ckpt.save(i + 1, sim.state())
            saves.append(time.perf_counter() - t)
    for _ in range(reps):
        other = Sim(**sim_args, swap=False)
        t = time.perf_counter()
        with Checkpointer(root, options=opts, coordinator=LocalCoordinator()) as ckpt:
            ckpt.restore(other.state())
        restores.append(time.perf_counter() - t)
    shutil.rmtree(root, ignore_errors=True)
    stage_bytes = sum(t.numel() * t.element_size() for t in block_state(sim.stages[1]).values())
    return {"step_s": median(times[2:]), "save_s": median(saves), "restore_s": median(restores),
            "stage_bytes": float(stage_bytes), "reps": float(reps)}


def charged(measured: dict[str, float], dirs: tuple[str, ...], stages: int, dim: int,
            micro_batches: int = 1) -> Timing:
    """The seconds charged: the real pipeline's figures where published, else this run's own
    measurements and bench_mttr's restart phases (every figure names its source).

    The real pipeline's per-step time is charged only when it ran this model (``stages``
    stages of width ``dim``); its detection, re-forming and fetch times are charged to both
    CheckFree's recovery and checkpoint-restart's restart (the same machinery brings a
    spare in; they differ in where the state comes from and in the rollback).
    """
    def n(key: str) -> str:
        return f"median of {int(measured.get(key, measured['reps']))}"

    tm = Timing(step_s=measured["step_s"], save_s=measured["save_s"], restore_s=measured["restore_s"],
                detection_s=0.0, relaunch_s=0.0, fetch_s=0.0)
    replica_recover_src = None
    tm.sources = {
        "step_s": f"measured here: one simulated pipeline step (every stage in one process), {n('step_n')}",
        "save_s": f"measured here: blocking Checkpointer.save of every stage to local disk, {n('save_n')}",
        "restore_s": f"measured here: a new Checkpointer restoring every stage from disk, {n('restore_n')}",
        "detection_s": "not measured (no bench_mttr results): 0",
        "relaunch_s": "not measured (no bench_mttr results): 0",
        "fetch_s": "not measured: 0",
        "replica_overhead": "not measured (no real pipeline replica figures): 0",
    }
    mt = mttr_figures(dirs)
    if mt:
        fig, path = mt
        rel = os.path.relpath(path, REPO)
        tm.detection_s, tm.relaunch_s = fig["detection_s"], fig["relaunch_s"]
        tm.sources["detection_s"] = f"bench_mttr, restart from local disk (1 process): torchrun's detection ({rel})"
        tm.sources["relaunch_s"] = f"bench_mttr, restart from local disk (1 process): relaunch + import + start-up ({rel})"
        gbps = None
        try:
            with open(path) as f:
                gbps = _num(json.load(f), "gloo_p2p_gbps")
        except (OSError, ValueError):
            pass
        if gbps:
            nbytes = 2 * measured["stage_bytes"]
            tm.fetch_s = nbytes / (gbps * 1e9)
            tm.sources["fetch_s"] = f"two stages' weights ({nbytes:.0f} B) at bench_mttr's gloo point-to-point {gbps:.2f} GB/s"
    pipe = pipeline_figures(dirs)
    if pipe:
        fig, path = pipe
        rel = os.path.relpath(path, REPO)
        for name in ("detection_s", "relaunch_s", "fetch_s"):
            if fig[name] is not None:
                setattr(tm, name, fig[name])
                what = {"detection_s": "the SIGKILL seen by the slowest survivor",
                        "relaunch_s": "the group re-formed with a spare process",
                        "fetch_s": "the neighbours' weights fetched and the stage rebuilt"}[name]
                tm.sources[name] = f"the real pipeline (torch.distributed.pipelining, gloo): {what} ({rel})"
        same = (fig["stages"] == stages and fig["model"] is not None
                and re.search(rf"\bd={dim}\b", fig["model"]) is not None)
        if fig["step_s"] is not None and same:
            tm.step_s = fig["step_s"]
            tm.sources["step_s"] = f"the real pipeline, the same model ({rel})"
        elif fig["step_s"] is not None:
            tm.sources["step_s"] += (f"; the real pipeline's {fig['step_s'] * 1e3:.1f} ms is of another model "
                                     f"({fig['stages']} stages, {fig['model']}), not charged")
        model = f"its small test model ({fig['stages']} stages, {fig['model']})"
        if fig["replica_overhead"] is not None:
            tm.replica_overhead = fig["replica_overhead"]
            if fig["replica_step_s"] and fig["step_s"]:
                tm.replica_extra_s = max(0.0, fig["replica_step_s"] - fig["step_s"])
            ratio = (f"{fig['replica_step_s'] * 1e3:.1f} ms / {fig['step_s'] * 1e3:.1f} ms"
                     if fig["replica_step_s"] and fig["step_s"] else "its step_overhead")
            tm.sources["replica_overhead"] = (
                f"the real pipeline's replica mode (model + AdamW of every stage copied to the next stage's process "
                f"every step): replica step / plain step - 1 = {ratio} - 1, measured on {model}; charged as this "
                f"fraction x step_s on every step ({rel})")
        if fig["job_relaunch_s"] is not None:
            tm.job_relaunch_s = fig["job_relaunch_s"]
            tm.sources["job_relaunch_s"] = (
                f"checkpoint-restart of the real pipeline (torchrun --max-restarts=1, {model}): the SIGKILL -> "
                "torchrun saw the dead worker, stopped the others, restarted all, and the slowest formed the "
                f"pipeline again (interpreter, imports, process group), before its restore ({rel})")
        if fig["rollback_ready_s"] is not None:
            tm.rollback_ready_s = fig["rollback_ready_s"]
            tm.sources["rollback_ready_s"] = (
                f"recoverkit's in-process rollback on the real pipeline ({model}, stage checkpoints, an edge stage "
                "lost that CheckFree refuses): SIGKILL -> the slowest survivor's failed op -> the group re-formed with "
                f"the spare, before every stage restored its checkpoint ({rel})")
        if fig["replica_recover_s"] is not None:
            tm.replica_recover_s = fig["replica_recover_s"]
            replica_recover_src = (f"the real pipeline's replica mode: detection + group re-formed + the replica's "
                                   f"state loaded, measured on {model} ({rel})")
    slots = micro_batches + stages - 1
    tm.distill_step_s = tm.step_s * micro_batches / slots
    tm.sources["distill_step_s"] = (
        f"a rebuilt stage's fit, per fitting step: one stage's forward and backward over the step's {micro_batches} "
        f"micro-batches, {micro_batches} of a pipeline step's {slots} slots (GPipe: micro-batches + stages - 1): "
        f"step_s x {micro_batches}/{slots}, the whole pipeline waiting for the replacement")
    if replica_recover_src is None:
        tm.replica_recover_s = tm.recover_s
        replica_recover_src = "no replica figures: CheckFree's recovery (detection + relaunch + fetch)"
    tm.sources["replica_recover_s"] = replica_recover_src
    return tm


def clock(point: dict[str, Any], tm: Timing) -> float:
    """Simulated seconds at a curve point: its iterations, saves, restarts and recoveries charged."""
    return (point["iteration"] * tm.step_s + point["saves"] * tm.save_s
            + point["restarts"] * tm.restart_s + point["recoveries"] * tm.recover_s
            + point.get("replica_steps", 0) * tm.step_s * tm.replica_overhead
            + point.get("exact_recoveries", 0) * tm.replica_recover_s
            + point.get("distill_steps", 0) * tm.distill_step_s)
