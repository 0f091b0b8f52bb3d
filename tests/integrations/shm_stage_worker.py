"""The trainer of ``test_shm_stage_kill``: ``shm_crash_worker``'s model, data and tiers (a lazy
save every step to [shared memory, local disk every 5 steps]), held *while a save is being
staged straight into its shared-memory slot*.

``python -m tests.integrations.shm_stage_worker ROOT OUT ATTEMPT TOTAL [HOLD_AT]``

* writes ``OUT/events-ATTEMPT.jsonl`` and ``OUT/final.json`` as ``shm_crash_worker`` does;
* ``HOLD_AT``: once the shm tier lent a slot as the arena of that step's save (its
  ``shm_stage`` phase: the slot's index is gone, nothing is staged yet), write
  ``OUT/holding-ATTEMPT`` and block in ``save_async`` (the test SIGKILLs the process
  there); a hold is bounded (120 s, then exit 3). The saves before it are waited for first,
  so the held save finds a free slot on a loaded machine too.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from recoverkit import Checkpointer
from recoverkit.errors import CheckpointNotFoundError
from recoverkit.storage.faults import FaultInjector
from tests.integrations.shm_crash_worker import STEP_S, batch, build, options


class HoldStage(FaultInjector):
    """The real injector, which also blocks the save of one step once its slot is lent."""

    def __init__(self, step: int, marker: str) -> None:
        super().__init__()
        self.hold_step, self.marker = step, marker

    def reached(self, phase: str, *, step: int | None = None, rank: int | None = None) -> None:
        super().reached(phase, step=step, rank=rank)
        if phase == "shm_stage" and step == self.hold_step:
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)  # the test SIGKILLs the process long before
            os._exit(3)


def main(root: str, out: str, attempt: int, total: int, hold_at: int) -> None:
    torch.set_num_threads(1)
    model, opt = build()
    faults = HoldStage(hold_at, os.path.join(out, f"holding-{attempt}")) if hold_at > 0 else None
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
            time.sleep(STEP_S)
            emit(step=step, loss=float(loss.detach()).hex())
            state["step"] = step
            if step == hold_at:
                # both slots free: this save is staged in its slot whatever the machine's load
                # (a slot still being drained would send it down the copy path, never held)
                ckpt.wait()
            ckpt.save_async(step, state)
        ckpt.wait()
        shm = ckpt.tiers["shm"]
        emit(event="paths", in_place=shm.in_place, copied=shm.copied)
    final = {k: [float(v).hex() for v in t.flatten().tolist()] for k, t in model.state_dict().items()}
    with open(os.path.join(out, "final.json"), "w") as f:
        json.dump(final, f)
    emit(event="done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 0)
