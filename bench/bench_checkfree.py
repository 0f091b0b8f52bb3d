"""CheckFree and CheckFree+ against checkpoint-restart: validation loss in simulated wall-clock time.

A LLaMa-style decoder (:mod:`bench._llama`: RMSNorm, rotary attention, SwiGLU; byte-level
tokens) cut into ``L`` pipeline stages is trained on the Python standard library's own sources
(a fixed file list, every tenth file held out; nothing is downloaded). The pipeline is simulated
in one process, as the paper's simulator does: each stage has its own AdamW, its gradient is
clipped per stage and the clipped norm recorded (:func:`recoverkit.recovery.checkfree.clip_and_record`).

Failures: before each executed iteration every stage fails with probability ``p`` (seeded; the
same failures at the same iteration for every method, a redone step counting again), as the
paper's simulator draws them. ``p`` is the paper's per-stage per-step probability (its 500M
configuration: 0.0009, 0.002, 0.004, 0.01 for 5, 10, 16, 33 % per hour at its step time), so a
run of a few hundred steps sees several failures; the table gives the rate this makes per hour
of this simulated clock. Methods (rows):

* **no failure**: the reference (the events are ignored);
* **checkfree**: an interior stage is rebuilt as the gradient-norm weighted average of its two
  neighbours (:func:`~recoverkit.recovery.checkfree.average_neighbours`), with a fresh AdamW at
  ``lr_scale`` x the base rate; an edge stage has one neighbour and CheckFree alone cannot
  rebuild it (the strategy refuses): it is re-initialised at random, as a new process would;
* **checkfree+**: on odd micro-batches stages (1, 2) and (L-1, L) swap their execution order; a
  lost edge stage copies its swap partner's blocks (:func:`~recoverkit.recovery.checkfree.copy_partner`)
  and its (de)embedding from the replica on the partner's host, refreshed every
  ``replicate_every`` steps; interior stages as checkfree;
* **checkpoint-restart**: a blocking :class:`recoverkit.Checkpointer` save of every stage and
  optimizer to local disk every K steps (its measured time charged), K from Young/Daly's
  ``sqrt(2 x save time x MTBF)`` for the measured save and step times (the best interval for
  it); **checkpoint-restart-fixed**: every ``ckpt_every`` steps (50). A failure tears the whole
  job down, a new one restores the newest checkpoint from disk (really) and redoes the steps
  since; its loss curve vs step is the reference's, bit for bit (checked);
* optional (``--modes``): **uniform** (checkfree with 0.5/0.5 weights), **copy** (the previous
  neighbour copied; the next one for the first stage), **random** (re-initialised),
  **checkfree+-no-failure** (the swap schedule with no failure: its own cost in convergence),
  **checkfree-fallback** (CheckFree as recoverkit's pipeline deploys it: an interior stage rebuilt
  by CheckFree; a lost edge stage, which CheckFree refuses, rolls every stage back in process
  (``StagePipeline(checkpoints=...)``: no process restarts; charged the in-process rollback
  measured on the real pipeline) to blocking saves every K steps, K from Young/Daly for the edge
  stages' failure rate alone),
  **snapshot** (exact recovery: every step each stage's model and AdamW are copied in memory, as
  the real pipeline's replica mode copies them to the next stage's process; a lost stage is a
  new stage loaded from that copy, so its loss vs step is the failure-free run's, bit for bit,
  computed and checked, not assumed).

``--distill-steps N`` (default 0, the paper's rule): a CheckFree rebuild of an interior stage
is then fitted in N Adam steps to the lost stage's input -> output pairs of the last completed
step, which its neighbours still hold (the previous stage sent the inputs, the next received the
outputs; :func:`recoverkit.recovery.checkfree.distill_stage`); each fitting step is charged as
one stage's forward and backward over the step's m micro-batches: m of a pipeline step's
m + S - 1 slots, the whole pipeline waiting.

Wall-clock charged: per step, per save, per restart (torchrun restarting every worker of the
real pipeline until it formed again, as measured there, plus every stage restored from disk;
without that figure, or shown beside it: the in-process rollback, as measured on the real
pipeline (else detection and a spare brought in), plus every stage restored) and per CheckFree recovery (detection, a spare brought in, the neighbours'
weights fetched and the stage rebuilt); snapshot: per step the replica's overhead, as the ratio
of the real pipeline's replica step to its plain step (measured on that pipeline's small test
model) times this step, and per recovery the replica mode's detection, re-forming and fetch. Detection, the spare and the fetch come from
``checkfree_pipeline.json`` (the real ``torch.distributed.pipelining`` pipeline's measured
figures) when it exists, else from bench_mttr's restart phases; the per-step time from the real
pipeline only when it ran this model, else measured here; save and restore are measured here.
The output names the source of every figure. Evaluation time is not charged. The clock is
computed afterwards from counts (iterations, saves, restarts, recoveries at every evaluation),
so ``--retime`` re-charges a published result when new figures are published.

Figures: validation loss vs step and vs simulated wall clock per method; the time to reach a
target validation loss (the reference's at ``target_frac`` of its steps, interpolated between
evaluations) and its ratio to checkpoint-restart's (the paper reports CheckFree > 12 % faster);
the final validation loss at the reference's last step.

Run: ``python -m bench.bench_checkfree [--smoke] [--rates 5,10] [--modes ...] [--steps N] [--failure-seed N]
[--lr-scale X] [--distill-steps N]
[--out-dir DIR] [--workdir DIR]``; ``--noise-seeds N`` trains only the failure-free run with N
other seeds (``checkfree_noise.json``: the seed-to-seed std of its final loss, which every
result's final loss is then also judged against).

Modules, by stage: :mod:`bench._checkfree_sim` (the methods, the sizes, the simulator, the
failure schedule, Young/Daly), :mod:`bench._checkfree_clock` (what is measured here and what is
charged, from which published figure), :mod:`bench._checkfree_train` (one method trained against
one failure schedule), :mod:`bench._checkfree_summary` (time to the target, final loss,
``--retime``'s :func:`finish`, ``--merge``), :mod:`bench._checkfree_report` (table, plots,
publishing); this module runs them (:func:`run`) and holds the command line (:func:`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

import torch

from recoverkit.recovery.checkfree import CheckFreeOptions

from ._checkfree_clock import (
    PIPELINE_JSON,
    REPO,
    Timing,
    charged,
    clock,
    measure,
    mttr_figures,
    pipeline_figures,
)
from ._checkfree_report import publish_result, rate_plots, table
from ._checkfree_sim import (
    CHECKFREE,
    CKPT,
    CKPT_FIXED,
    DEFAULT_MODES,
    EXTRA,
    FALLBACK,
    MODES,
    NO_FAILURE,
    PAPER_P_STEP,
    PLUS,
    RESTARTS,
    SEED,
    SIZES,
    SNAPSHOT,
    SWAP_ONLY,
    Sim,
    failure_schedule,
    young_daly,
)
from ._checkfree_summary import (
    NOISE_JSON,
    crossing,
    finish,
    merge,
    noise,
    noise_name,
    summarize,
    val_at_step,
    whole_run,
)
from ._checkfree_train import run_method
from ._llama import Batches, ModelSpec, build_stages, corpus
from .report import RESULTS_DIR

# every name importable from here before the split into stage modules, still importable
__all__ = [
    "NO_FAILURE",
    "CHECKFREE",
    "PLUS",
    "CKPT",
    "CKPT_FIXED",
    "SWAP_ONLY",
    "SNAPSHOT",
    "EXTRA",
    "MODES",
    "DEFAULT_MODES",
    "RESTARTS",
    "PAPER_P_STEP",
    "SIZES",
    "SEED",
    "PIPELINE_JSON",
    "REPO",
    "Sim",
    "failure_schedule",
    "young_daly",
    "Timing",
    "pipeline_figures",
    "mttr_figures",
    "measure",
    "charged",
    "clock",
    "run_method",
    "crossing",
    "val_at_step",
    "summarize",
    "noise",
    "whole_run",
    "finish",
    "merge",
    "table",
    "rate_plots",
    "publish_result",
    "run",
    "main",
]


def sizes(smoke: bool, steps: int | None = None, stages: int | None = None) -> dict[str, Any]:
    """The run's sizes: :data:`SIZES`' with ``steps`` and ``stages`` (a deeper model of the
    same blocks) where given."""
    z = dict(SIZES[smoke])
    if steps:
        z["steps"] = steps
    if stages:
        z["spec"] = {**z["spec"], "stages": stages}
    return z


def run(smoke: bool, rates: list[int], modes: tuple[str, ...], workdir: str | None, dirs: tuple[str, ...],
        steps: int | None = None, failure_seed: int = 0, lr_scale: float | None = None,
        distill_steps: int | None = None, stages: int | None = None) -> dict[str, Any]:
    """Trains every method at every rate; the clock is charged afterwards (:func:`finish`).
    ``failure_seed`` draws another failure schedule (0: the published one); ``lr_scale``: a
    rebuilt stage's learning-rate factor (default :class:`CheckFreeOptions`'s, the paper's 1.1);
    ``distill_steps``: a rebuilt interior stage's fit to the lost stage's last step (default
    :class:`CheckFreeOptions`'s, 0: the paper's rule)."""
    t_start = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # the simulator is sequential; one thread is the least disturbed by a loaded machine
    z = sizes(smoke, steps, stages)
    if lr_scale is not None:  # else the default, as every result published before the option
        z["lr_scale"] = lr_scale
    if distill_steps:  # likewise
        z["distill_steps"] = distill_steps
    spec = ModelSpec(**z["spec"])
    data = corpus(z["corpus_bytes"])
    batches = Batches(data, spec.seq_len, z["micro_batch"], SEED)
    valid = batches.valid(z["valid_windows"])
    base = tempfile.mkdtemp(prefix="rk-bench-checkfree-", dir=workdir)
    try:
        sim_args = {"spec": spec, "seed": SEED, "lr": z["lr"], "warmup": z["warmup"]}
        measured = measure(sim_args, batches, z["micro_batches"], base, reps=2 if smoke else 5)
        tm = charged(measured, dirs, spec.stages, spec.dim, z["micro_batches"])  # Young/Daly's interval needs the save and step times up front
        print(f"[checkfree] measured {measured}; charged {asdict(tm)}", flush=True)
        ref = run_method(NO_FAILURE, z, spec, batches, valid, tm, {}, base, z["steps"], None)
        final = val_at_step(ref["curve"], z["steps"])
        tgt_step = max(z["eval_every"], int(round(z["target_frac"] * z["steps"] / z["eval_every"])) * z["eval_every"])
        target = val_at_step(ref["curve"], tgt_step)
        assert target is not None and final is not None
        print(f"[checkfree] reference: final {final:.4f}, target {target:.4f} (its step {tgt_step}), "
              f"{ref['runtime_s']:.0f} s", flush=True)
        max_steps = int(z["steps"] * (1 + z["max_extra"]))
        per_rate: dict[str, Any] = {}
        for rate in rates:
            p_step = PAPER_P_STEP[rate] * z["fail_scale"]
            schedule = failure_schedule(p_step, spec.stages, 3 * max_steps, SEED + rate + 1000 * failure_seed)
            k_opt = young_daly(tm.save_s, tm.step_s, p_step, spec.stages, z["steps"])
            k_edge = young_daly(tm.save_s, tm.step_s, p_step, 2, z["steps"])  # only the edges restart
            runs: dict[str, dict[str, Any]] = {NO_FAILURE: ref}
            for mode in modes:
                if mode == NO_FAILURE:
                    continue
                every = {CKPT: k_opt, CKPT_FIXED: z["ckpt_every"], FALLBACK: k_edge}.get(mode, 0)
                r = run_method(mode, z, spec, batches, valid, tm, dict(schedule), base, max_steps, target, every)
                runs[mode] = r
                print(f"[checkfree] {rate} %/h {mode}: {r['stage_failures']} stage failures, steps {r['steps']}, "
                      f"iterations {r['iteration_total']}, val {r['curve'][-1]['val']:.4f}, {r['runtime_s']:.0f} s",
                      flush=True)
            per_rate[str(rate)] = {
                "paper_rate_per_h": rate, "p_step": p_step,
                "expected_failures": p_step * spec.stages * z["steps"],
                "failures_in_first_steps": sum(len(v) for it, v in schedule.items() if it < z["steps"]),
                "ckpt_every_young_daly": k_opt, "ckpt_every_fixed": z["ckpt_every"],
                "ckpt_every_fallback": k_edge,
                "runs": runs,
            }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    r = {
        "scenario": "checkfree", "smoke": smoke, "sizes": z, "modes": list(modes), "rates": rates,
        "failure_seed": failure_seed,
        "corpus": {"root": data.root, "python": sys.version.split()[0], "train_bytes": data.train.numel(),
                   "valid_bytes": data.valid.numel(), "files_train": data.files_train,
                   "files_valid": data.files_valid, "sha256": data.sha256},
        "stages": spec.stages,
        "params_per_stage": [sum(p.numel() for p in s.parameters()) for s in build_stages(spec, SEED)],
        "measured": measured,
        "reference": {"final_val": final, "target": target, "target_step": tgt_step,
                      "noise": noise(ref["curve"]), "step_s_measured": ref["step_s_measured"],
                      "runtime_s": ref["runtime_s"]},
        "per_rate": per_rate, "runtime_s": time.perf_counter() - t_start,
    }
    return finish(r, dirs)


def noise_seeds(n: int, smoke: bool, workdir: str | None, steps: int | None = None,
                stages: int | None = None) -> dict[str, Any]:
    """The failure-free run trained with ``n`` other seeds (initialisation and data order; the
    same corpus, sizes and held-out windows): its final validation loss per seed, the noise
    a method's final loss is judged against (:func:`bench._checkfree_summary.seed_spread`)."""
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    z = sizes(smoke, steps, stages)
    spec = ModelSpec(**z["spec"])
    data = corpus(z["corpus_bytes"])
    valid = Batches(data, spec.seq_len, z["micro_batch"], SEED).valid(z["valid_windows"])
    tm = Timing(step_s=0.0, save_s=0.0, restore_s=0.0, detection_s=0.0, relaunch_s=0.0, fetch_s=0.0)  # not charged
    base = tempfile.mkdtemp(prefix="rk-bench-checkfree-noise-", dir=workdir)
    finals: dict[str, float | None] = {}
    try:
        for seed in range(SEED + 1, SEED + 1 + n):
            batches = Batches(data, spec.seq_len, z["micro_batch"], seed)
            ref = run_method(NO_FAILURE, z, spec, batches, valid, tm, {}, base, z["steps"], None, seed=seed)
            finals[str(seed)] = val_at_step(ref["curve"], z["steps"])
            print(f"[checkfree] noise: seed {seed}: final {finals[str(seed)]}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {"scenario": "checkfree-noise", "sizes": z, "corpus_sha256": data.sha256, "finals": finals,
            "runtime_s": time.perf_counter() - t_start}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, seconds")
    ap.add_argument("--rates", default=None, help=f"failure rates in %%/h, of {sorted(PAPER_P_STEP)} (default 5,10,16)")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of {','.join(MODES)}")
    ap.add_argument("--steps", type=int, default=None, help="steps of the failure-free run (default 400)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--name", default="checkfree",
                    help="file stem of the results (default checkfree; e.g. checkfree_extra for a run of other modes)")
    ap.add_argument("--merge", action="store_true",
                    help="add these rates and modes to the published <name>.json of the same run (deterministic "
                         "training)")
    ap.add_argument("--retime", action="store_true",
                    help="re-charge the clock of the published checkfree.json in --out-dir (no training): "
                         "after the real pipeline's figures are published")
    ap.add_argument("--noise-seeds", type=int, default=0,
                    help="train only the failure-free run with N other seeds and publish its final losses "
                         f"({NOISE_JSON}: the seed-to-seed noise every result's final loss is judged against)")
    ap.add_argument("--lr-scale", type=float, default=None,
                    help="a rebuilt stage's learning rate as a factor of the base rate (default: "
                         "CheckFreeOptions's, 1.1 as in the paper's code; the paper used 1.2 at 500M)")
    ap.add_argument("--distill-steps", type=int, default=None,
                    help="fit a rebuilt interior stage to the lost stage's input -> output pairs of the last step "
                         "(which its neighbours hold) in N Adam steps, each charged as one stage's forward and "
                         "backward over the step's micro-batches (default 0: the paper's rule)")
    ap.add_argument("--stages", type=int, default=None,
                    help="pipeline stages of one block each (default 8; 4 to 16): a deeper model; its "
                         "--noise-seeds publish checkfree_s<N>_noise.json")
    ap.add_argument("--failure-seed", type=int, default=0,
                    help="another seeded failure schedule, the same training (default 0: the published one)")
    a = ap.parse_args(argv)
    if not re.fullmatch(r"checkfree[a-z0-9_]*", a.name):
        ap.error(f"--name must be checkfree followed by [a-z0-9_], got {a.name!r}")
    dirs = tuple(d for d in (a.out_dir, RESULTS_DIR) if d)
    if a.stages is not None and not 4 <= a.stages <= 16:
        ap.error("--stages must be in [4, 16]")
    if a.noise_seeds:
        if not 2 <= a.noise_seeds <= 64:
            ap.error("--noise-seeds must be in [2, 64]")
        out = noise_seeds(a.noise_seeds, a.smoke, a.workdir, a.steps, a.stages)
        for d in dirs[:1]:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, noise_name(a.stages)), "w") as f:
                json.dump(out, f, indent=1)
                f.write("\n")
        return out
    if a.retime:
        path = os.path.join(a.out_dir or RESULTS_DIR, f"{a.name}.json")
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            ap.error(f"--retime: cannot read {path}: {e}")
        if not isinstance(old, dict) or old.get("scenario") != "checkfree" or "measured" not in old:
            ap.error(f"--retime: {path} is not a checkfree result")
        old.pop("machine", None)
        r = finish(old, dirs)
        publish_result(r, a.out_dir, a.name)
        return r
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    if NO_FAILURE not in modes:
        ap.error(f"--modes must include {NO_FAILURE} (the reference)")
    try:
        rates = [int(x) for x in (a.rates or SIZES[a.smoke]["rates"]).split(",") if x.strip()]
    except ValueError:
        ap.error(f"--rates must be integers of {sorted(PAPER_P_STEP)}, got {a.rates!r}")
    bad = [x for x in rates if x not in PAPER_P_STEP]
    if bad or not rates:
        ap.error(f"unknown rate(s) {bad}; known: {sorted(PAPER_P_STEP)}")
    if a.steps is not None and a.steps < 10:
        ap.error("--steps must be >= 10")
    old = None
    if a.merge:
        path = os.path.join(a.out_dir or RESULTS_DIR, f"{a.name}.json")
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            ap.error(f"--merge: cannot read {path}: {e}")
    if not 0 <= a.failure_seed < 1000:
        ap.error("--failure-seed must be in [0, 1000)")
    if a.lr_scale is not None:
        try:
            CheckFreeOptions(lr_scale=a.lr_scale)
        except ValueError as e:
            ap.error(f"--lr-scale: {e}")
    if a.distill_steps is not None:
        try:
            CheckFreeOptions(distill_steps=a.distill_steps)
        except ValueError as e:
            ap.error(f"--distill-steps: {e}")
    r = run(a.smoke, rates, modes, a.workdir, dirs, a.steps, a.failure_seed, a.lr_scale, a.distill_steps,
            a.stages)
    if old is not None:
        r = merge(old, r)
        r = finish(r, dirs)
    publish_result(r, a.out_dir, a.name)
    return r


if __name__ == "__main__":
    main()
