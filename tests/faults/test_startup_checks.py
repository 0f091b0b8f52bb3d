"""Start-up checks: an unwritable root fails before step 1; faults found by the failure benchmarks.

* A read-only or otherwise unwritable checkpoint root (or ``file://`` persistent store) makes
  ``Checkpointer(...)`` and ``recoverkit.protect(...)`` raise ``StorageError`` (an ``OSError``
  with the errno) before the first training step, not at the first save.
* A foreign *file* named like a step directory does not break discovery.
* A failed ``latest`` update leaves no temporary file behind.
* Lazy saves that fail under ``protect()`` are reported (``run.failed_saves`` and the log) while
  training goes on.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import tempfile

import pytest
import torch

import recoverkit
from recoverkit import Checkpointer, CheckpointOptions, TierPolicy
from recoverkit.errors import StorageError
from recoverkit.storage.faults import FaultInjector, FaultyFS


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory holding a committed step that cannot be written: a read-only tmpfs."""
    if not _can_mount():
        pytest.skip("needs root to mount a read-only tmpfs (FaultyFS covers the rest)")
    d = tempfile.mkdtemp(dir=tmp_path)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", d], capture_output=True).returncode != 0:
        pytest.skip("mount is not permitted here")
    try:
        with Checkpointer(os.path.join(d, "ckpt")) as ckpt:
            ckpt.save(1, {"x": torch.ones(4)})
        assert subprocess.run(["mount", "-o", "remount,ro", d], capture_output=True).returncode == 0
        yield d
    finally:
        subprocess.run(["umount", "-l", d], capture_output=True)


def test_read_only_root_fails_at_construction(readonly_dir):
    root = os.path.join(readonly_dir, "ckpt")
    with pytest.raises(StorageError, match="not writable") as info:
        Checkpointer(root)
    assert info.value.errno == errno.EROFS and isinstance(info.value, OSError)


def test_read_only_root_fails_at_protect_entry_before_step_1(readonly_dir):
    model = torch.nn.Linear(4, 4)
    steps = []
    with pytest.raises(OSError, match="not writable"):
        with recoverkit.protect(os.path.join(readonly_dir, "ckpt"), model=model, loader=range(3), save_every=1) as run:
            for _ in run:
                steps.append(run.step)
    assert steps == []


def test_missing_root_on_read_only_fs_fails_at_construction(readonly_dir):
    with pytest.raises(StorageError) as info:
        Checkpointer(os.path.join(readonly_dir, "new", "ckpt"))
    assert info.value.errno == errno.EROFS


def test_unwritable_root_through_faulty_fs_fails_at_construction(tmp_path):
    faults = FaultInjector().fail_at(op="write_file", error=OSError(errno.EROFS, "Read-only file system"))
    with pytest.raises(StorageError, match="not writable") as info:
        Checkpointer(str(tmp_path / "ckpt"), fs=FaultyFS(faults), faults=faults)
    assert info.value.errno == errno.EROFS and faults.fired == 1


def test_unwritable_persistent_store_fails_at_construction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    opts = CheckpointOptions(tiers=TierPolicy(persistent_url=f"file://{blocker}/zarr", persistent_every=1))
    with pytest.raises(StorageError, match="persistent store"):
        Checkpointer(str(tmp_path / "ckpt"), options=opts)


def test_foreign_file_named_like_a_step_is_ignored(tmp_path):
    root = str(tmp_path / "ckpt")
    with Checkpointer(root) as ckpt:
        ckpt.save(1, {"x": torch.ones(4)})
    (tmp_path / "ckpt" / "step-000000007").write_text("a file, not a step directory")
    target = {"x": torch.zeros(4)}
    with Checkpointer(root) as ckpt:
        assert ckpt.steps() == [1]
        assert ckpt.restore(target) == 1
    assert torch.equal(target["x"], torch.ones(4))


def test_failed_latest_update_leaves_no_temporary_file(tmp_path):
    root = str(tmp_path / "ckpt")
    faults = FaultInjector()
    with Checkpointer(root, fs=FaultyFS(faults), faults=faults) as ckpt:
        ckpt.save(1, {"x": torch.ones(4)})
        faults.fail_at(op="replace", path_contains="latest")
        with pytest.warns(UserWarning, match="could not point it at step 2"):
            ckpt.save(2, {"x": torch.ones(4)})
        assert ckpt.steps() == [1, 2]  # committed; `latest` is only a hint
        assert [n for n in os.listdir(root) if n.startswith(".tmp-")] == []


def test_protect_reports_failed_lazy_saves_and_keeps_training(tmp_path, caplog):
    root = str(tmp_path / "ckpt")
    faults = FaultInjector()
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(root, fs=FaultyFS(faults), faults=faults)
    with caplog.at_level(logging.ERROR, logger="recoverkit"):
        with recoverkit.protect(root, model=model, optimizer=opt, loader=range(8), save_every=1, checkpointer=ckpt,
                               on_failed_saves="warn") as run:
            for _ in run:
                model(torch.ones(1, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
                if run.step + 1 == 3:
                    ckpt.wait()
                    faults.fail_at(op="write_segment", times=2)
    assert run.step == 8
    # the two failed writes fail those saves, and any queued save they had superseded with them
    failed = [s for s, _ in run.failed_saves]
    assert len(failed) >= 2 and min(failed) >= 3 and failed == sorted(set(failed)), failed
    assert all(isinstance(e, recoverkit.CommitError) for _, e in run.failed_saves)
    assert sum("was not saved" in r.getMessage() for r in caplog.records) == len(failed)
    with Checkpointer(root) as c:
        assert c.latest() == 8
