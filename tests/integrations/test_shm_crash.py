"""One rank, SIGKILLed at random points (once mid-copy into shared memory), restarted each
time: it resumes from the newest complete shared-memory snapshot (a torn one is never
selected), ends bit-exact with a run that never stopped, and leaves no shared memory.

Real processes and real SIGKILLs; the trainer is ``tests/integrations/shm_crash_worker.py``
(a lazy save every step to [shm, local every 5 steps]). The shared memory lives in a
per-test directory (``RECOVERKIT_SHM_DIR``), the node is named by ``RECOVERKIT_NODE``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

from recoverkit.storage.local import LocalTier
from recoverkit.storage.shm import ShmStore

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL = 60
NODE = "node-0"


def _env(shm: str) -> dict[str, str]:
    return dict(os.environ, RECOVERKIT_SHM_DIR=shm, RECOVERKIT_NODE=NODE, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


def _start(root: str, out: str, shm: str, attempt: int, hold_at: int = 0) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "tests.integrations.shm_crash_worker", root, out, str(attempt), str(TOTAL), str(hold_at)]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(shm), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _events(out: str, attempt: int) -> list[dict[str, Any]]:
    try:
        with open(os.path.join(out, f"events-{attempt}.jsonl")) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def _wait_for(cond, what: str, proc: subprocess.Popen[bytes], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the worker ended ({proc.returncode}) before {what}: {proc.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _finish(proc: subprocess.Popen[bytes]) -> None:
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, proc.stderr.read().decode()[-3000:]


def _run(root: str, out: str, shm: str, attempt: int) -> None:
    os.makedirs(out, exist_ok=True)
    _finish(_start(root, out, shm, attempt))


def test_sigkill_at_random_points_resumes_from_the_newest_complete_shm_snapshot(tmp_path):
    rng = random.Random(1212)
    # the run that never stops
    ref_out, ref_shm = str(tmp_path / "ref-out"), str(tmp_path / "ref-shm")
    _run(str(tmp_path / "ref"), ref_out, ref_shm, 0)
    ref_losses = {e["step"]: e["loss"] for e in _events(ref_out, 0) if "step" in e}
    assert sorted(ref_losses) == list(range(1, TOTAL + 1))

    root, out, shm = str(tmp_path / "ckpt"), str(tmp_path / "out"), str(tmp_path / "shm")
    os.makedirs(out)
    # kill points: after the worker reported step N (random), and once mid-copy of step H
    first = rng.randint(6, 12)
    hold = first + rng.randint(6, 10)
    later = [hold + rng.randint(5, 10)]
    later.append(later[0] + rng.randint(5, 12))
    plan: list[tuple[str, int]] = [("after", first), ("hold", hold), ("after", later[0]), ("after", later[1])]
    losses: dict[int, str] = {}
    expected_start = 0
    for attempt, (how, at) in enumerate(plan, start=1):
        proc = _start(root, out, shm, attempt, hold_at=at if how == "hold" else 0)
        _wait_for(lambda a=attempt: bool(_events(out, a)), "its start", proc)
        start = _events(out, attempt)[0]
        assert start["event"] == "start" and start["restored"] == expected_start, (attempt, start, expected_start)
        if expected_start:
            assert start["shm"][-1] == expected_start  # restored from the newest shm snapshot
        if how == "after":
            reached = lambda a=attempt, n=at: any(e.get("step", 0) >= n for e in _events(out, a))  # noqa: E731
            _wait_for(reached, f"step {at}", proc)
        else:
            marker = os.path.join(out, f"holding-{attempt}")
            _wait_for(lambda m=marker: os.path.exists(m), f"the shm copy of step {at}", proc)
        _kill(proc)
        losses.update({e["step"]: e["loss"] for e in _events(out, attempt) if "step" in e})
        held = ShmStore(root, shm_dir=shm, node=NODE).slots(0).steps()
        assert held, f"attempt {attempt}: no complete shm snapshot"
        on_disk = LocalTier(root).steps()
        assert not on_disk or on_disk[-1] <= held[-1]  # shm is written before the disk
        if how == "hold":
            assert at not in held and held[-1] == at - 1, (held, at)  # the torn slot is never selected
        trained = max((e["step"] for e in _events(out, attempt) if "step" in e), default=0)
        print(f"attempt {attempt}: killed ({how} {at}) after training step {trained}; newest complete shm "
              f"snapshot {held[-1]}, local disk {on_disk[-1] if on_disk else None}")
        expected_start = held[-1]
    # the last attempt runs to the end and closes normally
    final = len(plan) + 1
    proc = _start(root, out, shm, final)
    _finish(proc)
    events = _events(out, final)
    assert events[0]["restored"] == expected_start and events[-1]["event"] == "done"
    redone = {e["step"]: e["loss"] for e in events if "step" in e}
    for step, loss in redone.items():  # a step computed again after a restore is bit-identical
        assert losses.get(step, loss) == loss, step
    losses.update(redone)
    assert losses == ref_losses
    with open(os.path.join(out, "final.json")) as f, open(os.path.join(ref_out, "final.json")) as g:
        assert json.load(f) == json.load(g)
    # no shared memory left after the job ended normally (nor after the reference run)
    assert ShmStore.jobs(shm) == [] and os.listdir(shm) == []
    assert os.listdir(ref_shm) == []
