"""Retention policy rules and the run lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from recoverkit.config import CheckpointOptions, RetentionPolicy, StagingPolicy, TierPolicy
from recoverkit.errors import CheckpointLockedError, ConfigError
from recoverkit.storage.lock import RunLock


@pytest.mark.parametrize(
    "policy,steps,kept",
    [
        (RetentionPolicy(keep_last=1), [1, 2, 3], [3]),
        (RetentionPolicy(keep_last=2), [1, 2, 3], [2, 3]),
        (RetentionPolicy(keep_last=1, keep_every=2), [1, 2, 3, 4, 5], [2, 4, 5]),
        (RetentionPolicy(keep_last=None), [1, 2, 3], [1, 2, 3]),
    ],
)
def test_policy(policy, steps, kept):
    newest_first = list(reversed(steps))
    got = [s for i, s in enumerate(newest_first) if policy.keeps(step=s, rank_from_newest=i)]
    assert sorted(got) == kept


def test_newest_is_always_kept():
    assert RetentionPolicy(keep_last=1, keep_every=1000).keeps(step=7, rank_from_newest=0)


@pytest.mark.parametrize("kwargs", [{"keep_last": 0}, {"keep_every": -1}, {"keep_last": 1.5}])
def test_bad_policy_is_rejected(kwargs):
    with pytest.raises(ConfigError):
        RetentionPolicy(**kwargs)


def test_bad_options_are_rejected():
    with pytest.raises(ConfigError, match="piece_bytes"):
        CheckpointOptions(piece_bytes=10)
    with pytest.raises(ConfigError, match="commit_timeout_s"):
        CheckpointOptions(commit_timeout_s=-1)


def test_lock_is_exclusive_and_released(tmp_path):
    a = RunLock(str(tmp_path)).acquire()
    with pytest.raises(CheckpointLockedError, match=f"pid {os.getpid()}"):
        RunLock(str(tmp_path)).acquire()
    a.release()
    RunLock(str(tmp_path)).acquire().release()


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    code = "import sys,time; from recoverkit.storage.lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointLockedError):
            RunLock(str(tmp_path)).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while True:
            try:
                RunLock(str(tmp_path)).acquire().release()
                break
            except CheckpointLockedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        proc.kill()


def test_tier_and_staging_policies_validate():
    assert TierPolicy(local_every=2).tiers_for(4) == ("local",)
    assert TierPolicy(local_every=0).tiers_for(4) == ()
    with pytest.raises(ConfigError, match="compression"):
        TierPolicy(compression="lz77")
    with pytest.raises(ConfigError, match="when_full"):
        StagingPolicy(when_full="drop")
    with pytest.raises(ConfigError, match="budget_bytes"):
        StagingPolicy(budget_bytes=1)


def test_lock_is_not_kept_by_forked_children_of_a_killed_holder(tmp_path):
    # DataLoader workers are forked children: they must not keep a dead trainer's lock
    code = (
        "import os,sys,time; from recoverkit.storage.lock import RunLock; RunLock(sys.argv[1]).acquire()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n    time.sleep(30); os._exit(0)\n"
        "print(pid, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        os.kill(child, 0)  # the forked child is still alive...
        RunLock(str(tmp_path)).acquire().release()  # ...and the lock is free all the same
    finally:
        os.kill(child, signal.SIGKILL)
