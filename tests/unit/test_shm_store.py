"""Shared-memory slots: double buffering, torn slots, pins, the budget, names and cleanup.

Real files in a per-test shared-memory directory (tmpfs semantics are the same as /dev/shm
for what is tested here); nothing is mocked.
"""

from __future__ import annotations

import errno
import os

import pytest

from recoverkit.errors import CheckpointNotFoundError, ConfigError, IntegrityError, StorageError
from recoverkit.format.checksum import crc32c
from recoverkit.format.manifest import BlobRecord
from recoverkit.format.shm_index import data_file, make_index
from recoverkit.storage.shm import ShmStore, SlotBusyError, job_key, node_name


@pytest.fixture
def store(tmp_path):
    s = ShmStore(str(tmp_path / "ckpt"), shm_dir=str(tmp_path / "shm"), node="n0", budget_bytes=1 << 20)
    yield s
    s.remove_job()


def _index(step, data: bytes, rank=0):
    f = data_file(rank)
    records = {"rank": rank, "blob": BlobRecord(rank, f, 0, len(data), crc32c(data)).to_json(), "shards": [],
               "files": {f: len(data)}}
    return make_index(step=step, run_id="r", world_size=rank + 1, rank=rank, records=records, shards_meta=(),
                      aliases={}, data_bytes=len(data))


def _write(slots, step, data: bytes):
    w = slots.begin(step, len(data))
    w.view[:] = data
    w.commit(_index(step, data, slots.owner))
    return w.slot


def _read(slots, step) -> bytes:
    with slots.open(step) as v:
        return bytes(v.data)


def test_layout_names_and_job_file(store, tmp_path):
    slots = store.slots(3)
    _write(slots, 1, b"one")
    assert store.job_dir == str(tmp_path / "shm" / "recoverkit" / "n0" / job_key(str(tmp_path / "ckpt")))
    assert sorted(os.listdir(slots.dir)) == ["slot-0.data", "slot-0.index"]
    assert slots.dir.endswith("rank-00003") and store.slots(3, replica=True).dir.endswith("replica-00003")
    [job] = ShmStore.jobs(str(tmp_path / "shm"))
    node, key, path, info = job
    assert (node, key, path, info["root"]) == ("n0", store.job_key, store.job_dir, store.root)


def test_double_buffering_never_overwrites_the_newest_complete(store):
    slots = store.slots(0)
    used = [_write(slots, s, bytes([s]) * 100) for s in range(1, 6)]
    assert used == [0, 1, 0, 1, 0]  # alternating: the newest is never the one rewritten
    assert slots.steps() == [4, 5] and _read(slots, 4) == bytes([4]) * 100
    # a writer dies mid-copy of step 6: step 5 (newest) and nothing torn are listed
    w = slots.begin(6, 100)
    w.view[:50] = b"\x06" * 50
    assert slots.steps() == [5]  # the slot begun lost its index first
    w.abort()
    assert slots.steps() == [5] and _read(slots, 5) == bytes([5]) * 100
    assert _write(slots, 7, b"x" * 100) == 1  # the torn slot is free again


def test_torn_slots_are_never_listed(store):
    slots = store.slots(0)
    _write(slots, 1, b"a" * 64)
    _write(slots, 2, b"b" * 64)
    # data and no index: never listed
    os.remove(os.path.join(slots.dir, "slot-0.index"))
    assert slots.steps() == [2]
    # an index of another size than the data file holds
    with open(os.path.join(slots.dir, "slot-0.index"), "wb") as f:
        f.write(_index(1, b"a" * 128))
    assert slots.steps() == [2]
    # an index of another rank, a damaged index, a symlinked data file
    with open(os.path.join(slots.dir, "slot-0.index"), "wb") as f:
        f.write(_index(1, b"a" * 64, rank=1))
    assert slots.steps() == [2]
    with open(os.path.join(slots.dir, "slot-0.index"), "wb") as f:
        f.write(_index(1, b"a" * 64)[:-3] + b"00\n")
    assert slots.steps() == [2]
    with open(os.path.join(slots.dir, "slot-0.index"), "wb") as f:
        f.write(_index(1, b"a" * 64))
    assert slots.steps() == [1, 2]
    os.replace(os.path.join(slots.dir, "slot-1.data"), os.path.join(slots.dir, "elsewhere"))
    os.symlink(os.path.join(slots.dir, "elsewhere"), os.path.join(slots.dir, "slot-1.data"))
    assert slots.steps() == [1]
    with pytest.raises(CheckpointNotFoundError):
        slots.open(2)


def test_open_views_pin_their_slot(store):
    slots = store.slots(0)
    _write(slots, 1, b"1" * 10)
    _write(slots, 2, b"2" * 10)
    view = slots.open(1)  # the older one: begin would pick it
    with pytest.raises(SlotBusyError) as info:
        slots.begin(3, 10)
    assert info.value.errno == errno.EBUSY and "no free slot for step 3" in str(info.value)
    part = view.memory_view(2, 4)
    assert bytes(part) == b"1111" and part.readonly
    with pytest.raises(IntegrityError, match="outside the 10 data bytes"):
        view.memory_view(8, 4)
    view.close()
    with pytest.raises(SlotBusyError):  # a slice still alive keeps the pin
        slots.begin(3, 10)
    part.release()
    _write(slots, 3, b"3" * 10)
    assert slots.steps() == [2, 3]


def test_same_step_twice_keeps_one_copy(store):
    slots = store.slots(0)
    _write(slots, 1, b"a" * 8)
    _write(slots, 2, b"b" * 8)
    _write(slots, 2, b"c" * 8)  # saved again (e.g. a restart): the newer copy only
    assert slots.steps() == [2] and _read(slots, 2) == b"c" * 8


def test_budget_is_checked_before_growing(store):
    slots = store.slots(0)
    _write(slots, 1, b"a" * (400 << 10))
    _write(slots, 2, b"b" * (400 << 10))
    with pytest.raises(StorageError) as info:
        slots.begin(3, 700 << 10)  # slot 0 would grow to 700 KiB: 1.1 MiB in all
    assert info.value.errno == errno.ENOSPC and "budget of 1048576 bytes" in str(info.value)
    assert slots.steps() == [1, 2] or slots.steps() == [2]  # never the newest
    assert os.path.getsize(os.path.join(slots.dir, "slot-0.data")) == 400 << 10  # not grown
    _write(slots, 3, b"c" * (100 << 10))  # smaller: reuses the file as it is
    assert _read(slots, 3) == b"c" * (100 << 10) and store.used_bytes() == 800 << 10
    # replicas count against the same budget
    with pytest.raises(StorageError, match="budget"):
        store.slots(1, replica=True).begin(1, 300 << 10)


def test_commit_checks_the_index_against_the_slot(store):
    slots = store.slots(0)
    w = slots.begin(4, 8)
    with pytest.raises(IntegrityError, match="begun for step 4"):
        w.commit(_index(5, b"x" * 8))
    assert slots.steps() == []
    w = slots.begin(4, 8)
    with pytest.raises(IntegrityError, match="rank 1 in the slots of rank 0"):
        w.commit(_index(4, b"x" * 8, rank=1))


def test_names_are_validated(tmp_path):
    for bad in ("../x", "a/b", "", ".", "x" * 65, "-lead"):
        with pytest.raises(ConfigError, match="node name"):
            node_name(bad)
    store = ShmStore(str(tmp_path), shm_dir=str(tmp_path / "shm"), node="n")
    for owner in (-1, 1 << 20, "0", 1.0):
        with pytest.raises(ValueError, match="owner"):
            store.slots(owner)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slots"):
        ShmStore(str(tmp_path), shm_dir=str(tmp_path / "shm"), node="n", slots=1)


def test_env_names_the_node_and_the_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOVERKIT_NODE", "node-b")
    monkeypatch.setenv("RECOVERKIT_SHM_DIR", str(tmp_path / "shm2"))
    store = ShmStore(str(tmp_path / "ckpt"))
    assert store.node == "node-b" and store.job_dir.startswith(str(tmp_path / "shm2" / "recoverkit" / "node-b"))


def test_a_planted_symlink_is_never_written_through(store, tmp_path):
    slots = store.slots(0)
    _write(slots, 1, b"a" * 8)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.replace(os.path.join(slots.dir, "slot-0.data"), str(tmp_path / "moved"))
    os.symlink(str(victim), os.path.join(slots.dir, "slot-0.data"))
    with pytest.raises(StorageError, match="symbolic link"):
        slots.begin(2, 8)  # slot 0 (no longer complete) is picked: refused, never followed
    assert victim.read_bytes() == b"precious"
    assert slots.steps() == []


def test_remove_job_and_jobs_listing(tmp_path):
    shm = str(tmp_path / "shm")
    a = ShmStore(str(tmp_path / "a"), shm_dir=shm, node="n0")
    b = ShmStore(str(tmp_path / "b"), shm_dir=shm, node="n1")
    _write(a.slots(0), 1, b"a")
    _write(b.slots(0, replica=True), 1, b"b")
    assert sorted((j.node, j.root) for j in ShmStore.jobs(shm)) == [("n0", a.root), ("n1", b.root)]
    view = a.slots(0).open(1)
    a.remove_job()  # a view still open keeps its mapping readable
    assert bytes(view.data) == b"a"
    view.close()
    assert [j.node for j in ShmStore.jobs(shm)] == ["n1"] and not os.path.exists(os.path.join(shm, "recoverkit", "n0"))
    ShmStore.remove(ShmStore.jobs(shm)[0])
    assert os.listdir(shm) == []  # nothing left, not even the top directory


def test_a_new_store_finds_what_an_earlier_process_wrote(tmp_path):
    kw = dict(shm_dir=str(tmp_path / "shm"), node="n0")
    first = ShmStore(str(tmp_path / "ckpt"), **kw)
    _write(first.slots(0), 9, b"state")
    first.close()
    again = ShmStore(str(tmp_path / "ckpt") + "/", **kw)  # the same root, however spelled
    assert again.slots(0).steps() == [9] and _read(again.slots(0), 9) == b"state"
    assert _write(again.slots(0), 10, b"newer") == 1
    again.remove_job()


def test_shared_directories_are_sticky_and_a_job_directory_must_be_ours(store, tmp_path):
    import stat

    _write(store.slots(0), 1, b"x")
    for shared in (os.path.join(store.shm_dir, "recoverkit"), os.path.dirname(store.job_dir)):
        assert stat.S_IMODE(os.lstat(shared).st_mode) == 0o1777  # every user's jobs meet there
    assert stat.S_IMODE(os.lstat(store.job_dir).st_mode) == 0o700
    if os.getuid() != 0:
        pytest.skip("changing a directory's owner needs root")
    other = ShmStore(str(tmp_path / "other"), shm_dir=store.shm_dir, node="n0")
    other.slots(0).begin(1, 4).abort()
    os.chown(other.job_dir, 12345, -1)  # another user's job directory
    assert [j.path for j in ShmStore.jobs(store.shm_dir)] == [store.job_dir]  # never listed for gc
    fresh = ShmStore(str(tmp_path / "other"), shm_dir=store.shm_dir, node="n0")
    with pytest.raises(StorageError, match="belongs to user 12345"):
        fresh.slots(0).begin(2, 4)
    os.chown(other.job_dir, os.getuid(), -1)
    other.remove_job()
