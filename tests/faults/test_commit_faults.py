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


_CHILD_OP = textwrap.dedent(
    """
    import sys, torch
    from recoverkit import Checkpointer
    from recoverkit.storage.faults import FaultInjector, FaultyFS
    root, op, when = sys.argv[1], sys.argv[2], sys.argv[3]
    faults = FaultInjector()
    ckpt = Checkpointer(root, fs=FaultyFS(faults), faults=faults)
    ckpt.save(1, {"x": torch.full((1000,), 1.0)})
    faults.kill_at(op=op, when=when)  # the next such call of step 2's save
    ckpt.save(2, {"x": torch.full((1000,), 2.0)})
    print("survived")
    """
)


@pytest.mark.parametrize(
    "op,when,committed",
    [
        ("write_segment", "before", False),
        ("write_segment", "after", False),  # data durable, no manifest
        ("write_file", "after", False),  # the manifest written, the step not renamed
        ("rename", "before", False),
        ("rename", "after", True),  # the commit point passed
        ("replace", "before", True),  # `latest` is only a hint
    ],
)
def test_sigkill_before_or_after_a_file_operation_leaves_whole_steps(root, op, when, committed):
    """A crash just before or just after any one call (FaultyFS intercepts every one)."""
    proc = subprocess.run([sys.executable, "-c", _CHILD_OP, root, op, when], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    target = {"x": torch.zeros(1000)}
    with Checkpointer(root) as ckpt:
        step = ckpt.restore(target)
        assert step == (2 if committed else 1) and ckpt.steps() == ([1, 2] if committed else [1])
        assert torch.equal(target["x"], torch.full((1000,), float(step)))
        ckpt.save(3, {"x": torch.full((1000,), 3.0)})
        assert ckpt.latest() == 3
    assert _tmp_leftovers(root) == []


@pytest.mark.parametrize(
    "arm,message",
    [
        (lambda f: f.no_space(path_contains="step-000000002/w"), "No space left"),  # creating an array
        (lambda f: f.io_error(op="kv_write", path_contains="blobs/rank-00000"), "Input/output error"),  # a rank's data
        (lambda f: f.fsync_fails(path_contains="step-000000002"), "fsync"),
        (lambda f: f.fail_at(op="kv_write", path_contains="manifest", error=OSError(errno.EIO, "manifest write")), "manifest write"),
    ],
    ids=["enospc", "eio", "fsync", "manifest"],
)
def test_zarr_storage_error_fails_commit_and_keeps_previous(tmp_path, arm, message):
    """The persistent tier through its store's I/O seam: the same faults, the same outcome."""
    from recoverkit.distributed.coordinator import LocalCoordinator
    from recoverkit.storage.zarr_tier import ZarrTier
    from tests.conformance.kit import bits, save_step, state_for

    faults = FaultInjector()
    where = str(tmp_path / "zarr")
    tier = ZarrTier("file://" + where, faults=faults, fs=FaultyFS(faults))
    coordinator = LocalCoordinator()
    save_step(tier, coordinator, 1, state_for(1), faults, seq=1)
    arm(faults)
    with pytest.raises(CommitError) as info:
        save_step(tier, coordinator, 2, state_for(2), faults, seq=2)
    assert message in str(info.value) and faults.fired >= 1
    fresh = ZarrTier("file://" + where)
    assert fresh.steps() == [1]
    assert "step-000000002" not in os.listdir(where)  # aborted: nothing of it left
    faults.disarm()
    save_step(tier, coordinator, 3, state_for(3), faults, seq=3)
    from recoverkit.reading import CheckpointReader

    tree = CheckpointReader(tiers=[ZarrTier("file://" + where)], restore_rng=False).read()
    assert tree.step == 3 and bits(dict(tree)) == bits(state_for(3))
