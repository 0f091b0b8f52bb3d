"""recoverkit.protect in real subprocesses: SIGKILL resume, SIGTERM preemption, the loss guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from recoverkit import Checkpointer

STEPS = 30  # 96 samples / batch 8 = 12 batches per epoch: the run crosses epoch boundaries


def _start(root, steps=STEPS, save_every=4, *extra):
    cmd = [sys.executable, "-m", "tests.integrations.protect_worker", root, str(steps), str(save_every), *map(str, extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def _events(proc):
    for line in proc.stdout:
        yield json.loads(line)


def _run(root, *extra, save_every=4):
    proc = _start(root, STEPS, save_every, *extra)
    events = list(_events(proc))
    assert proc.wait(timeout=300) == 0
    return events


def test_sigkill_mid_run_resumes_bit_identically(tmp_path):
    reference = _run(str(tmp_path / "ref"), save_every=1000)
    ref_batches = [e["first"] for e in reference if e["event"] == "step"]

    root = str(tmp_path / "run")
    proc = _start(root)
    seen = []
    for ev in _events(proc):
        if ev["event"] == "step":
            seen.append(ev)
            if ev["step"] == 17:  # mid-epoch (epoch 1, batch 5), between two saves
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = _run(root)
    start = resumed[0]
    assert start["event"] == "start" and start["resumed"] in (12, 16)
    after = [e for e in resumed if e["event"] == "step"]
    assert after[0]["step"] == start["resumed"] + 1
    assert [e["first"] for e in after] == ref_batches[start["resumed"]:]  # same batches, same order
    assert resumed[-1]["fingerprint"] == reference[-1]["fingerprint"]  # bit-identical model


def test_sigterm_saves_within_grace_and_exits_143(tmp_path):
    root = str(tmp_path / "run")
    proc = _start(root, 1000, 1000)  # no periodic saves: only the preemption save
    for ev in _events(proc):
        if ev["event"] == "step" and ev["step"] == 9:
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            break
    rest = [json.loads(line) for line in proc.stdout]
    code = proc.wait(timeout=60)
    elapsed = time.monotonic() - t0
    assert code == 143
    assert elapsed < 20
    last = max([9] + [e["step"] for e in rest if e["event"] == "step"])
    with Checkpointer(root, options=None) as ckpt:
        assert ckpt.latest() == last  # the step it stopped at is durable and committed
    resumed = _run(root)
    assert resumed[0]["resumed"] == last


def test_loss_guard_rolls_back_and_skips_the_batch(tmp_path):
    events = _run(str(tmp_path / "run"), 10, save_every=2)
    rejected = [e for e in events if e["event"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["step"] == 10
    done = events[-1]
    assert done["step"] == STEPS and len(done["skip"]) == 1
    steps = [e for e in events if e["event"] == "step"]
    # steps 9 and 10 were replayed from the step-10 snapshot... the counter never skips
    assert [e["step"] for e in steps][-1] == STEPS
    clean = _run(str(tmp_path / "clean"), save_every=2)
    assert done["fingerprint"] != clean[-1]["fingerprint"]  # one batch fewer was trained
