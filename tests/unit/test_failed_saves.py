"""A failed async save never looks successful: ``wait()`` and ``close()`` raise a CommitError
naming each failed step, every failure is logged exactly once, and restore never offers a
step that no tier committed (not even from the host snapshot kept in memory)."""

from __future__ import annotations

import errno
import logging
import threading

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions, CommitError
from recoverkit.config import TierPolicy
from recoverkit.storage.faults import FaultInjector, FaultyFS

HOST_AND_LOCAL = CheckpointOptions(tiers=TierPolicy(local_every=1, host_keep=1))

# a full disk while writing the segment; no permission to create the step's directory
FAULTS = {
    "enospc": dict(op="write_segment", error=OSError(errno.ENOSPC, "No space left on device")),
    "eacces": dict(op="makedirs", path_contains=".tmp-step-000000002", error=PermissionError(errno.EACCES, "Permission denied")),
}


def _state(value: float) -> dict:
    return {"w": torch.full((4096,), value)}


def _failures_logged(caplog, step: int) -> int:
    return sum(r.name == "recoverkit" and r.levelno == logging.ERROR and f"step {step} was not saved" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_wait_raises_logs_once_and_restore_skips_the_undurable_step(root, caplog, fault):
    faults = FaultInjector()
    with caplog.at_level(logging.ERROR, logger="recoverkit"):
        with Checkpointer(root, options=HOST_AND_LOCAL, fs=FaultyFS(faults), faults=faults) as ckpt:
            ckpt.save_async(1, _state(1.0))
            assert ckpt.wait(60)
            faults.fail_at(**FAULTS[fault])
            handle = ckpt.save_async(2, _state(2.0))
            with pytest.raises(CommitError, match="step 2") as info:
                ckpt.wait(60)
            assert faults.fired == 1 and handle.error is info.value
            assert info.value.step == 2
            assert ckpt.wait(60)  # reported once: the next wait is clean
            target = _state(0.0)
            assert ckpt.restore(target) == 1  # not the host snapshot of step 2
            assert torch.equal(target["w"], _state(1.0)["w"])
            assert ckpt.latest() == 1
        # closing has nothing left to report
    assert _failures_logged(caplog, 2) == 1
    with Checkpointer(root) as again:
        assert again.steps() == [1]


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_restore_never_offers_a_step_whose_save_failed(root, fault):
    faults = FaultInjector()
    with Checkpointer(root, options=HOST_AND_LOCAL, fs=FaultyFS(faults), faults=faults) as ckpt:
        ckpt.save(1, _state(1.0))
        faults.fail_at(**FAULTS[fault])
        handle = ckpt.save_async(2, _state(2.0))
        assert handle.committed.wait(60) and handle.error is not None
        target = _state(0.0)
        assert ckpt.restore(target) == 1  # the host snapshot of step 2 is not offered
        assert torch.equal(target["w"], _state(1.0)["w"])
        assert ckpt.latest() == 1
        ckpt.take_failed_saves()


def test_close_raises_for_failed_saves_and_still_releases_the_lock(root, caplog):
    faults = FaultInjector()
    ckpt = Checkpointer(root, options=HOST_AND_LOCAL, fs=FaultyFS(faults), faults=faults)
    ckpt.save(1, _state(1.0))
    faults.fail_at(op="write_segment", error=OSError(errno.ENOSPC, "No space left on device"), times=2)
    ckpt.save_async(2, _state(2.0))
    assert ckpt.settle(60)  # waits without reporting
    ckpt.save_async(3, _state(3.0))
    with caplog.at_level(logging.ERROR, logger="recoverkit"):
        with pytest.raises(CommitError, match="steps 2, 3") as info:
            ckpt.close()
    assert "No space left on device" in str(info.value)
    assert _failures_logged(caplog, 2) == 1 and _failures_logged(caplog, 3) == 1
    with Checkpointer(root) as again:  # the run lock was released all the same
        assert again.steps() == [1]
        assert again.restore(_state(0.0)) == 1


def test_take_failed_saves_reports_each_failure_once(root):
    faults = FaultInjector()
    with Checkpointer(root, options=HOST_AND_LOCAL, fs=FaultyFS(faults), faults=faults) as ckpt:
        faults.fail_at(op="write_segment")
        ckpt.save_async(1, _state(1.0))
        assert ckpt.settle(60)
        taken = ckpt.take_failed_saves()
        assert [s for s, _ in taken] == [1] and isinstance(taken[0][1], CommitError)
        assert ckpt.take_failed_saves() == []
        assert ckpt.wait(60)  # already reported


def test_a_failure_raised_by_its_own_handle_is_not_raised_again(root):
    faults = FaultInjector()
    with Checkpointer(root, options=HOST_AND_LOCAL, fs=FaultyFS(faults), faults=faults) as ckpt:
        faults.fail_at(op="write_segment")
        handle = ckpt.save_async(1, _state(1.0))
        with pytest.raises(CommitError):
            handle.wait(60)
        assert ckpt.wait(60)


def test_an_exception_leaving_the_with_block_is_not_masked_by_failed_saves(root):
    faults = FaultInjector()
    with pytest.raises(KeyError, match="the user's own error"):
        with Checkpointer(root, options=HOST_AND_LOCAL, fs=FaultyFS(faults), faults=faults) as ckpt:
            faults.fail_at(op="write_segment")
            ckpt.save_async(1, _state(1.0))
            ckpt.settle(60)
            raise KeyError("the user's own error")
    with Checkpointer(root) as again:  # closed and unlocked
        assert again.steps() == []


def test_a_blocking_save_is_not_failed_by_an_earlier_async_failure(root):
    faults = FaultInjector()
    with Checkpointer(root, options=HOST_AND_LOCAL, fs=FaultyFS(faults), faults=faults) as ckpt:
        faults.fail_at(op="write_segment")
        ckpt.save_async(1, _state(1.0))
        ckpt.save(2, _state(2.0))  # commits; the async failure waits for its report
        with pytest.raises(CommitError, match="step 1"):
            ckpt.wait(60)
        assert ckpt.steps() == [2]


class _GatedFaults:
    """A real FaultInjector whose first data write waits for a gate (a slow disk)."""

    def __init__(self) -> None:
        self.inner = FaultInjector()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def reached(self, phase, *, step=None, rank=None):
        if phase == "before_data" and step == 1:
            self.entered.set()
            assert self.gate.wait(60)
        self.inner.reached(phase, step=step, rank=rank)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_saves_superseded_by_a_failed_save_fail_with_it_and_are_not_restored(root, caplog):
    # steps 2..4 queue behind a slow write of step 1; step 5 supersedes them on disk and fails
    faults = _GatedFaults()
    fs = FaultyFS(faults.inner)
    opts = CheckpointOptions(tiers=TierPolicy(local_every=1, host_keep=3))
    with caplog.at_level(logging.ERROR, logger="recoverkit"):
        with Checkpointer(root, options=opts, fs=fs, faults=faults) as ckpt:
            x = _state(1.0)
            handles = [ckpt.save_async(1, x)]
            assert faults.entered.wait(60)
            faults.inner.fail_at(op="write_segment", path_contains="step-000000005")
            for step in range(2, 6):
                x["w"].fill_(float(step))
                handles.append(ckpt.save_async(step, x))
            faults.gate.set()
            assert all(h.committed.wait(60) for h in handles)
            assert handles[0].error is None and all(h.error is not None for h in handles[1:])
            target = _state(0.0)
            assert ckpt.restore(target) == 1  # no snapshot of 2..5 is offered from memory
            assert torch.equal(target["w"], torch.full((4096,), 1.0))
            with pytest.raises(CommitError, match="steps 2, 3, 4, 5"):
                ckpt.wait(60)
    assert [_failures_logged(caplog, s) for s in range(2, 6)] == [1, 1, 1, 1]


def test_a_host_only_save_that_succeeded_is_still_restored_from_memory(root):
    opts = CheckpointOptions(tiers=TierPolicy(local_every=0, host_keep=1))
    with Checkpointer(root, options=opts) as ckpt:
        ckpt.save_async(1, _state(1.0))
        assert ckpt.wait(60)
        target = _state(0.0)
        assert ckpt.restore(target) == 1
        assert torch.equal(target["w"], _state(1.0)["w"])


def test_protect_lists_a_failed_final_save_and_leaves_the_loop_cleanly(root, caplog):
    import recoverkit

    faults = FaultInjector()
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(root, options=HOST_AND_LOCAL, fs=FaultyFS(faults), faults=faults)
    with caplog.at_level(logging.ERROR, logger="recoverkit"):
        with recoverkit.protect(root, model=model, optimizer=opt, loader=range(4), save_every=2, checkpointer=ckpt,
                               on_failed_saves="warn") as run:
            for _ in run:
                model(torch.ones(1, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
                if run.step + 1 == 4:  # the save at the end of this last step fails
                    assert ckpt.wait(60)
                    faults.fail_at(op="write_segment")
    assert run.step == 4
    assert [s for s, _ in run.failed_saves] == [4]
    assert _failures_logged(caplog, 4) == 1
    with Checkpointer(root) as again:
        assert again.steps() == [2]
