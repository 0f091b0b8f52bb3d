"""Faults during a save never damage committed steps or leave a partial step selectable."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from recoverkit import Checkpointer, CommitError
from recoverkit.storage.faults import PHASES, FaultInjector, FaultyFS


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(32, 32)


def _tmp_leftovers(root):
    return [n for n in os.listdir(root) if n.startswith(".tmp")]


@pytest.mark.parametrize(
    "op,err",
    [
        ("write_segment", OSError(errno.ENOSPC, "No space left on device")),
        ("write_segment", OSError(errno.EIO, "Input/output error")),
        ("write_file", OSError(errno.ENOSPC, "No space left on device")),
        ("fsync_dir", OSError(errno.EIO, "Input/output error")),
        ("rename", OSError(errno.EXDEV, "rename failed")),
    ],
)
def test_storage_error_fails_commit_and_keeps_previous(root, op, err):
    faults = FaultInjector()
    with Checkpointer(root, fs=FaultyFS(faults), faults=faults) as ckpt:
        ckpt.save(1, {"model": _model(1)})
        faults.fail_at(op=op, error=err)
        with pytest.raises(CommitError, match=os.strerror(err.errno) if op != "rename" else "rename") as info:
            ckpt.save(2, {"model": _model(2)})
        assert info.value.step == 2 and isinstance(info.value.__cause__, OSError)
        assert faults.fired == 1
        assert ckpt.steps() == [1] and ckpt.latest() == 1
        assert _tmp_leftovers(root) == []
        target = {"model": _model(3)}
        assert ckpt.restore(target) == 1
        assert torch.equal(target["model"].weight, _model(1).weight)
        ckpt.save(3, {"model": _model(3)})  # training goes on: the next save works
        assert ckpt.steps() == [1, 3]


@pytest.mark.parametrize("phase", [p for p in PHASES if p not in ("after_rename", "after_latest", "retention")])
def test_error_at_each_precommit_phase_aborts(root, phase):
    faults = FaultInjector()
    with Checkpointer(root, faults=faults) as ckpt:
        ckpt.save(1, {"x": torch.ones(3)})
        faults.fail_at(phase=phase, step=2)
        with pytest.raises(CommitError):
            ckpt.save(2, {"x": torch.zeros(3)})
        assert faults.fired == 1
        assert ckpt.steps() == [1]
        assert _tmp_leftovers(root) == []


_CHILD = textwrap.dedent(
    """
    import sys, torch
    from recoverkit import Checkpointer
    from recoverkit.storage.faults import FaultInjector
    root, phase = sys.argv[1], sys.argv[2]
    faults = FaultInjector().kill_at(phase=phase, step=2)
    ckpt = Checkpointer(root, faults=faults)
    ckpt.save(1, {"x": torch.full((1000,), 1.0)})
    ckpt.save(2, {"x": torch.full((1000,), 2.0)})
    print("survived")
    """
)


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_every_phase_leaves_a_valid_committed_step(root, phase):
    proc = subprocess.run([sys.executable, "-c", _CHILD, root, phase], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    committed_new = phase in ("after_rename", "after_latest", "retention")
    target = {"x": torch.zeros(1000)}
    with Checkpointer(root) as ckpt:  # takes over the dead writer's lock and cleans up
        step = ckpt.restore(target)
        assert step == (2 if committed_new else 1)
        assert torch.equal(target["x"], torch.full((1000,), float(step)))
        assert ckpt.steps() == ([1, 2] if committed_new else [1])
    assert _tmp_leftovers(root) == []
