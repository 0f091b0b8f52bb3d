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
    if items:  # there is no "unchecked" value: -1 is a damaged record, not a skipped check
        with pytest.raises(IntegrityError, match="expected_crc -1 .* not a CRC-32C"):
            engine.read_segment(path, [(o, ptr(d), d.nbytes, -1) for o, d in zip(offsets, outs)])


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


# ---- checksums in the write's pass, and the pipelined O_DIRECT writer ------------------

@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_returns_each_items_crc(engine, tmp_path, layout, direct):
    sizes, offsets = LAYOUTS[layout]
    bufs, items = _layout(sizes, offsets, seed=7)
    path = str(tmp_path / "seg.bin")
    assert engine.write_segment(path, items, direct=direct) is None
    got = engine.write_segment(path, items, direct=direct, crc=True)
    assert got == [engine.crc32c(b) for b in bufs]  # in the caller's order, not file order
    with open(path, "rb") as f:
        assert f.read() == _expected_file(bufs, offsets)


def _mixed_sources(mib=1 << 20):
    """Sources the O_DIRECT writer treats every way: bounced (odd address) across several
    8 MiB buffers, written straight from aligned memory in several pieces, small items
    sharing blocks, and a hole."""
    page_aligned = np.zeros(17 * mib + 4096, dtype=np.uint8)
    start = (-ptr(page_aligned)) % 4096
    aligned = page_aligned[start:start + 17 * mib]
    aligned[:] = random_bytes(17 * mib, seed=3)
    odd = random_bytes(21 * mib + 3, seed=4)[1:]  # an odd address: must be bounced
    small = [random_bytes(n, seed=10 + n) for n in (1, 4095, 5000)]
    bufs = [odd, small[0], small[1], aligned, small[2]]
    offsets = [0, 21 * mib + 3, 21 * mib + 4, 22 * mib, 39 * mib + 12_345]
    return bufs, offsets, [(o, ptr(b), b.nbytes) for o, b in zip(offsets, bufs)]


def test_pipelined_direct_write_matches_the_fallback(tmp_path):
    native, python = load_backend("native"), load_backend("python")
    bufs, offsets, items = _mixed_sources()
    want = _expected_file(bufs, offsets)
    crcs = [native.crc32c(b) for b in bufs]
    for eng in (native, python):
        for direct in (True, False):
            path = str(tmp_path / f"{eng.BACKEND}-{direct}.bin")
            assert eng.write_segment(path, items[::-1], direct=direct, crc=True) == crcs[::-1]
            with open(path, "rb") as f:
                assert f.read() == want, (eng.BACKEND, direct)
            os.unlink(path)


_FSIZE_CHILD = r"""
import errno, resource, signal, sys
import numpy as np
from recoverkit._native import load
eng = load(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # pwrite then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))
src = np.random.default_rng(0).integers(0, 256, (64 << 20) + 1, dtype=np.uint8)[1:]
try:
    eng.write_segment(sys.argv[2], [(0, src.ctypes.data, src.nbytes)], direct=True, crc=True)
except OSError as e:
    assert e.errno == errno.EFBIG and e.filename == sys.argv[2], (e.errno, e.filename)
    small = np.ones(5000, dtype=np.uint8)                 # still usable afterwards
    eng.write_segment(sys.argv[2], [(0, small.ctypes.data, small.nbytes)], direct=True)
    print("EFBIG")
"""


def test_failed_write_in_a_writer_thread_raises_with_errno_and_path(engine, tmp_path):
    # A real failed pwrite (the file-size limit) while several writes are in flight.
    import sys

    path = str(tmp_path / "big.bin")
    out = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, engine.BACKEND, path],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "EFBIG"
    assert os.path.getsize(path) == 5000
