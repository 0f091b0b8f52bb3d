"""File-system safety of the local tier: no symlink followed, no special file blocks, no
planted file truncated (DESIGN invariants 8 and 10).

Planted things are real: symlinks to a victim file or directory outside the root, FIFOs
made with ``os.mkfifo``, a character device (``/dev/null``), hard links. Every call that
could block on a FIFO runs in :func:`bounded`, which wakes a blocked open after a generous
bound and fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions
from recoverkit.errors import IntegrityError, StorageError
from recoverkit.format.manifest import MANIFEST_NAME
from recoverkit.storage.faults import FaultInjector, FaultyFS
from recoverkit.storage.fs import DEFAULT_MAX_READ_BYTES, LocalFS
from recoverkit.storage.local import LocalTier
from recoverkit.storage.lock import RunLock, probe_holder
from tests.cli.helpers import assert_user_error, cli

VICTIM_BYTES = b"precious bytes that are not recoverkit's\n" * 64


def bounded(fn: Callable[[], Any], *fifos: str, bound_s: float = 60.0) -> Any:
    """``fn()``, failing the test if it is still blocked after ``bound_s`` (then each FIFO
    gets a reader and a writer, so an open blocked on it returns and the thread ends)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound_s)
    if t.is_alive():
        for f in fifos:
            try:
                r = os.open(f, os.O_RDONLY | os.O_NONBLOCK)
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
                os.close(r)
            except OSError:
                pass
        t.join(bound_s)
        pytest.fail(f"blocked on a FIFO: {', '.join(fifos)}")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def victim(tmp_path):
    """A file outside any checkpoint root that nothing may change."""
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM_BYTES)
    return str(path)


@pytest.fixture
def victim_dir(tmp_path):
    """A directory outside any checkpoint root that nothing may delete or change."""
    d = tmp_path / "victim_dir"
    d.mkdir()
    (d / "keep.txt").write_bytes(VICTIM_BYTES)
    return str(d)


def assert_intact(victim: str) -> None:
    with open(victim, "rb") as f:
        assert f.read() == VICTIM_BYTES


def assert_dir_intact(victim_dir: str) -> None:
    assert sorted(os.listdir(victim_dir)) == ["keep.txt"]
    assert_intact(os.path.join(victim_dir, "keep.txt"))


def saved_root(root: str, steps: tuple[int, ...] = (1, 2)) -> str:
    with Checkpointer(root) as ckpt:
        for s in steps:
            ckpt.save(s, {"x": torch.full((8,), float(s))})
    return root


# --------------------------------------------------------------------------- read_file
def test_read_file_refuses_a_fifo_without_blocking(tmp_path):
    fifo = str(tmp_path / MANIFEST_NAME)
    os.mkfifo(fifo)
    with pytest.raises(IntegrityError, match="a FIFO") as e:
        bounded(lambda: LocalFS().read_file(fifo), fifo)
    assert fifo in str(e.value) and e.value.path == fifo


def test_read_file_refuses_a_symlink_and_never_reads_its_target(tmp_path, victim):
    link = str(tmp_path / MANIFEST_NAME)
    os.symlink(victim, link)
    with pytest.raises(IntegrityError, match="a symbolic link"):
        LocalFS().read_file(link)


@pytest.mark.parametrize("kind,make", [
    ("a directory", lambda p: os.mkdir(p)),
    ("a character device", lambda p: None),
])
def test_read_file_refuses_directories_and_devices(tmp_path, kind, make):
    path = "/dev/null" if kind == "a character device" else str(tmp_path / "d")
    make(path)
    with pytest.raises(IntegrityError, match=kind):
        LocalFS().read_file(path)


def test_read_file_refuses_files_over_its_limit_before_reading(tmp_path):
    small = tmp_path / "small"
    small.write_bytes(b"x" * 100)
    assert LocalFS().read_file(str(small), max_bytes=100) == b"x" * 100
    with pytest.raises(IntegrityError, match="100 bytes, more than the 99"):
        LocalFS().read_file(str(small), max_bytes=99)
    # a sparse "manifest" past the default limit is refused from its size alone (no 1 GiB read)
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(DEFAULT_MAX_READ_BYTES + 1)
    with pytest.raises(IntegrityError, match=f"more than the {DEFAULT_MAX_READ_BYTES} bytes"):
        LocalFS().read_file(str(huge))
    with pytest.raises(FileNotFoundError):
        LocalFS().read_file(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- size / is_dir / is_file
def test_size_does_not_follow_symlinks_and_refuses_special_files(tmp_path, victim):
    fs = LocalFS()
    regular = tmp_path / "f"
    regular.write_bytes(b"abc")
    link = str(tmp_path / "link")
    os.symlink(victim, link)
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    assert fs.size(str(regular)) == 3
    assert fs.size(str(tmp_path / "missing")) is None
    assert fs.size(str(regular / "below-a-file")) is None
    with pytest.raises(IntegrityError, match="a symbolic link"):
        fs.size(link)
    with pytest.raises(IntegrityError, match="a FIFO"):
        fs.size(fifo)
    with pytest.raises(IntegrityError, match="a directory"):
        fs.size(str(tmp_path))
    assert fs.is_file(str(regular)) and not fs.is_file(link) and not fs.is_file(fifo)


def test_is_dir_does_not_follow_symlinks_unless_asked(tmp_path, victim_dir):
    fs = LocalFS()
    link = str(tmp_path / "link")
    os.symlink(victim_dir, link)
    assert fs.is_dir(victim_dir)
    assert not fs.is_dir(link)
    assert fs.is_dir(link, follow_symlinks=True)  # for a root the user made a symlink
    os.symlink(str(tmp_path / "nowhere"), str(tmp_path / "dangling"))
    assert fs.exists(str(tmp_path / "dangling"))


# --------------------------------------------------------------------------- discovery
def test_steps_lists_only_real_step_directories_with_a_regular_manifest(root, tmp_path, victim):
    saved_root(root, (1,))
    real = os.path.join(root, "step-000000001")
    # step 2: a symlink to a real, complete step directory outside the root
    outside = str(tmp_path / "outside")
    saved_root(outside, (2,))
    os.symlink(os.path.join(outside, "step-000000002"), os.path.join(root, "step-000000002"))
    # step 3: its manifest is a FIFO; step 4: its manifest a symlink to a real manifest
    for step in (3, 4):
        os.mkdir(os.path.join(root, f"step-{step:09d}"))
    fifo = os.path.join(root, "step-000000003", MANIFEST_NAME)
    os.mkfifo(fifo)
    os.symlink(os.path.join(real, MANIFEST_NAME), os.path.join(root, "step-000000004", MANIFEST_NAME))
    # step 5: a file named like a step
    with open(os.path.join(root, "step-000000005"), "wb") as f:
        f.write(VICTIM_BYTES)
    assert bounded(lambda: LocalTier(root).steps(), fifo) == [1]


def test_latest_hint_never_blocks_on_or_follows_latest(root, tmp_path, victim):
    saved_root(root, (1,))
    latest = os.path.join(root, "latest")
    tier = LocalTier(root)
    assert tier.latest_hint() == 1
    os.remove(latest)
    os.mkfifo(latest)
    assert bounded(tier.latest_hint, latest) is None
    os.remove(latest)
    target = tmp_path / "elsewhere"
    target.write_text("step-000000001\n")
    os.symlink(str(target), latest)
    assert tier.latest_hint() is None
    os.remove(latest)
    with open(latest, "wb") as f:
        f.truncate(1 << 20)  # far longer than any step name: not read
    assert tier.latest_hint() is None


def test_a_fifo_manifest_is_a_fault_not_a_hang(root):
    saved_root(root, (1,))
    path = os.path.join(root, "step-000000001", MANIFEST_NAME)
    os.remove(path)
    os.mkfifo(path)
    with pytest.raises(IntegrityError, match="a FIFO"):
        bounded(lambda: LocalTier(root).manifest(1), path)


def test_a_symlinked_segment_file_is_a_fault_not_read(root, tmp_path):
    saved_root(root, (1,))
    seg = os.path.join(root, "step-000000001", "rank-00000.seg")
    copy = str(tmp_path / "copy.seg")
    os.rename(seg, copy)  # the same bytes, CRCs matching, outside the root
    os.symlink(copy, seg)
    with pytest.raises(IntegrityError, match="a symbolic link"):
        LocalTier(root).manifest(1)


def test_startup_and_restore_skip_planted_fifos(root):
    """A FIFO in place of the newest manifest and of `latest`: the writer starts, the good
    older step is restored, nothing blocks."""
    saved_root(root, (1, 2))
    manifest = os.path.join(root, "step-000000002", MANIFEST_NAME)
    latest = os.path.join(root, "latest")
    for p in (manifest, latest):
        os.remove(p)
        os.mkfifo(p)

    def start_and_restore() -> tuple[int, torch.Tensor]:
        state = {"x": torch.zeros(8)}
        with Checkpointer(root) as ckpt:
            return ckpt.restore(state), state["x"]

    step, x = bounded(start_and_restore, manifest, latest)
    assert step == 1 and torch.equal(x, torch.full((8,), 1.0))


# --------------------------------------------------------------------------- writes
def test_write_file_never_writes_through_a_symlink(tmp_path, victim):
    link = str(tmp_path / "out")
    os.symlink(victim, link)
    with pytest.raises(StorageError, match="a symbolic link"):
        LocalFS().write_file(link, b"overwritten")
    with pytest.raises(FileExistsError):
        LocalFS().write_file(link, b"overwritten", new=True)
    assert_intact(victim)


def test_write_file_never_truncates_a_hard_linked_file(tmp_path, victim):
    link = str(tmp_path / "out")
    os.link(victim, link)
    with pytest.raises(StorageError, match="2 hard links"):
        LocalFS().write_file(link, b"overwritten")
    assert_intact(victim)


def test_write_file_into_a_fifo_neither_blocks_nor_writes(tmp_path):
    fifo = str(tmp_path / "out")
    os.mkfifo(fifo)
    with pytest.raises(StorageError, match="a FIFO"):
        bounded(lambda: LocalFS().write_file(fifo, b"x"), fifo)


def test_write_file_rewrites_its_own_files(tmp_path):
    path = str(tmp_path / "out")
    fs = LocalFS()
    fs.write_file(path, b"first, longer")
    fs.write_file(path, b"second")
    assert fs.read_file(path) == b"second"


def test_check_writable_probe_cannot_be_planted(tmp_path, victim):
    # the old probe name was predictable (.probe-<pid>) and was written through a symlink
    os.symlink(victim, str(tmp_path / f".probe-{os.getpid()}"))
    LocalFS().check_writable(str(tmp_path))
    assert_intact(victim)
    assert sorted(os.listdir(tmp_path)) == sorted([f".probe-{os.getpid()}", "victim.txt"])


def test_commit_replaces_a_planted_latest_symlink_not_its_target(root, victim):
    os.makedirs(root)
    os.symlink(victim, os.path.join(root, "latest"))
    saved_root(root, (1,))
    assert not os.path.islink(os.path.join(root, "latest"))
    assert LocalTier(root).latest_hint() == 1
    assert_intact(victim)


# --------------------------------------------------------------------------- the run lock
@pytest.mark.parametrize("plant", ["symlink", "dangling", "fifo", "directory", "hardlink"])
def test_run_lock_refuses_a_non_regular_lock_file(root, tmp_path, victim, plant):
    os.makedirs(root)
    lock = os.path.join(root, ".lock")
    if plant == "symlink":
        os.symlink(victim, lock)
    elif plant == "dangling":
        os.symlink(str(tmp_path / "would-be-created"), lock)
    elif plant == "fifo":
        os.mkfifo(lock)
    elif plant == "directory":
        os.mkdir(lock)
    else:
        os.link(victim, lock)
    with pytest.raises(StorageError, match=r"\.lock") as e:
        bounded(lambda: RunLock(root).acquire(), lock)
    assert "hard links" in str(e.value) if plant == "hardlink" else "not a regular file" in str(e.value)
    assert_intact(victim)
    assert not os.path.exists(tmp_path / "would-be-created")
    # the failed attempt left nothing registered: once the stray file is gone, the lock works
    os.remove(lock) if plant != "directory" else os.rmdir(lock)
    RunLock(root).acquire().release()


def test_checkpointer_refuses_a_planted_lock_symlink(root, victim):
    os.makedirs(root)
    os.symlink(victim, os.path.join(root, ".lock"))
    with pytest.raises(StorageError, match="symbolic link"):
        Checkpointer(root)
    assert_intact(victim)
    # with the lock turned off nothing opens .lock at all
    Checkpointer(root, options=CheckpointOptions(lock=False)).close()
    assert_intact(victim)


def test_probe_holder_never_blocks_follows_or_creates(root, tmp_path, victim):
    os.makedirs(root)
    lock = os.path.join(root, ".lock")
    assert probe_holder(root) is None and not os.path.lexists(lock)
    # POSIX locks never conflict within one process: the holder is another process
    code = "import sys,time; from recoverkit.storage.lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code, root], stdout=subprocess.PIPE, text=True)
    try:
        assert bounded(proc.stdout.readline) == "held\n"
        assert probe_holder(root) == f"pid {proc.pid} on {socket.gethostname()}"
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert probe_holder(root) is None
    os.remove(lock)
    os.mkfifo(lock)
    assert bounded(lambda: probe_holder(root), lock) is None
    os.remove(lock)
    os.symlink(victim, lock)
    assert probe_holder(root) is None
    assert_intact(victim)


def test_gc_with_a_planted_lock_symlink_leaves_the_victim(root, victim):
    saved_root(root, (1, 2, 3))
    os.remove(os.path.join(root, ".lock"))
    os.symlink(victim, os.path.join(root, ".lock"))
    p = cli("gc", root, "--keep-last", "1", "--yes")
    assert_user_error(p, 6, ".lock", "symbolic link")
    assert_intact(victim)
    assert LocalTier(root).steps() == [1, 2, 3]


def test_restore_to_a_dir_with_a_planted_lock_symlink_leaves_the_victim(root, tmp_path, victim):
    saved_root(root, (1,))
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, str(out / ".lock"))
    p = cli("restore", root, "--to", str(out), "--world-size", "2")
    assert_user_error(p, 6, ".lock", "symbolic link")
    assert_intact(victim)


# --------------------------------------------------------------------------- cleanup and deletes
def plant_leftovers(root: str, victim: str, victim_dir: str) -> list[str]:
    names = [".tmp-step-000000009-deadbeef", ".trash-step-000000001-cafef00d", ".tmp-latest-0badf00d",
             ".tmp-fifo", ".tmp-real"]
    os.symlink(victim_dir, os.path.join(root, names[0]))
    os.symlink(victim, os.path.join(root, names[1]))
    with open(os.path.join(root, names[2]), "wb") as f:
        f.write(b"step-000000009\n")
    os.mkfifo(os.path.join(root, names[3]))
    os.makedirs(os.path.join(root, names[4], "inner"))
    os.symlink(victim_dir, os.path.join(root, names[4], "inner", "link"))  # inside a real leftover
    return names


def test_cleanup_unlinks_leftover_symlinks_and_never_touches_their_targets(root, victim, victim_dir):
    saved_root(root, (1,))
    names = plant_leftovers(root, victim, victim_dir)
    assert sorted(LocalTier(root).cleanup()) == sorted(names)
    assert not any(os.path.lexists(os.path.join(root, n)) for n in names)
    assert_intact(victim)
    assert_dir_intact(victim_dir)


def test_startup_and_gc_survive_leftover_symlinks(root, victim, victim_dir):
    saved_root(root, (1, 2))
    plant_leftovers(root, victim, victim_dir)
    with Checkpointer(root) as ckpt:  # the start-up cleanup
        ckpt.save(3, {"x": torch.ones(8)})
    plant_leftovers(root, victim, victim_dir)
    p = cli("gc", root, "--keep-last", "1", "--yes")
    assert p.returncode == 0, p.stderr
    assert LocalTier(root).steps() == [3]
    assert not [n for n in os.listdir(root) if n.startswith((".tmp-", ".trash-"))]
    assert_intact(victim)
    assert_dir_intact(victim_dir)


def test_remove_tree_unlinks_a_symlink_and_removes_real_directories(tmp_path, victim, victim_dir):
    fs = LocalFS()
    link = str(tmp_path / "link")
    os.symlink(victim_dir, link)
    fs.remove_tree(link)
    assert not os.path.lexists(link)
    assert_dir_intact(victim_dir)
    real = tmp_path / "real" / "a"
    real.mkdir(parents=True)
    os.symlink(victim, str(real / "to-victim"))
    fs.remove_tree(str(tmp_path / "real"))
    assert not os.path.lexists(tmp_path / "real")
    assert_intact(victim)
    fs.remove_tree(str(tmp_path / "missing"))  # nothing there is fine


def test_deleting_a_step_planted_as_a_symlink_stays_in_the_root(root, victim_dir):
    saved_root(root, (1,))
    link = os.path.join(root, "step-000000007")
    os.symlink(victim_dir, link)
    LocalTier(root).delete(7)
    assert not os.path.lexists(link)
    assert_dir_intact(victim_dir)
    assert not [n for n in os.listdir(root) if n.startswith(".trash-")]


def test_commit_over_a_planted_step_symlink_stays_in_the_root(root, victim_dir):
    os.makedirs(root)
    os.symlink(victim_dir, os.path.join(root, "step-000000001"))
    with pytest.warns(UserWarning, match="replacing an existing committed step"):
        saved_root(root, (1,))
    assert not os.path.islink(os.path.join(root, "step-000000001"))
    assert LocalTier(root).steps() == [1]
    assert_dir_intact(victim_dir)


# --------------------------------------------------------------------------- FaultyFS covers the new calls
def test_faulty_fs_injects_at_read_file_mkdir_and_remove(root):
    saved_root(root, (1,))
    faults = (FaultInjector().fail_at(op="read_file", path_contains="latest")
              .fail_at(op="mkdir", path_contains=".tmp-step-000000002")
              .fail_at(op="remove", path_contains=".tmp-probe-"))
    tier = LocalTier(root, fs=FaultyFS(faults))
    assert tier.latest_hint() is None and faults.fired == 1
    assert tier.latest_hint() == 1  # fired once only
    with pytest.raises(OSError, match="injected EIO"):
        tier.prepare(2)
    with pytest.raises(OSError, match="injected EIO"):
        tier.fs.check_writable(root)  # the probe was written; removing it failed
    assert faults.fired == 3
    probes = [n for n in os.listdir(root) if n.startswith(".tmp-probe-")]
    assert len(probes) == 1 and tier.cleanup() == probes  # the start-up cleanup takes it
