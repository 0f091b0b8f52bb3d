"""The convergence benchmark's summary: time and steps to the target, final loss, merged results.

Where it sits: after the training (:mod:`bench._checkfree_train`) and the clock
(:mod:`bench._checkfree_clock`), before the report (:mod:`bench._checkfree_report`). The flow:
:func:`finish` charges the clock from the figures published now (:func:`whole_run`'s medians
over the whole benchmark) and :func:`summarize`s every rate: each curve point gets its
simulated time, each method its time and steps to the target (:func:`crossing`, interpolated
between evaluations), its final validation loss (:func:`val_at_step`), its ratio to
checkpoint-restart's and the break-even save time or replica overhead; :func:`noise` is the
reference's evaluation noise. ``--retime`` calls :func:`finish` again on a published result;
``--merge`` adds rates and modes to one (:func:`merge`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import asdict
from typing import Any

from ._checkfree_clock import REPO, Timing, charged, clock, published
from ._checkfree_sim import CKPT, FALLBACK, MODES, NO_FAILURE, RESTARTS, SEED, SNAPSHOT
from .machine import median

GOAL_PCT = 20.0  # the goal: CheckFree this much sooner than checkpoint-restart at 10 %/h

__all__ = ["GOAL_PCT", "NOISE_JSON", "noise_name", "noise_files", "crossing", "val_at_step", "summarize", "noise", "seed_spread", "whole_run",
           "finish", "merge"]

#: the sizes that change only how a lost stage is rebuilt (the failure-free run is the same)
REBUILD_KEYS = ("lr_scale", "distill_steps")
#: the failure-free run's final loss over other seeds (``bench_checkfree --noise-seeds N``)
NOISE_JSON = "checkfree_noise.json"


def crossing(curve: list[dict[str, Any]], target: float, key: str) -> float | None:
    """``key`` (t or step) where the validation loss first reaches ``target``, interpolated."""
    for a, b in zip(curve, curve[1:]):
        if b["val"] <= target:
            if a["val"] <= target:
                return float(a[key])
            f = (a["val"] - target) / (a["val"] - b["val"])
            return float(a[key] + f * (b[key] - a[key]))
    return float(curve[0][key]) if curve and curve[0]["val"] <= target else None


def val_at_step(curve: list[dict[str, Any]], step: int) -> float | None:
    """The validation loss of the last evaluation at ``step`` (a rolled-back run may pass it twice)."""
    vals = [p["val"] for p in curve if p["step"] == step]
    return vals[-1] if vals else None


def summarize(runs: dict[str, dict[str, Any]], ref: dict[str, Any], target: float, steps: int,
              stages: int, tm: Timing) -> dict[str, Any]:
    """Per method: time and steps to the target, final loss, what happened; adds ``t`` to every curve point."""
    inproc = dataclasses.replace(tm, job_relaunch_s=None) if tm.job_relaunch_s is not None else None
    for mode, r in runs.items():
        for p in r["curve"]:
            # checkfree-fallback's edge stages roll back in process (StagePipeline with stage
            # checkpoints): charged the in-process rollback, not torchrun's restart of the job
            p["t"] = clock(p, inproc if inproc is not None and mode == FALLBACK else tm)
            if inproc is not None:  # checkpoint-restart charged the in-process restart instead
                p["t_inprocess"] = clock(p, inproc)
    ckpt_t = {m: crossing(runs[m]["curve"], target, "t") for m in RESTARTS if m in runs}
    ckpt_inproc = ({m: crossing(runs[m]["curve"], target, "t_inprocess") for m in RESTARTS if m in runs}
                   if inproc is not None else {})
    ref_curve = runs[NO_FAILURE]["curve"]
    out: dict[str, Any] = {}
    for mode, r in runs.items():
        c = r["curve"]
        tt = crossing(c, target, "t")
        final = val_at_step(c, steps)
        row = {
            "time_to_target_s": tt, "steps_to_target": crossing(c, target, "step"),
            "final_val": final, "final_val_minus_ref": None if final is None else final - ref["final_val"],
            # that difference in seed-to-seed stds of the failure-free final loss (when measured)
            "final_val_seed_sigmas": (None if final is None or not (ref.get("seeds") or {}).get("std")
                                      else (final - ref["final_val"]) / ref["seeds"]["std"]),
            "failures": r["stage_failures"],
            "edge_failures": sum(1 for f in r["failures"] for k in f["stages"] if k in (0, stages - 1)),
            "saves": r["saves_total"], "restarts": r["restarts_total"],
            "recoveries": r["recoveries_total"] + r.get("exact_recoveries_total", 0),
            "lost_steps": r["lost_steps"], "iterations": r["iteration_total"], "steps": r["steps"],
            "sim_seconds": clock({k: r.get(k + "_total", 0) for k in ("iteration", "saves", "restarts", "recoveries",
                                                                      "replica_steps", "exact_recoveries")},
                                 inproc if inproc is not None and mode == FALLBACK else tm),
        }
        for m, ct in ckpt_t.items():
            if tt is not None and ct:
                row[f"time_vs_{m}"] = tt / ct
                row[f"faster_than_{m}_pct"] = 100.0 * (1.0 - tt / ct)
                # the save time at which this method and that checkpoint-restart (same interval, same
                # rollbacks) reach the target together: its time to target grows with each save it made
                saves = crossing(runs[m]["curve"], target, "saves")
                if mode not in RESTARTS and saves:
                    even = tm.save_s + (tt - ct) / saves
                    row[f"break_even_save_s_{m}"] = even
                    row[f"break_even_save_steps_{m}"] = even / tm.step_s
                # snapshot: the per-step replica overhead at which it reaches the target with that
                # checkpoint-restart (its time to target is linear in the overhead)
                replicated = crossing(c, target, "replica_steps") if mode == SNAPSHOT else None
                if replicated:
                    base = tt - replicated * tm.step_s * tm.replica_overhead
                    row[f"break_even_replica_overhead_{m}"] = (ct - base) / (replicated * tm.step_s)
                    # charged the replica's extra seconds per step instead of its ratio (shown only)
                    row["time_to_target_s_absolute_overhead"] = base + replicated * tm.replica_extra_s
                    row[f"time_vs_{m}_absolute_overhead"] = row["time_to_target_s_absolute_overhead"] / ct
            ci = ckpt_inproc.get(m)
            if mode not in RESTARTS and tt is not None and ci:  # vs the in-process restart's
                row[f"faster_than_{m}_inprocess_pct"] = 100.0 * (1.0 - tt / ci)
            # the restart time at which this method reaches the target GOAL_PCT % sooner than that
            # checkpoint-restart: each time to target grows by the restarts made before it
            restarts = crossing(runs[m]["curve"], target, "restarts") if mode not in RESTARTS else None
            if tt is not None and ct and restarts:
                keep = 1.0 - GOAL_PCT / 100.0
                # checkfree-fallback's own rollbacks are in process: they do not scale with the restart
                own = 0.0 if mode == FALLBACK else crossing(c, target, "restarts") or 0.0
                if keep * restarts > own:
                    row[f"goal_restart_s_{m}"] = tm.restart_s + (tt - keep * ct) / (keep * restarts - own)
        if mode in (*RESTARTS, SNAPSHOT, FALLBACK):
            row["ckpt_every"] = r["ckpt_every"]
        if mode in (*RESTARTS, SNAPSHOT):
            # a rollback replays the same steps with the same data: the curve vs step is the reference's
            # its loss vs step is the reference's, bit for bit, at every evaluation
            row["bit_identical_to_ref"] = all(val_at_step(ref_curve, p["step"]) == p["val"] for p in c)
        out[mode] = row
    return out


def noise(curve: list[dict[str, Any]]) -> float:
    """Evaluation noise of a curve: std of each point's distance to its neighbours' mean (last half)."""
    pts = [p["val"] for p in curve][len(curve) // 2:]
    d = [pts[i] - 0.5 * (pts[i - 1] + pts[i + 1]) for i in range(1, len(pts) - 1)]
    if len(d) < 2:
        return 0.0
    m = sum(d) / len(d)
    return math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))


def seed_spread(dirs: tuple[str, ...], r: dict[str, Any]) -> dict[str, Any] | None:
    """The failure-free run's final validation loss over other seeds (model initialisation and
    data order; the same held-out windows), from ``checkfree_noise.json`` when it is of this
    run's sizes and corpus, with this run's own: the seed-to-seed std (the noise a final loss
    is judged against, beside the evaluation noise of one curve), or from another
    ``checkfree*_noise.json`` of this run's sizes (``--noise-seeds`` with ``--stages``). Read as
    hostile input."""
    for path, got in (x for name in noise_files(dirs) for x in published(dirs, name)):
        sizes = got.get("sizes")  # the failure-free run does not depend on a rebuilt stage's rate
        if (not isinstance(sizes, dict) or _without(sizes, *REBUILD_KEYS) != _without(r["sizes"], *REBUILD_KEYS)
                or got.get("corpus_sha256") != r["corpus"]["sha256"]):
            continue
        finals = got.get("finals")
        if not isinstance(finals, dict):
            continue
        vals = [float(v) for v in finals.values() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v)]
        vals = [r["reference"]["final_val"], *vals]
        if len(vals) < 3:
            continue
        m = sum(vals) / len(vals)
        std = math.sqrt(sum((x - m) ** 2 for x in vals) / (len(vals) - 1))
        return {"finals": {**{str(SEED): r["reference"]["final_val"]}, **{str(k): v for k, v in finals.items()}},
                "std": std, "seeds": len(vals), "source": os.path.relpath(path, REPO)}
    return None


def noise_name(stages: int | None) -> str:
    """Where ``--noise-seeds`` publishes: :data:`NOISE_JSON` for the default sizes, else one
    file per stage count."""
    return NOISE_JSON if stages is None else f"checkfree_s{stages}_noise.json"


def noise_files(dirs: tuple[str, ...]) -> list[str]:
    """The noise files' names in ``dirs``: :data:`NOISE_JSON` first, then the others, sorted."""
    names = set()
    for d in dirs:
        try:
            names.update(n for n in os.listdir(d) if re.fullmatch(r"checkfree_s\d+_noise\.json", n))
        except OSError:
            continue
    return [NOISE_JSON, *sorted(names)]


def whole_run(r: dict[str, Any]) -> dict[str, float]:
    """Step, save and restore times: the medians over every step, save and restore of the whole
    benchmark (hundreds of each: steadier on a shared machine than the few calibration samples,
    which only choose the Young/Daly interval up front)."""
    out = dict(r["measured"])
    runs = [run_ for i, pr in enumerate(r["per_rate"].values()) for m, run_ in pr["runs"].items()
            if m != NO_FAILURE or i == 0]  # the reference is shared by every rate
    for key, name in (("step_s", "step_times"), ("save_s", "save_times"), ("restore_s", "restore_times")):
        samples = [x for run_ in runs for x in run_.get(name, ())]
        if samples:
            out[key], out[key.replace("_s", "_n")] = median(samples), float(len(samples))
    return out


def finish(r: dict[str, Any], dirs: tuple[str, ...]) -> dict[str, Any]:
    """Charges the clock (from the figures published now) and summarises every rate; ``--retime``
    calls it again on a published result when the real pipeline's figures arrive."""
    tm = charged(whole_run(r), dirs, r["stages"], r["sizes"]["spec"]["dim"], r["sizes"]["micro_batches"])
    r["reference"]["seeds"] = seed_spread(dirs, r)
    r["timing"] = {**asdict(tm), "restart_s": tm.restart_s, "recover_s": tm.recover_s,
                   "inprocess_restart_s": tm.inprocess_restart_s}
    for pr in r["per_rate"].values():
        pr["per_stage_per_h_sim"] = pr["p_step"] * 3600.0 / tm.step_s  # the rate in this simulated clock
        pr["summary"] = summarize(pr["runs"], r["reference"], r["reference"]["target"], r["sizes"]["steps"],
                                  r["stages"], tm)
    return r


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def merge(old: Any, new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s rates and modes added to a published result of the same run (same sizes, corpus,
    failure seed and a bit-identical failure-free curve: the training is deterministic, the failures seeded by
    the rate), the old rates and modes kept; a mode run again replaces the old one."""
    same = (isinstance(old, dict) and old.get("scenario") == "checkfree" and isinstance(old.get("per_rate"), dict)
            and isinstance(old.get("sizes"), dict) and _without(old["sizes"], "rates") == _without(new["sizes"], "rates")
            and isinstance(old.get("modes"), list) and old.get("failure_seed", 0) == new.get("failure_seed", 0)
            and old.get("corpus", {}).get("sha256") == new["corpus"]["sha256"])
    ref_old = next(iter(old["per_rate"].values()))["runs"][NO_FAILURE]["curve"] if same and old["per_rate"] else None
    ref_new = next(iter(new["per_rate"].values()))["runs"][NO_FAILURE]["curve"]
    if not same or ref_old is None or [p["val"] for p in ref_old] != [p["val"] for p in ref_new]:
        raise SystemExit("--merge: the published result is not of the same run (sizes, modes, corpus or the "
                         "failure seed or failure-free curve differ); run every rate at once instead")
    out = dict(new)
    rates = dict(old["per_rate"])
    for k, pr in new["per_rate"].items():
        prev = rates.get(k)
        if isinstance(prev, dict) and isinstance(prev.get("runs"), dict):
            both = {**prev, **pr, "runs": {**prev["runs"], **pr["runs"]}}
            if CKPT in prev["runs"] and CKPT not in pr["runs"]:  # its interval is the old run's
                both["ckpt_every_young_daly"] = prev["ckpt_every_young_daly"]
            pr = both
        rates[k] = pr
    out["per_rate"] = rates
    out["modes"] = [m for m in MODES if m in set(old["modes"]) | set(new["modes"])]
    out["per_rate"] = dict(sorted(out["per_rate"].items(), key=lambda kv: int(kv[0])))
    out["rates"] = [int(k) for k in out["per_rate"]]
    out["runtime_s"] = old.get("runtime_s", 0.0) + new["runtime_s"]
    return out
