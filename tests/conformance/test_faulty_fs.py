"""FaultyFS intercepts every file-system operation there is, and its faults are the ones
users hit: ENOSPC and EIO on a write, a failed fsync, a read-only file system."""

from __future__ import annotations

import errno
import os

import pytest

from recoverkit.storage.faults import (
    CHANGE_OPS,
    READ_OPS,
    FaultInjector,
    FaultyFS,
    fs_operations,
    intercepted,
)
from recoverkit.storage.fs import LocalFS


def _calls(d: str) -> dict:
    """One real call of every LocalFS operation, on files under ``d`` (name -> thunk maker)."""
    f = os.path.join(d, "f")
    return {
        "makedirs": lambda fs: fs.makedirs(os.path.join(d, "a", "b")),
        "mkdir": lambda fs: fs.mkdir(os.path.join(d, "m")),
        "write_file": lambda fs: fs.write_file(f, b"data"),
        "read_file": lambda fs: fs.read_file(f),
        "rename": lambda fs: fs.rename(f, f + "2"),
        "replace": lambda fs: fs.replace(f, f + "3"),
        "fsync_dir": lambda fs: fs.fsync_dir(d),
        "listdir": lambda fs: fs.listdir(d),
        "size": lambda fs: fs.size(f),
        "is_file": lambda fs: fs.is_file(f),
        "is_dir": lambda fs: fs.is_dir(d),
        "exists": lambda fs: fs.exists(f),
        "remove": lambda fs: fs.remove(f),
        "remove_tree": lambda fs: fs.remove_tree(os.path.join(d, "a")),
        "check_writable": lambda fs: fs.check_writable(d),
        "write_segment": lambda fs: fs.write_segment(os.path.join(d, "seg"), []),
        "read_segment": lambda fs: fs.read_segment(f, []),
    }


def test_every_public_localfs_operation_is_intercepted(tmp_path):
    """Generated from the class: an operation added to LocalFS is intercepted without an
    edit here; this list of sample calls is what must grow with it."""
    ops = fs_operations(LocalFS)
    assert set(intercepted(FaultyFS)) == set(ops)
    for name in ops:
        assert name in vars(FaultyFS), (
            f"FaultyFS.{name} would fall through to LocalFS unintercepted"
        )
    calls = _calls(str(tmp_path))
    assert set(calls) == set(ops), "add a sample call of the new LocalFS operation to _calls"
    for name in ops:
        faults = FaultInjector().fail_at(op=name, error=OSError(errno.EIO, f"injected at {name}"))
        fs = FaultyFS(faults)
        LocalFS().write_file(str(tmp_path / "f"), b"data")
        with pytest.raises(OSError, match=f"injected at {name}"):
            calls[name](fs)
        assert faults.fired == 1 and faults.ops[name] == 1, name


def test_every_operation_is_classified_for_a_read_only_file_system():
    unclassified = set(fs_operations()) - READ_OPS - CHANGE_OPS - {"fsync_dir"}
    assert not unclassified, (
        f"say whether {sorted(unclassified)} change anything (faults.READ_OPS / CHANGE_OPS)"
    )


def test_read_only_refuses_every_change_and_allows_every_read(tmp_path):
    d = str(tmp_path)
    LocalFS().write_file(os.path.join(d, "f"), b"data")
    faults = FaultInjector().read_only()
    fs = FaultyFS(faults)
    for name, call in _calls(d).items():
        if name in CHANGE_OPS:
            with pytest.raises(OSError) as info:
                call(fs)
            assert info.value.errno == errno.EROFS, name
        else:
            call(fs)  # reads (and a directory fsync) go through
    assert sorted(os.listdir(d)) == ["f"]  # nothing changed


def test_no_space_on_a_write_leaves_no_file_claimed_written(tmp_path):
    faults = FaultInjector().no_space()
    path = str(tmp_path / "f")
    with pytest.raises(OSError) as info:
        FaultyFS(faults).write_file(path, b"data")
    assert info.value.errno == errno.ENOSPC and not os.path.exists(path)
    FaultyFS(faults).write_file(path, b"data")  # once only
    assert faults.fired == 1


def test_a_failed_fsync_is_raised_after_the_write_ran(tmp_path):
    """The bytes reached the file (the page cache), but the call reports EIO: the caller must
    treat the write as failed, exactly as a failed fsync."""
    faults = FaultInjector().fsync_fails()
    path = str(tmp_path / "f")
    with pytest.raises(OSError) as info:
        FaultyFS(faults).write_file(path, b"data")
    assert info.value.errno == errno.EIO and open(path, "rb").read() == b"data"
    with pytest.raises(OSError):
        FaultyFS(faults).fsync_dir(str(tmp_path))
    assert faults.fired == 2


def test_composite_operations_have_their_parts_intercepted(tmp_path):
    """check_writable writes and removes a probe: a write fault strikes inside it."""
    faults = FaultInjector().fail_at(op="write_file", error=OSError(errno.EROFS, "read-only"))
    with pytest.raises(OSError, match="read-only"):
        FaultyFS(faults).check_writable(str(tmp_path))
    assert faults.ops["check_writable"] == 1 and faults.ops["write_file"] == 1


def test_attributes_of_the_inner_file_system_show_through():
    class Tagged(LocalFS):
        tag = "inner"

    fs = FaultyFS(FaultInjector(), Tagged())
    assert fs.tag == "inner"


def test_arming_mistakes_are_refused():
    with pytest.raises(ValueError, match="unknown phase"):
        FaultInjector().fail_at(phase="after_everything")
    with pytest.raises(ValueError, match="exactly one"):
        FaultInjector().fail_at(phase="after_data", op="rename")
    with pytest.raises(ValueError, match="op= only"):
        FaultInjector().kill_at(phase="after_data", when="after")
    with pytest.raises(ValueError, match="'before' or 'after'"):
        FaultInjector().fail_at(op="rename", when="during")
