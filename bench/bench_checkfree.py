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
  **snapshot** (exact recovery: every step each stage's model and AdamW are copied in memory, as
  the real pipeline's replica mode copies them to the next stage's process; a lost stage is a
  new stage loaded from that copy, so its loss vs step is the failure-free run's, bit for bit,
  computed and checked, not assumed).

Wall-clock charged: per step, per save, per restart (detection, a spare brought in, every stage
restored from disk) and per CheckFree recovery (detection, a spare brought in, the neighbours'
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

Run: ``python -m bench.bench_checkfree [--smoke] [--rates 5,10] [--modes ...] [--steps N]
[--out-dir DIR] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ._llama import Batches, ModelSpec, Stage, block_state, build_stages, corpus, edge_state
from .machine import median
from .report import RESULTS_DIR, publish

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_FAILURE, CHECKFREE, PLUS = "no-failure", "checkfree", "checkfree+"
CKPT, CKPT_FIXED = "checkpoint-restart", "checkpoint-restart-fixed"
SWAP_ONLY = "checkfree+-no-failure"  # the swap schedule's own effect on convergence
SNAPSHOT = "snapshot"  # exact: the lost stage restored from its per-step in-memory replica
EXTRA = (SNAPSHOT, "uniform", "copy", "random", SWAP_ONLY)
MODES = (NO_FAILURE, CHECKFREE, PLUS, CKPT, CKPT_FIXED, *EXTRA)
DEFAULT_MODES = (NO_FAILURE, CHECKFREE, PLUS, CKPT, CKPT_FIXED)
RESTARTS = (CKPT, CKPT_FIXED)
#: the paper's per-stage per-step failure probabilities (its 500M configuration) per %/h
PAPER_P_STEP = {5: 0.0009, 10: 0.002, 16: 0.004, 33: 0.01}
SIZES: dict[bool, dict[str, Any]] = {
    True: {"spec": {"stages": 4, "layers_per_stage": 1, "dim": 32, "heads": 2, "ffn": 88, "seq_len": 32},
           "micro_batch": 4, "micro_batches": 2, "steps": 24, "eval_every": 4, "valid_windows": 16,
           "corpus_bytes": 256 << 10, "ckpt_every": 6, "replicate_every": 4, "lr": 3e-3, "warmup": 4,
           "rates": "33", "fail_scale": 2.0, "target_frac": 0.75, "max_extra": 0.5},
    False: {"spec": {"stages": 8, "layers_per_stage": 1, "dim": 128, "heads": 4, "ffn": 344, "seq_len": 64},
            "micro_batch": 8, "micro_batches": 2, "steps": 400, "eval_every": 20, "valid_windows": 128,
            "corpus_bytes": 8 << 20, "ckpt_every": 50, "replicate_every": 10, "lr": 2e-3, "warmup": 20,
            "rates": "5,10,16", "fail_scale": 1.0, "target_frac": 0.9, "max_extra": 0.35},
}
SEED = 1234
PIPELINE_JSON = "checkfree_pipeline.json"


# --------------------------------------------------------------------------- the simulator
class Sim:
    """The pipeline in one process: stages, one AdamW each, per-stage clipping and norms.

    ``swap`` turns on CheckFree+'s schedule: on odd micro-batches the blocks of stages (0, 1)
    and of (L-2, L-1) run in each other's slot (the embedding still first, the head last).
    """

    def __init__(self, spec: ModelSpec, *, seed: int, lr: float, warmup: int, swap: bool,
                 max_grad_norm: float = 1.0) -> None:
        self.spec, self.seed, self.lr, self.warmup, self.swap = spec, seed, lr, warmup, swap
        self.max_grad_norm = max_grad_norm
        self.stages: list[Stage] = build_stages(spec, seed)
        self.opts = [self._adamw(s) for s in self.stages]
        self.lr_scale = [1.0] * spec.stages
        self.norms = [0.0] * spec.stages  # clipped gradient norm of the last completed step
        self.rebuilt = 0  # stages rebuilt so far (seeds a re-initialised stage)
        self.replica: dict[int, dict[str, torch.Tensor]] = {}  # edge stage -> its (de)embedding copy
        # snapshot mode: every stage's model and optimizer state after the last completed step
        self.snapshots: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []

    def _adamw(self, stage: Stage) -> torch.optim.Optimizer:
        return torch.optim.AdamW(stage.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.01)

    def order(self, micro: int) -> list[int]:
        """The stages whose blocks run, in order, for micro-batch ``micro``."""
        last = self.spec.stages - 1
        order = list(range(self.spec.stages))
        if self.swap and micro % 2 == 1:
            order[0], order[1] = 1, 0
            order[last - 1], order[last] = last, last - 1
        return order

    def loss(self, batch: torch.Tensor, order: list[int]) -> torch.Tensor:
        x = self.stages[0].embed_tokens(batch[:, :-1])
        for k in order:
            x = self.stages[k].run_blocks(x)
        logits = self.stages[-1].logits(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then constant (the schedule stays on the global step)."""
        return self.lr * min(1.0, (step + 1) / max(1, self.warmup))

    def train_step(self, step: int, micro_batches: list[torch.Tensor]) -> float:
        from recoverkit.recovery.checkfree import clip_and_record

        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        total = 0.0
        for m, batch in enumerate(micro_batches):
            loss = self.loss(batch, self.order(m)) / len(micro_batches)
            loss.backward()
            total += float(loss.detach())
        for k, (stage, opt) in enumerate(zip(self.stages, self.opts)):
            self.norms[k] = clip_and_record(stage.parameters(), self.max_grad_norm)
            for g in opt.param_groups:
                g["lr"] = self.lr_at(step) * self.lr_scale[k]
            opt.step()
        return total

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> float:
        order = list(range(self.spec.stages))
        losses = [float(self.loss(b, order)) * b.shape[0] for b in batches]
        return sum(losses) / sum(b.shape[0] for b in batches)

    def take_snapshot(self) -> None:
        """Snapshot mode: every stage's model and AdamW state copied in memory (the real
        pipeline's replica mode sends the same to the next stage's process every step)."""
        self.snapshots = [({n: t.detach().clone() for n, t in s.state_dict().items()}, copy.deepcopy(o.state_dict()))
                          for s, o in zip(self.stages, self.opts)]

    def restore_snapshot(self, k: int) -> str:
        """Stage ``k`` lost: a new process builds the stage and loads the model and AdamW state of
        its last snapshot (exact: the state after the last completed step)."""
        if k >= len(self.snapshots):
            raise RuntimeError(f"snapshot: no snapshot of stage {k} to restore from")
        model, opt_state = self.snapshots[k]
        new = Stage(self.spec, k)
        new.load_state_dict(model)
        opt = self._adamw(new)
        opt.load_state_dict(copy.deepcopy(opt_state))
        self.stages[k], self.opts[k] = new, opt
        return f"restored from its per-step snapshot (exact; optimizer step {self._opt_step(opt)})"

    @staticmethod
    def _opt_step(opt: torch.optim.Optimizer) -> int:
        steps = [int(st["step"]) for st in opt.state.values() if "step" in st]
        return max(steps) if steps else 0

    def refresh_replica(self) -> None:
        """CheckFree+: the edges' (de)embedding copied to the partner's host."""
        for k in (0, self.spec.stages - 1):
            self.replica[k] = {n: t.detach().clone() for n, t in edge_state(self.stages[k]).items()}

    def rebuild(self, k: int, how: str, lr_scale: float) -> str:
        """Stage ``k`` lost: a new process builds it (random init) and loads what ``how`` says.

        ``how``: ``checkfree`` / ``uniform`` (neighbour average; an edge stays random),
        ``plus`` (average; an edge copies its swap partner and the replicated (de)embedding),
        ``copy`` (a neighbour's blocks; the edges' own layers random), ``random``.
        Returns what was done, for the log.
        """
        from recoverkit.recovery.checkfree import (
            CheckFreeOptions,
            average_neighbours,
            copy_partner,
            fresh_optimizer,
            swap_partner,
        )

        last = self.spec.stages - 1
        self.rebuilt += 1
        new = Stage(self.spec, k)
        new.reset(torch.Generator().manual_seed(self.seed * 7919 + 104729 * self.rebuilt + k))
        did = "re-initialised at random"
        edge = k in (0, last)
        if how in ("checkfree", "uniform", "plus") and not edge:
            options = CheckFreeOptions(uniform=how == "uniform")
            state = average_neighbours(block_state(self.stages[k - 1]), block_state(self.stages[k + 1]),
                                       self.norms[k - 1], self.norms[k + 1], options)
            new.load_state_dict(state, strict=False)
            did = f"average of {k - 1} and {k + 1} (norms {self.norms[k - 1]:.3g} / {self.norms[k + 1]:.3g})"
        elif how == "plus" and edge:
            partner = swap_partner(k, self.spec.stages)
            assert partner is not None
            state = copy_partner(block_state(self.stages[partner]), self.replica.get(k))
            missing = set(new.state_dict()) - set(state)
            if missing:
                raise RuntimeError(f"CheckFree+: stage {k} rebuilt without {sorted(missing)}")
            new.load_state_dict(state)
            did = f"copy of partner {partner} + replicated (de)embedding"
        elif how == "copy":
            src = k - 1 if k > 0 else 1
            new.load_state_dict(block_state(self.stages[src]), strict=False)
            did = f"copy of {src}" + (" (its own (de)embedding random)" if edge else "")
        elif how not in ("checkfree", "uniform", "random"):
            raise ValueError(f"unknown rebuild {how!r}")
        # a fresh AdamW of the same settings (zero moments, step count restarted); its rate is set
        # every step to lr_scale x the global schedule's
        self.opts[k] = fresh_optimizer(self.opts[k], lr_scale=lr_scale, params=[list(new.parameters())])
        self.stages[k] = new
        self.lr_scale[k] = lr_scale
        return did

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds: every stage and its optimizer."""
        out: dict[str, Any] = {}
        for k, (s, o) in enumerate(zip(self.stages, self.opts)):
            out[f"stage{k}"], out[f"opt{k}"] = s, o
        return out


# --------------------------------------------------------------------------- wall clock
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
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def restart_s(self) -> float:
        """checkpoint-restart: the whole job detected dead, relaunched and restored from disk."""
        return self.detection_s + self.relaunch_s + self.restore_s

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


def pipeline_figures(dirs: tuple[str, ...]) -> tuple[dict[str, Any], str] | None:
    """The real pipeline's published figures (``checkfree_pipeline.json``): per step, detection,
    re-forming the group with the spare, the neighbours' weights fetched; and its model."""
    for d in dirs:
        path = os.path.join(d, PIPELINE_JSON)
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(r, dict):
            continue
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
        if any(got[k] is not None for k in ("step_s", "detection_s", "relaunch_s", "fetch_s")):
            return got, path
    return None


def mttr_figures(dirs: tuple[str, ...]) -> tuple[dict[str, float], str] | None:
    """bench_mttr's restart phases from local disk (one process): detection, relaunch + import."""
    for d in dirs:
        path = os.path.join(d, "mttr.json")
        try:
            with open(path) as f:
                row = json.load(f)["summary"]["local"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
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


def charged(measured: dict[str, float], dirs: tuple[str, ...], stages: int, dim: int) -> Timing:
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
        if fig["replica_recover_s"] is not None:
            tm.replica_recover_s = fig["replica_recover_s"]
            replica_recover_src = (f"the real pipeline's replica mode: detection + group re-formed + the replica's "
                                   f"state loaded, measured on {model} ({rel})")
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
            + point.get("exact_recoveries", 0) * tm.replica_recover_s)


# --------------------------------------------------------------------------- failures
def failure_schedule(p_step: float, stages: int, iterations: int, seed: int) -> dict[int, list[int]]:
    """iteration -> the stages that fail just before it (each stage with probability ``p_step``).

    Indexed by the executed iteration (a redone step counts again), as the paper's simulator
    draws a failure per iteration: every method meets the same failures at the same iteration,
    and a recovery's own seconds are not exposed to more failures (which, with restarts worth
    tens of steps, would make the failure count depend on the method more than on the rate).
    """
    import random

    rng = random.Random(f"checkfree-failures/{seed}")
    out: dict[int, list[int]] = {}
    for it in range(iterations):
        lost = [k for k in range(stages) if rng.random() < p_step]
        if lost:
            out[it] = lost
    return out


def young_daly(save_s: float, step_s: float, p_step: float, stages: int, steps: int) -> int:
    """The checkpoint interval in steps that minimises the expected waste: sqrt(2 C M) (Young/Daly),
    C the save time, M the job's mean time between failures."""
    mtbf_s = step_s / max(p_step * stages, 1e-12)
    return max(1, min(steps, round(math.sqrt(2.0 * save_s * mtbf_s) / step_s)))


# --------------------------------------------------------------------------- one method
def run_method(mode: str, z: dict[str, Any], spec: ModelSpec, batches: Batches, valid: list[torch.Tensor],
               timing: Timing, schedule: dict[int, list[int]], workdir: str, max_steps: int,
               target: float | None, ckpt_every: int = 0) -> dict[str, Any]:
    """Trains one method against one failure schedule; returns its curve and what happened."""
    from recoverkit import Checkpointer, CheckpointOptions, TierSpec
    from recoverkit.distributed.coordinator import LocalCoordinator
    from recoverkit.recovery.checkfree import CheckFreeOptions

    sim_args = {"spec": spec, "seed": SEED, "lr": z["lr"], "warmup": z["warmup"]}
    sim = Sim(**sim_args, swap=mode in (PLUS, SWAP_ONLY))
    if mode == PLUS:
        sim.refresh_replica()
    how = {CHECKFREE: "checkfree", PLUS: "plus", "uniform": "uniform", "copy": "copy", "random": "random"}.get(mode)
    ckpt = None
    root = os.path.join(workdir, f"ckpt-{mode}")
    opts = CheckpointOptions(tiers=[TierSpec.local(every_steps=1)])
    if mode in RESTARTS:
        shutil.rmtree(root, ignore_errors=True)
        ckpt = Checkpointer(root, options=opts, coordinator=LocalCoordinator())
        ckpt.save(0, sim.state())  # the initial state: a failure before the first save restarts from it
    steps, step = z["steps"], 0
    n = {"iteration": 0, "saves": 0, "restarts": 0, "recoveries": 0,  # what the clock is charged for
         "replica_steps": 0, "exact_recoveries": 0}
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
            if lost and mode in RESTARTS:
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
                for k in lost:
                    did = sim.rebuild(k, how or "random", CheckFreeOptions().lr_scale)
                    failures.append({"iteration": it, "stages": [k], "step": step, "action": did})
                n["recoveries"] += 1  # one replacement per stage, in parallel: one recovery time
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
        "ckpt_every": ckpt_every if mode in RESTARTS else None,
        "lost_steps": lost_steps, "train_loss_last": train_losses[-1] if train_losses else None,
        "step_times": step_times, "save_times": save_times, "restore_times": restore_times,
        "step_s_measured": median(step_times) if step_times else None, "runtime_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- figures
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
    for r in runs.values():
        for p in r["curve"]:
            p["t"] = clock(p, tm)
    ckpt_t = {m: crossing(runs[m]["curve"], target, "t") for m in RESTARTS if m in runs}
    ref_curve = runs[NO_FAILURE]["curve"]
    out: dict[str, Any] = {}
    for mode, r in runs.items():
        c = r["curve"]
        tt = crossing(c, target, "t")
        final = val_at_step(c, steps)
        row = {
            "time_to_target_s": tt, "steps_to_target": crossing(c, target, "step"),
            "final_val": final, "final_val_minus_ref": None if final is None else final - ref["final_val"],
            "failures": r["stage_failures"],
            "edge_failures": sum(1 for f in r["failures"] for k in f["stages"] if k in (0, stages - 1)),
            "saves": r["saves_total"], "restarts": r["restarts_total"],
            "recoveries": r["recoveries_total"] + r.get("exact_recoveries_total", 0),
            "lost_steps": r["lost_steps"], "iterations": r["iteration_total"], "steps": r["steps"],
            "sim_seconds": clock({k: r.get(k + "_total", 0) for k in ("iteration", "saves", "restarts", "recoveries",
                                                                      "replica_steps", "exact_recoveries")}, tm),
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
        if mode in (*RESTARTS, SNAPSHOT):
            # a rollback replays the same steps with the same data: the curve vs step is the reference's
            row["ckpt_every"] = r["ckpt_every"]
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


def run(smoke: bool, rates: list[int], modes: tuple[str, ...], workdir: str | None, dirs: tuple[str, ...],
        steps: int | None = None) -> dict[str, Any]:
    """Trains every method at every rate; the clock is charged afterwards (:func:`finish`)."""
    t_start = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # the simulator is sequential; one thread is the least disturbed by a loaded machine
    z = dict(SIZES[smoke])
    if steps:
        z["steps"] = steps
    spec = ModelSpec(**z["spec"])
    data = corpus(z["corpus_bytes"])
    batches = Batches(data, spec.seq_len, z["micro_batch"], SEED)
    valid = batches.valid(z["valid_windows"])
    base = tempfile.mkdtemp(prefix="rk-bench-checkfree-", dir=workdir)
    try:
        sim_args = {"spec": spec, "seed": SEED, "lr": z["lr"], "warmup": z["warmup"]}
        measured = measure(sim_args, batches, z["micro_batches"], base, reps=2 if smoke else 5)
        tm = charged(measured, dirs, spec.stages, spec.dim)  # Young/Daly's interval needs the save and step times up front
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
            schedule = failure_schedule(p_step, spec.stages, 3 * max_steps, SEED + rate)
            k_opt = young_daly(tm.save_s, tm.step_s, p_step, spec.stages, z["steps"])
            runs: dict[str, dict[str, Any]] = {NO_FAILURE: ref}
            for mode in modes:
                if mode == NO_FAILURE:
                    continue
                every = k_opt if mode == CKPT else z["ckpt_every"] if mode == CKPT_FIXED else 0
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
                "runs": runs,
            }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    r = {
        "scenario": "checkfree", "smoke": smoke, "sizes": z, "modes": list(modes), "rates": rates,
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
    tm = charged(whole_run(r), dirs, r["stages"], r["sizes"]["spec"]["dim"])
    r["timing"] = {**asdict(tm), "restart_s": tm.restart_s, "recover_s": tm.recover_s}
    for pr in r["per_rate"].values():
        pr["per_stage_per_h_sim"] = pr["p_step"] * 3600.0 / tm.step_s  # the rate in this simulated clock
        pr["summary"] = summarize(pr["runs"], r["reference"], r["reference"]["target"], r["sizes"]["steps"],
                                  r["stages"], tm)
    return r


# --------------------------------------------------------------------------- report
def _f(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def table(r: dict[str, Any]) -> str:
    z, s, tm, ref = r["sizes"], r["sizes"]["spec"], r["timing"], r["reference"]
    c = r["corpus"]
    lines = [
        f"LLaMa-style decoder, {s['stages']} stages x {s['layers_per_stage']} block (d={s['dim']}, {s['heads']} heads, "
        f"SwiGLU {s['ffn']}, seq {s['seq_len']}, byte-level), {sum(r['params_per_stage'])} parameters; "
        f"{z['micro_batches']} micro-batches of {z['micro_batch']} per step, AdamW lr {z['lr']} "
        f"(warm-up {z['warmup']}, then constant), per-stage clipping at 1.0; {z['steps']} steps"
        + (" [smoke]" if r["smoke"] else "") + f"; runtime {r['runtime_s']:.0f} s",
        f"Corpus: the Python {c['python']} standard library's sources ({c['files_train']} files, "
        f"{c['train_bytes']} bytes; held out: every tenth file, {c['files_valid']} files, {c['valid_bytes']} bytes; "
        f"sha256 {c['sha256'][:12]}).",
        "",
        "**Wall-clock charged** (s)",
        "",
        "| figure | s | source |",
        "|---|---:|---|",
    ]
    for name in ("step_s", "save_s", "restore_s", "detection_s", "relaunch_s", "fetch_s"):
        lines.append(f"| {name} | {tm[name]:.4f} | {tm['sources'].get(name, '-')} |")
    lines.append(f"| restart (detection + relaunch + restore) | {tm['restart_s']:.3f} | |")
    lines.append(f"| CheckFree recovery (detection + relaunch + fetch) | {tm['recover_s']:.3f} | |")
    if SNAPSHOT in r["modes"]:
        lines.append(f"| snapshot: replica overhead per step (fraction of step_s) | {tm['replica_overhead']:.4f} | "
                     f"{tm['sources'].get('replica_overhead', '-')} |")
        lines.append(f"| snapshot: exact recovery (detection + re-forming + replica loaded) | "
                     f"{tm['replica_recover_s']:.3f} | {tm['sources'].get('replica_recover_s', '-')} |")
    lines += ["", f"Target validation loss {ref['target']:.4f}: the failure-free run's at step {ref['target_step']}; "
              f"its final {ref['final_val']:.4f} at step {z['steps']}; evaluation noise (std) {ref['noise']:.4f}.", ""]
    for rate, pr in r["per_rate"].items():
        lines += [
            f"**{rate} %/h** (the paper's p = {pr['p_step']:g} per stage per step; {pr['per_stage_per_h_sim']:.1f} "
            f"failures per stage per simulated hour at this step time; {pr['failures_in_first_steps']} stage "
            f"failures in the first {z['steps']} iterations; checkpoint every {pr['ckpt_every_young_daly']} steps "
            f"(Young/Daly for the measured save time) and every {pr['ckpt_every_fixed']} (fixed))",
            "",
            "| method | failures (edge) | recoveries / restarts | steps lost | iterations | final val loss | "
            "vs no failure | time to target s | steps to target | time vs checkpoint-restart (Young/Daly) | "
            "time vs checkpoint-restart-fixed |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for mode in MODES:
            row = pr["summary"].get(mode)
            if row is None:
                continue
            vs = []
            for m in RESTARTS:
                if f"time_vs_{m}" in row:
                    pct = row[f"faster_than_{m}_pct"]
                    vs.append(f"{row[f'time_vs_{m}']:.3f} ({abs(pct):.1f} % {'faster' if pct >= 0 else 'slower'})")
                else:
                    vs.append("-")
            if mode == SNAPSHOT:
                mode = (f"{mode} (per-step replica, +{100 * tm['replica_overhead']:.0f} % per step; vs step "
                        f"{'bit-identical to' if row['bit_identical_to_ref'] else 'DIFFERS from'} no failure)")
            if mode in RESTARTS:
                mode = f"{mode} (every {row['ckpt_every']}; vs step {'bit-identical to' if row['bit_identical_to_ref'] else 'DIFFERS from'} no failure)"
            rec = f"{row['recoveries']} / {row['restarts']}"
            lines.append(f"| {mode} | {row['failures']} ({row['edge_failures']}) | {rec} | {row['lost_steps']} | "
                         f"{row['iterations']} | {_f(row['final_val'], '.4f')} | {_f(row['final_val_minus_ref'], '+.4f')} | "
                         f"{_f(row['time_to_target_s'], '.1f')} | {_f(row['steps_to_target'], '.0f')} | {vs[0]} | {vs[1]} |")
        lines.append("")
        for mode in (CHECKFREE, PLUS):
            row = pr["summary"].get(mode)
            if row is None:
                continue
            margins = [f"{abs(x):.1f} % {'faster' if x >= 0 else 'slower'} than {m}"
                       for m in RESTARTS if (x := row.get(f"faster_than_{m}_pct")) is not None]
            reached = "; ".join(margins) if margins else "not reached"
            even = row.get(f"break_even_save_s_{CKPT_FIXED}")
            lines.append(f"- {mode} at {rate} %/h: to the target: {reached} (the paper: > 12 % faster; the issue's goal: "
                         f">= 20 % at 10 %/h); final validation loss {_f(row['final_val_minus_ref'], '+.4f')} vs no "
                         f"failure (evaluation noise {ref['noise']:.4f})"
                         + ("" if even is None else
                            f"; against a save every {pr['ckpt_every_fixed']} steps it is faster even with free saves"
                            if even <= 0 else
                            f"; against a save every {pr['ckpt_every_fixed']} steps it breaks even when a save takes "
                            f"{even:.2f} s ({row[f'break_even_save_steps_{CKPT_FIXED}']:.1f} steps; measured here "
                            f"{r['timing']['save_s']:.3f} s to local disk)"))
        row = pr["summary"].get(SNAPSHOT)
        if row is not None:
            parts = []
            for m in RESTARTS:
                x, even = row.get(f"faster_than_{m}_pct"), row.get(f"break_even_replica_overhead_{m}")
                if x is None:
                    continue
                parts.append(f"{abs(x):.1f} % {'faster' if x >= 0 else 'slower'} than {m}"
                             + ("" if even is None else
                                f" (it breaks even at a replica overhead of {100 * even:+.0f} % per step)"))
            lines.append(f"- snapshot at {rate} %/h: to the target: {'; '.join(parts) if parts else 'not reached'}; "
                         f"charged the real pipeline's replica overhead of {100 * tm['replica_overhead']:.0f} % per step "
                         "(measured on its small test model) and its exact recovery; final validation loss "
                         f"{_f(row['final_val_minus_ref'], '+.4f')} vs no failure")
            absolute = row.get(f"time_vs_{CKPT}_absolute_overhead")
            if absolute is not None and tm.get("replica_extra_s"):
                lines.append(f"  - charged instead the replica's extra {1e3 * tm['replica_extra_s']:.1f} ms per step as "
                             f"measured there (+{100 * tm['replica_extra_s'] / tm['step_s']:.0f} % of this step; not "
                             f"scaled to this model's larger stages): "
                             f"{row['time_to_target_s_absolute_overhead']:.1f} s to the target, {absolute:.3f} x "
                             f"{CKPT}'s ({100 * abs(1 - absolute):.1f} % {'faster' if absolute <= 1 else 'slower'})")
        lines.append("")
    lines += [
        "- checkfree: an edge stage lost is re-initialised at random (CheckFree's averaging needs two neighbours; "
        "the recoverkit strategy refuses an edge without CheckFree+). checkfree+: the swap schedule on odd "
        f"micro-batches, a lost edge copies its partner, (de)embedding replicated every {z['replicate_every']} steps.",
        "- checkpoint-restart saves every K steps (Young/Daly for the measured save time; -fixed: every "
        f"{z['ckpt_every']}; blocking, local disk) and rolls every stage back to the newest save; CheckFree methods "
        f"keep training past the failure-free run's steps (at most {int(z['steps'] * (1 + z['max_extra']))}) "
        "until they reach the target.",
        "- A stage fails before an iteration with probability p (the same iterations for every method; a redone "
        "step counts again); the recovery (or restart) is charged, then the step runs. Evaluation time is not "
        "charged. checkfree+ also trains differently when nothing fails (the swapped micro-batches).",
    ]
    if SNAPSHOT in r["modes"]:
        lines.append("- snapshot: every step each stage's model and AdamW state are copied in memory; a lost stage is a "
                     "new stage loaded from that copy (exact, simulated for real: its curve vs step is computed and "
                     "checked against no failure). Charged per step: the real pipeline's replica step / plain step "
                     "ratio (its small test model; a larger stage's compute would dilute it) x this step.")
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        rates = list(r["per_rate"])
        # one column per rate: loss vs step above, vs wall clock below (one rate: side by side)
        axes = fig.subplots(1, 2, squeeze=False) if len(rates) == 1 else fig.subplots(2, len(rates), squeeze=False)
        for i, rate in enumerate(rates):
            pr = r["per_rate"][rate]
            for j, key in enumerate(("step", "t")):
                ax = axes[0][j] if len(rates) == 1 else axes[j][i]
                for n, mode in enumerate(MODES):
                    run_ = pr["runs"].get(mode)
                    if not run_:
                        continue
                    c = run_["curve"]
                    pts = sorted(c, key=lambda p: p["t"]) if key == "t" else c
                    ax.plot([p[key] for p in pts], [p["val"] for p in pts], lw=1, color=f"C{n}", label=mode)
                ax.axhline(r["reference"]["target"], color="grey", lw=0.6, ls=":")
                ax.set_xlabel("step" if key == "step" else "simulated wall clock (s)", fontsize=7)
                ax.set_ylabel("validation loss", fontsize=7)
                ax.set_title(f"{rate} %/h: val loss vs {'step' if key == 'step' else 'wall clock'}", fontsize=8)
                ax.tick_params(labelsize=6)
                ax.set_ylim(top=min(ax.get_ylim()[1], r["reference"]["target"] + 0.9))
        axes[0][0].legend(fontsize=6)

    return draw


def rate_plots(r: dict[str, Any], out_dir: str | None, name: str) -> list[str]:
    """One figure per failure rate, ``<name>_<rate>pct.png``: loss vs step and vs wall clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    os.makedirs(out_dir or RESULTS_DIR, exist_ok=True)
    for rate in r["per_rate"]:
        one = {**r, "per_rate": {rate: r["per_rate"][rate]}}
        fig = plt.figure(figsize=(9, 3.8), dpi=100)
        try:
            _plot(one)(fig)
            fig.tight_layout()
            path = os.path.join(out_dir or RESULTS_DIR, f"{name}_{rate}pct.png")
            tmp = f"{path}.tmp.{os.getpid()}.png"
            fig.savefig(tmp)
            os.replace(tmp, path)
            paths.append(path)
        finally:
            plt.close(fig)
    return paths


def _publish(r: dict[str, Any], out_dir: str | None, name: str) -> None:
    text = table(r)
    extra = rate_plots(r, out_dir, name)
    text += "\n\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in extra)
    print(text)
    publish(name, r, text, plot=_plot(r), out_dir=out_dir)


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
    a = ap.parse_args(argv)
    if not re.fullmatch(r"checkfree[a-z0-9_]*", a.name):
        ap.error(f"--name must be checkfree followed by [a-z0-9_], got {a.name!r}")
    dirs = tuple(d for d in (a.out_dir, RESULTS_DIR) if d)
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
        _publish(r, a.out_dir, a.name)
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
    r = run(a.smoke, rates, modes, a.workdir, dirs, a.steps)
    if old is not None:
        r = merge(old, r)
        r = finish(r, dirs)
    _publish(r, a.out_dir, a.name)
    return r


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def merge(old: Any, new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s rates and modes added to a published result of the same run (same sizes, corpus
    and a bit-identical failure-free curve: the training is deterministic, the failures seeded by
    the rate), the old rates and modes kept; a mode run again replaces the old one."""
    same = (isinstance(old, dict) and old.get("scenario") == "checkfree" and isinstance(old.get("per_rate"), dict)
            and isinstance(old.get("sizes"), dict) and _without(old["sizes"], "rates") == _without(new["sizes"], "rates")
            and isinstance(old.get("modes"), list)
            and old.get("corpus", {}).get("sha256") == new["corpus"]["sha256"])
    ref_old = next(iter(old["per_rate"].values()))["runs"][NO_FAILURE]["curve"] if same and old["per_rate"] else None
    ref_new = next(iter(new["per_rate"].values()))["runs"][NO_FAILURE]["curve"]
    if not same or ref_old is None or [p["val"] for p in ref_old] != [p["val"] for p in ref_new]:
        raise SystemExit("--merge: the published result is not of the same run (sizes, modes, corpus or the "
                         "failure-free curve differ); run every rate at once instead")
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


if __name__ == "__main__":
    main()
