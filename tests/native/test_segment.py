"""Segment files on both backends: round trips, byte-identical output, O_DIRECT, and real
faults (truncation, a flipped byte, missing files, ENOTDIR, a full file system)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recoverkit.errors import IntegrityError

from .helpers import load_backend, ptr, random_bytes


def _layout(sizes, offsets, seed=0):
    """Buffers and (file_offset, src_ptr, nbytes) items; the buffers keep the memory alive."""
    bufs = [random_bytes(n, seed=seed + i) for i, n in enumerate(sizes)]
    return bufs, [(off, ptr(b), b.nbytes) for off, b in zip(offsets, bufs)]


def _expected_file(bufs, offsets):
    size = max((o + b.nbytes for o, b in zip(offsets, bufs)), default=0)
    out = bytearray(size)
    for o, b in zip(offsets, bufs):
        out[o:o + b.nbytes] = b.tobytes()
    return bytes(out)


LAYOUTS = {
    "aligned": ([4096, 8192, 100_000], [0, 4096, 16384]),
    "packed_unaligned": ([1, 7, 5000, 3], [0, 1, 8, 5008]),
    "holes": ([10, 20], [100, 1_000_000]),
    "zero_length_tail": ([10, 0], [0, 50_000]),
    "reverse_order": ([300, 300], [4096, 0]),
    "large": ([9 << 20, 5], [4096, (9 << 20) + 8192]),
    "empty": ([], []),
}


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip(engine, tmp_path, layout, direct):
    sizes, offsets = LAYOUTS[layout]
    bufs, items = _layout(sizes, offsets)
    path = str(tmp_path / "seg.bin")
    engine.write_segment(path, items, direct=direct)
    with open(path, "rb") as f:
        assert f.read() == _expected_file(bufs, offsets)
    outs = [np.zeros_like(b) for b in bufs]
    crcs = [engine.crc32c(b) for b in bufs]
    got = engine.read_segment(path, [(o, ptr(d), d.nbytes, c) for o, d, c in zip(offsets, outs, crcs)])
    assert got == crcs
    for b, d in zip(bufs, outs):
        assert np.array_equal(b, d)
    # expected_crc = -1 skips the check but still reports the crc
    assert engine.read_segment(path, [(o, ptr(d), d.nbytes, -1) for o, d in zip(offsets, outs)]) == crcs


def test_file_mode_and_truncation_of_existing_file(engine, tmp_path):
    path = tmp_path / "seg.bin"
    path.write_bytes(b"x" * 100_000)
    buf, items = _layout([10], [0])
    old = os.umask(0o022)
    try:
        engine.write_segment(str(path), items, fsync=False)
    finally:
        os.umask(old)
    assert path.read_bytes() == buf[0].tobytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 20_000), max_size=6),
    gaps=st.lists(st.integers(0, 9000), min_size=6, max_size=6),
    direct=st.booleans(),
    misalign=st.integers(0, 4095),
)
def test_native_and_python_write_identical_files(tmp_path, sizes, gaps, direct, misalign):
    native, python = load_backend("native"), load_backend("python")
    offsets, pos = [], 0
    for n, gap in zip(sizes, gaps):
        offsets.append(pos + gap)
        pos += gap + n
    bufs, items = _layout(sizes, offsets)
    backing = np.zeros(sum(sizes) + 4096 + 1, dtype=np.uint8)  # sources at odd addresses too
    if sizes:
        flat = np.concatenate(bufs)
        backing[misalign:misalign + flat.nbytes] = flat
        starts = np.cumsum([0] + sizes[:-1])
        items = [(o, ptr(backing) + misalign + int(s), n) for o, s, n in zip(offsets, starts, sizes)]
    files = []
    for eng in (native, python):
        path = str(tmp_path / f"{eng.BACKEND}-{uuid.uuid4().hex}.bin")
        eng.write_segment(path, items, direct=direct, fsync=False)
        with open(path, "rb") as f:
            files.append(f.read())
        os.unlink(path)
    assert files[0] == files[1] == _expected_file(bufs, offsets)


def test_direct_io_on_tmpfs_falls_back(engine, tmp_path):
    # /dev/shm (tmpfs) refuses O_DIRECT with EINVAL: the write must silently go buffered.
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    bufs, items = _layout([5000, 123], [0, 8192])
    path = f"/dev/shm/rk-test-{uuid.uuid4().hex}"
    try:
        engine.write_segment(path, items, direct=True)
        with open(path, "rb") as f:
            assert f.read() == _expected_file(bufs, [0, 8192])
    finally:
        os.unlink(path)


def _written(engine, tmp_path, sizes=(1000, 5000), offsets=(0, 4096)):
    bufs, items = _layout(list(sizes), list(offsets))
    path = str(tmp_path / "seg.bin")
    engine.write_segment(path, items)
    crcs = [engine.crc32c(b) for b in bufs]
    outs = [np.zeros_like(b) for b in bufs]
    return path, [(o, ptr(d), d.nbytes, c) for o, d, c in zip(offsets, outs, crcs)], outs


def test_truncated_file(engine, tmp_path):
    path, items, _ = _written(engine, tmp_path)
    os.truncate(path, 9000)
    with pytest.raises(IntegrityError, match=r"truncated: .* has 9000 bytes, item needs \[4096, 9096\)") as info:
        engine.read_segment(path, items)
    assert info.value.path == path


def test_flipped_byte(engine, tmp_path):
    path, items, _ = _written(engine, tmp_path)
    with open(path, "r+b") as f:
        f.seek(4096 + 1234)
        byte = f.read(1)
        f.seek(4096 + 1234)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(IntegrityError) as info:
        engine.read_segment(path, items)
    msg = str(info.value)
    assert path in msg and "offset 4096" in msg
    assert f"expected 0x{items[1][3]:08x}" in msg and "found 0x" in msg
    assert info.value.path == path
    assert engine.read_segment(path, [items[0]]) == [items[0][3]]  # the first item is fine


def test_missing_file(engine, tmp_path):
    missing = str(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError) as info:
        engine.read_segment(missing, [])
    assert info.value.errno == errno.ENOENT and info.value.filename == missing


def test_parent_is_a_file(engine, tmp_path):
    (tmp_path / "file").write_bytes(b"")
    bad = str(tmp_path / "file" / "seg.bin")
    _, items = _layout([10], [0])
    with pytest.raises(OSError) as info:
        engine.write_segment(bad, items)
    assert info.value.errno == errno.ENOTDIR and info.value.filename == bad


def test_path_is_a_directory(engine, tmp_path):
    _, items = _layout([10], [0])
    with pytest.raises(IsADirectoryError):
        engine.write_segment(str(tmp_path), items)


def test_bad_items(engine, tmp_path):
    path = str(tmp_path / "seg.bin")
    buf = np.zeros(100, dtype=np.uint8)
    for items in ([(0, ptr(buf), 100, 5)], [(-1, ptr(buf), 10)], [(0, 0, 10)], [(0, ptr(buf), -1)],
                  [(0, ptr(buf), 100), (50, ptr(buf), 10)]):
        with pytest.raises(ValueError):
            engine.write_segment(path, items)
    engine.write_segment(path, [(0, ptr(buf), 100)])
    for items in ([(0, ptr(buf), 10)], [(0, 0, 10, -1)], [(0, ptr(buf), 10, -2)],
                  [(0, ptr(buf), 10, 1 << 32)]):
        with pytest.raises(ValueError):
            engine.read_segment(path, items)
    with pytest.raises(TypeError):
        engine.write_segment(path, [(0.5, ptr(buf), 10)])


def test_accepts_path_like(engine, tmp_path):
    bufs, items = _layout([10], [0])
    engine.write_segment(tmp_path / "seg.bin", items)
    out = np.zeros(10, dtype=np.uint8)
    assert engine.read_segment(tmp_path / "seg.bin", [(0, ptr(out), 10, engine.crc32c(bufs[0]))])


@pytest.fixture(scope="module")
def tiny_fs(tmp_path_factory):
    """A 64 KiB tmpfs (needs root and mount permission; skipped otherwise)."""
    where = tmp_path_factory.mktemp("tinyfs")
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                        capture_output=True, check=False).returncode if os.geteuid() == 0 else 1
    if rc != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield str(where)
    subprocess.run(["umount", str(where)], check=False)


@pytest.mark.parametrize("direct", [False, True])
def test_disk_full_raises_enospc(engine, tiny_fs, direct):
    bufs, items = _layout([200_000], [0])
    path = os.path.join(tiny_fs, f"full-{engine.BACKEND}-{direct}.bin")
    with pytest.raises(OSError) as info:
        engine.write_segment(path, items, direct=direct)
    assert info.value.errno == errno.ENOSPC and info.value.filename == path
    os.unlink(path)
    small, items = _layout([1000], [0])  # the engine is still usable afterwards
    engine.write_segment(path, items)
    os.unlink(path)
