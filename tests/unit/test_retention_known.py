"""Retention never loses the last good step: rotten data in the newest steps (manifests
intact) is neither protected nor counted among the kept, the step a restore used and the
step just committed are never deleted, and only the lock holder cleans up a root."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy
from recoverkit.storage.discovery import CheckpointSkippedWarning, decide_retention
from recoverkit.storage.faults import FaultInjector
from recoverkit.storage.local import LocalTier

KEEP_ALL = CheckpointOptions(retention=RetentionPolicy(keep_last=None))


def rot(root: str, step: int) -> None:
    """Flip one byte inside a tensor shard of ``step``'s segment file (the manifest stays valid)."""
    tier = LocalTier(root)
    manifest = tier.manifest(step)
    rec = next(s for t in manifest.tensors.values() for s in t.shards if s.nbytes > 0)
    path = os.path.join(tier.step_path(step), rec.file)
    with open(path, "r+b") as f:
        f.seek(rec.offset + rec.nbytes // 2)
        byte = f.read(1)
        f.seek(rec.offset + rec.nbytes // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def _state(value: float) -> dict:
    return {"w": torch.full((1024,), value)}


def _save_steps(root: str, steps: tuple[int, ...]) -> None:
    with Checkpointer(root, options=KEEP_ALL) as ckpt:
        for s in steps:
            ckpt.save(s, _state(float(s)))


def _restore(ckpt: Checkpointer) -> tuple[int, float]:
    target = _state(0.0)
    with pytest.warns(CheckpointSkippedWarning):
        step = ckpt.restore(target)
    return step, float(target["w"][0])


def test_a_save_after_resuming_past_rotten_steps_keeps_the_step_resumed_from(root):
    # the reproduction: 200 and 300 rotten, keep_last=2, resume from 100, save 150
    _save_steps(root, (100, 200, 300))
    rot(root, 200)
    rot(root, 300)
    opts = CheckpointOptions(retention=RetentionPolicy(keep_last=2))
    with Checkpointer(root, options=opts) as ckpt:
        assert _restore(ckpt) == (100, 100.0)
        result = ckpt.save(150, _state(150.0))
        assert result.deleted_steps == ()  # rotten steps are not counted: 150 and 100 are the last 2
        assert ckpt.steps() == [100, 150, 200, 300]  # the rotten ones stay, as evidence
    with Checkpointer(root, options=opts) as ckpt:  # the next restart finds the saved step
        assert _restore(ckpt) == (150, 150.0)


def test_known_bad_steps_are_never_protected_and_a_recommitted_step_is_good_again(root):
    _save_steps(root, (100, 200, 300))
    rot(root, 200)
    rot(root, 300)
    opts = CheckpointOptions(retention=RetentionPolicy(keep_last=1))
    with Checkpointer(root, options=opts) as ckpt:
        assert _restore(ckpt)[0] == 100
        assert ckpt.save(150, _state(150.0)).deleted_steps == (100,)  # 150 is the one kept, and good
        assert ckpt.steps() == [150, 200, 300]
        # training reaches step 200 again: the new step 200 replaces the rotten one and is
        # known good, so it counts again (and 150 is now the one beyond keep_last=1)
        with pytest.warns(UserWarning, match="replacing an existing committed step 200"):
            assert ckpt.save(200, _state(200.0)).deleted_steps == (150,)
        assert ckpt.steps() == [200, 300]
    with Checkpointer(root, options=opts) as ckpt:
        assert _restore(ckpt) == (200, 200.0)


def test_lazy_saves_after_resuming_past_rotten_steps_keep_the_step_resumed_from(root):
    _save_steps(root, (10, 20, 30))
    rot(root, 20)
    rot(root, 30)
    opts = CheckpointOptions(retention=RetentionPolicy(keep_last=1))
    with Checkpointer(root, options=opts) as ckpt:
        assert _restore(ckpt)[0] == 10
        ckpt.save_async(15, _state(15.0))
        assert ckpt.wait(60)
        assert ckpt.steps() == [15, 20, 30]
    with Checkpointer(root, options=opts) as ckpt:
        assert _restore(ckpt) == (15, 15.0)


@pytest.mark.parametrize(
    "steps,good,bad,delete_bad,kept",
    [
        ([1, 2, 3], [], [], False, [3]),  # nothing known: the newest is kept
        ([100, 200, 300], [100], [200, 300], False, [100, 200, 300]),
        ([100, 200, 300], [100], [200, 300], True, [100]),
        ([100, 150, 200, 300], [150], [200, 300], True, [150]),
        ([1, 2, 3, 4], [1], [], False, [1, 4]),  # a known-good step survives the policy
        ([1, 2, 3], [3], [3], True, [2]),  # known bad wins: never the protected step
        ([1, 2, 3], [], [3], False, [2, 3]),  # the newest step not known bad is kept
    ],
)
def test_decide_retention(steps, good, bad, delete_bad, kept):
    decisions = decide_retention(steps, RetentionPolicy(keep_last=1), good=good, bad=bad, delete_bad=delete_bad)
    assert [d.step for d in decisions] == sorted(steps, reverse=True)
    assert sorted(d.step for d in decisions if d.keep) == kept
    assert {d.step for d in decisions if d.damaged} == set(bad)


class _Gate:
    """A real FaultInjector whose ``after_data`` of one step waits for a gate: a save in flight."""

    def __init__(self, step: int) -> None:
        self.inner = FaultInjector()
        self.step = step
        self.gate = threading.Event()
        self.entered = threading.Event()

    def reached(self, phase, *, step=None, rank=None):
        if phase == "after_data" and step == self.step:
            self.entered.set()
            assert self.gate.wait(60)
        self.inner.reached(phase, step=step, rank=rank)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_opening_a_root_without_the_lock_leaves_a_live_trainers_saves_alone(root):
    gate = _Gate(step=2)
    with Checkpointer(root, faults=gate) as trainer:
        trainer.save(1, _state(1.0))
        handle = trainer.save_async(2, _state(2.0))
        try:
            assert gate.entered.wait(60)  # step 2's segment is written, its manifest is not
            in_flight = sorted(n for n in os.listdir(root) if n.startswith(".tmp-"))
            assert in_flight
            reader = Checkpointer(root, options=CheckpointOptions(lock=False))
            try:
                assert sorted(n for n in os.listdir(root) if n.startswith(".tmp-")) == in_flight
                target = _state(0.0)
                assert reader.restore(target) == 1
            finally:
                reader.close()
        finally:
            gate.gate.set()
        assert handle.wait(60)  # the trainer's save still commits
        assert trainer.steps() == [1, 2]


def test_the_lock_holder_still_clears_leftovers_of_interrupted_saves(root):
    _save_steps(root, (1,))
    os.makedirs(os.path.join(root, ".tmp-step-000000002-deadbeef"))
    with Checkpointer(root, options=CheckpointOptions(lock=False)):
        assert ".tmp-step-000000002-deadbeef" in os.listdir(root)  # not the lock holder: hands off
    with Checkpointer(root):
        assert ".tmp-step-000000002-deadbeef" not in os.listdir(root)
