"""A reader beside a live trainer: the trainer (a real process holding the run lock) saves
every step with keep_last=1, so its retention deletes the step a reader is reading all the
time; the reader restores in a loop. Every restore succeeds with one consistent step, no
exception escapes, and the trainer never notices the reader.

Run as a module, this file is the trainer: ``python -m tests.integrations.test_reader_beside_training ROOT STEPS``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import torch

from recoverkit import Checkpointer, CheckpointOptions, CheckpointReader, RetentionPolicy
from recoverkit.reading import StepDeletedWarning

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 120
WAIT_S = 300  # bound on every wait (never asserted as a duration)


def _state(value: float, step: int) -> dict:
    model = torch.nn.Linear(512, 512)  # ~1 MiB: long enough to read that deletes land mid-read
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"model": model, "optimizer": opt, "buffer": torch.full((65536,), value), "step": step}


def _trainer(root: str, steps: int) -> None:
    with Checkpointer(root, options=CheckpointOptions(retention=RetentionPolicy(keep_last=1))) as ckpt:
        for s in range(1, steps + 1):
            ckpt.save(s, _state(float(s), s))
            if s == 1:
                print(json.dumps({"event": "first"}), flush=True)
    print(json.dumps({"event": "done", "steps": ckpt.steps()}), flush=True)


def _consistent(target: dict, step: int) -> bool:
    value = float(step)
    return (
        target["step"] == step
        and torch.equal(target["buffer"], torch.full((65536,), value))
        and all(torch.equal(p, torch.full_like(p, value)) for p in target["model"].parameters())
    )


def test_a_reader_restores_in_a_loop_while_retention_deletes_under_it(tmp_path):
    root = str(tmp_path / "ckpt")
    proc = subprocess.Popen([sys.executable, "-m", "tests.integrations.test_reader_beside_training", root, str(STEPS)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "first"
        reader = CheckpointReader(root, restore_rng=False)
        restored: list[int] = []
        retried = 0
        deadline = time.monotonic() + WAIT_S
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            while proc.poll() is None:
                assert time.monotonic() < deadline, "the trainer did not finish"
                target = _state(0.0, 0)
                step = reader.restore(target)  # strict: the whole state, all of one step
                assert _consistent(target, step), step
                partial = {"model": torch.nn.Linear(512, 512)}
                step2 = reader.restore(partial, strict=False)
                assert all(torch.equal(p, torch.full_like(p, float(step2))) for p in partial["model"].parameters())
                tree = reader.read(entries=["step", "buffer"])
                assert tree["step"] == tree.step and torch.equal(tree["buffer"], torch.full((65536,), float(tree.step)))
                restored += [step, step2, tree.step]
        retried = sum(issubclass(w.category, StepDeletedWarning) for w in caught)
        others = [str(w.message) for w in caught if not issubclass(w.category, StepDeletedWarning)]
        assert others == []  # no step was judged damaged: a deleted step is not a damaged one
        out, _ = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0
        assert json.loads(out.splitlines()[-1]) == {"event": "done", "steps": [STEPS]}
        assert restored and restored == sorted(restored)  # never an older step than one already seen
        print(f"{len(restored)} restores beside training, {retried} retried after a deletion")
        target = _state(0.0, 0)
        assert reader.restore(target) == STEPS and _consistent(target, STEPS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


if __name__ == "__main__":
    _trainer(sys.argv[1], int(sys.argv[2]))
