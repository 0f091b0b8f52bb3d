"""The convergence benchmark's pipeline simulator: the methods, the sizes, the model run, the failures.

Where it sits: the bottom of ``bench_checkfree`` (:mod:`bench.bench_checkfree` is the entry
point; nothing in ``recoverkit`` imports it). The flow: :class:`Sim` holds the ``L`` stages of
:mod:`bench._llama`'s decoder in one process, one AdamW each, and trains a step with per-stage
clipping (the clipped norms are what CheckFree's averaging weighs); when a stage is lost,
:meth:`Sim.rebuild` makes a new one as the method says (neighbour average, swap partner, copy,
random) and :meth:`Sim.restore_snapshot` loads the exact per-step copy.
:func:`failure_schedule` draws, per executed iteration, the stages that fail (seeded, the same
for every method) and :func:`young_daly` picks checkpoint-restart's interval.
:mod:`bench._checkfree_train` runs one method against one schedule with it.

The method names (:data:`MODES`), the smoke and full sizes (:data:`SIZES`), the seed and the
paper's failure probabilities are here, so every later stage names them the same way.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F

from ._llama import ModelSpec, Stage, block_state, build_stages, edge_state

__all__ = [
    "NO_FAILURE",
    "CHECKFREE",
    "PLUS",
    "CKPT",
    "CKPT_FIXED",
    "FALLBACK",
    "SWAP_ONLY",
    "SNAPSHOT",
    "EXTRA",
    "MODES",
    "DEFAULT_MODES",
    "RESTARTS",
    "PAPER_P_STEP",
    "SIZES",
    "SEED",
    "Sim",
    "failure_schedule",
    "young_daly",
]

NO_FAILURE, CHECKFREE, PLUS = "no-failure", "checkfree", "checkfree+"
CKPT, CKPT_FIXED = "checkpoint-restart", "checkpoint-restart-fixed"
SWAP_ONLY = "checkfree+-no-failure"  # the swap schedule's own effect on convergence
SNAPSHOT = "snapshot"  # exact: the lost stage restored from its per-step in-memory replica
# CheckFree as recoverkit's pipeline deploys it: interior stages rebuilt from their neighbours,
# an edge stage (which plain CheckFree refuses) by an in-process rollback to saves kept for it
FALLBACK = "checkfree-fallback"
EXTRA = (FALLBACK, SNAPSHOT, "uniform", "copy", "random", SWAP_ONLY)
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


# --------------------------------------------------------------------------- the simulator
class Sim:
    """The pipeline in one process: stages, one AdamW each, per-stage clipping and norms.

    ``swap`` turns on CheckFree+'s schedule: on odd micro-batches the blocks of stages (0, 1)
    and of (L-2, L-1) run in each other's slot (the embedding still first, the head last).
    """

    def __init__(self, spec: ModelSpec, *, seed: int, lr: float, warmup: int, swap: bool,
                 max_grad_norm: float = 1.0, record: bool = False) -> None:
        self.spec, self.seed, self.lr, self.warmup, self.swap = spec, seed, lr, warmup, swap
        self.max_grad_norm = max_grad_norm
        # record: each stage's (input, output) per micro-batch of the last completed step, as
        # its neighbours hold them (the previous stage sent the input, the next received the
        # output); only micro-batches run in pipeline order, where that is so. A CheckFree
        # rebuild with distill_steps fits the new stage to its lost predecessor's pairs.
        self.record = record
        self.pairs: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self._recording: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None
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
        keep = self._recording if order == sorted(order) else None
        for k in order:
            given = x
            x = self.stages[k].run_blocks(x)
            if keep is not None:
                keep[k].append((given.detach(), x.detach()))
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
        self._recording = [[] for _ in self.stages] if self.record else None
        try:
            for m, batch in enumerate(micro_batches):
                loss = self.loss(batch, self.order(m)) / len(micro_batches)
                loss.backward()
                total += float(loss.detach())
        finally:
            self.pairs, self._recording = self._recording or [], None
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

    def rebuild(self, k: int, how: str, lr_scale: float, distill_steps: int = 0, lr: float | None = None) -> str:
        """Stage ``k`` lost: a new process builds it (random init) and loads what ``how`` says.

        ``how``: ``checkfree`` / ``uniform`` (neighbour average; an edge stays random),
        ``plus`` (average; an edge copies its swap partner and the replicated (de)embedding),
        ``copy`` (a neighbour's blocks; the edges' own layers random), ``random``.
        ``distill_steps``: an averaged interior stage is then fitted to the lost stage's pairs
        of the last step (:func:`~recoverkit.recovery.checkfree.distill_stage`, at ``lr``,
        the base rate of the step; the simulator must ``record``). Returns what was done, for the log.
        """
        from recoverkit.recovery.checkfree import (
            CheckFreeOptions,
            average_neighbours,
            copy_partner,
            distill_stage,
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
            if distill_steps and k < len(self.pairs) and self.pairs[k]:
                given, made = zip(*self.pairs[k])
                fit = distill_stage(_Blocks(new), given, made, steps=distill_steps, lr=lr or self.lr)
                did += f", {fit.describe()}"
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
        return f"{did}; lr x {lr_scale:g}"

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds: every stage and its optimizer (and each stage's rate
        scale, which a CheckFree rebuild set: a rollback before the rebuild undoes it)."""
        out: dict[str, Any] = {}
        for k, (s, o) in enumerate(zip(self.stages, self.opts)):
            out[f"stage{k}"], out[f"opt{k}"] = s, o
        out["lr_scale"] = _Scales(self.lr_scale)
        return out


class _Blocks(torch.nn.Module):
    """A stage's blocks as one module, the part CheckFree rebuilds and a fit runs."""

    def __init__(self, stage: Stage) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.stage.run_blocks(x)
        return out


class _Scales:
    """Stateful: the stages' learning-rate scales, restored in place."""

    def __init__(self, scales: list[float]) -> None:
        self.scales = scales

    def state_dict(self) -> dict[str, Any]:
        return {"scales": list(self.scales)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        got = state.get("scales") if isinstance(state, dict) else None
        if not isinstance(got, list) or len(got) != len(self.scales) or not all(
                isinstance(x, float) and math.isfinite(x) and x > 0 for x in got):
            raise ValueError(f"lr_scale: {len(self.scales)} finite positive floats needed, got {str(got)[:80]}")
        self.scales[:] = got


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
