"""The trainer of ``test_shm_crash``: one rank, a small float64 model, a lazy save every step to
[shared memory, local disk every 5 steps]; it resumes from the newest valid step on start.

``python -m tests.integrations.shm_crash_worker ROOT OUT ATTEMPT TOTAL [HOLD_AT]``

* writes ``OUT/events-ATTEMPT.jsonl``: ``{"event": "start", "restored": S, "shm": [...]}``
  (what the shm tier listed before the restore), then one ``{"step", "loss"}`` line per
  step (the loss as ``float.hex``), then ``{"event": "done"}``;
* writes ``OUT/final.json``: every parameter's values (``float.hex``) once training ends;
* ``HOLD_AT``: when the shm tier's copy of that step has been submitted (its ``shm_copy``
  phase, seen through the fault injector), write ``OUT/holding-ATTEMPT`` and block (the
  test kills the process there, mid-copy); a hold is bounded (120 s, then exit 3).

The data of a step is a function of the step alone, so a resumed run computes exactly what
the uninterrupted one did. Each step sleeps ``STEP_S`` after its update: the model is tiny,
a real step's compute is not.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from recoverkit import Checkpointer, CheckpointOptions, TierSpec
from recoverkit.config import StagingPolicy
from recoverkit.errors import CheckpointNotFoundError
from recoverkit.storage.faults import FaultInjector

#: what a real step adds to this tiny model's compute (a step is much longer than the copy of
#: its state into shared memory, so the drain keeps up, as it does in training)
STEP_S = 0.02


class HoldCopy(FaultInjector):
    """The real injector, which also blocks the drain in the shm copy of one step."""

    def __init__(self, step: int, marker: str) -> None:
        super().__init__()
        self.hold_step, self.marker = step, marker

    def reached(self, phase: str, *, step: int | None = None, rank: int | None = None) -> None:
        super().reached(phase, step=step, rank=rank)
        if phase == "shm_copy" and step == self.hold_step:
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)  # the test SIGKILLs the process long before
            os._exit(3)


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).double()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(16, 32, generator=g, dtype=torch.float64)
    return x, x.sum(1, keepdim=True).sin()


def options() -> CheckpointOptions:
    return CheckpointOptions(
        tiers=[TierSpec.shm(), TierSpec.local(every_steps=5)], staging=StagingPolicy(budget_bytes=64 << 20)
    )


def main(root: str, out: str, attempt: int, total: int, hold_at: int) -> None:
    torch.set_num_threads(1)
    model, opt = build()
    faults = HoldCopy(hold_at, os.path.join(out, f"holding-{attempt}")) if hold_at > 0 else None
    events = open(os.path.join(out, f"events-{attempt}.jsonl"), "a", buffering=1)

    def emit(**ev: object) -> None:
        events.write(json.dumps(ev) + "\n")
        events.flush()

    with Checkpointer(root, options=options(), faults=faults) as ckpt:
        state = {"model": model, "opt": opt, "step": 0}
        held = ckpt.tiers["shm"].steps()
        try:
            start = int(ckpt.restore(state))
        except CheckpointNotFoundError:
            start = 0
        emit(event="start", restored=start, shm=held)
        for step in range(start + 1, total + 1):
            x, y = batch(step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            time.sleep(STEP_S)  # the rest of a training step: longer than its snapshot's copy
            emit(step=step, loss=float(loss.detach()).hex())
            state["step"] = step
            ckpt.save_async(step, state)
    final = {k: [float(v).hex() for v in t.flatten().tolist()] for k, t in model.state_dict().items()}
    with open(os.path.join(out, "final.json"), "w") as f:
        json.dump(final, f)
    emit(event="done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 0)
