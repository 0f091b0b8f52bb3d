"""Segment files against hostile paths on both backends: symlinks are never followed,
special files never block and are refused, hard links are not rewritten, NUL bytes in paths
are errors, every region is checked against the real file size and every item's CRC is
checked before a byte is read (issue 9)."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

from recoverkit.errors import IntegrityError

from .helpers import load_backend, ptr, random_bytes

TIMEOUT_S = 20


def _segment(engine, path, n=5000):
    src = random_bytes(n, seed=1)
    engine.write_segment(str(path), [(0, ptr(src), n)], fsync=False)
    return src, engine.crc32c(src)


def _bounded(fn, unblock=None):
    """Runs fn in a thread; fails (after unblocking it) if it is still running after TIMEOUT_S."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(TIMEOUT_S)
    if t.is_alive():
        if unblock is not None:
            unblock()
        t.join(TIMEOUT_S)
        pytest.fail(f"blocked for more than {TIMEOUT_S} s")
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _unblock_fifo(path, flags):
    def unblock():
        fd = os.open(path, flags | os.O_NONBLOCK)
        os.close(fd)
    return unblock


# ---- reads ----------------------------------------------------------------------------

def test_read_refuses_a_symlink_to_a_valid_segment(engine, tmp_path):
    target = tmp_path / "outside.bin"
    src, crc = _segment(engine, target)
    link = tmp_path / "seg.bin"
    link.symlink_to(target)
    dst = np.zeros_like(src)
    with pytest.raises(IntegrityError, match="is a symbolic link") as info:
        engine.read_segment(str(link), [(0, ptr(dst), dst.nbytes, crc)])
    assert info.value.path == str(link) and str(link) in str(info.value)
    assert not dst.any()  # not a byte of the target was read


def test_read_of_a_fifo_neither_blocks_nor_reads(engine, tmp_path):
    fifo = str(tmp_path / "seg.bin")
    os.mkfifo(fifo)
    dst = np.zeros(10, dtype=np.uint8)
    with pytest.raises(IntegrityError, match="is a FIFO, not a regular file") as info:
        _bounded(lambda: engine.read_segment(fifo, [(0, ptr(dst), 10, 0)]),
                 _unblock_fifo(fifo, os.O_WRONLY))
    assert info.value.path == fifo


@pytest.mark.parametrize("special", ["/dev/zero", "directory"])
def test_read_refuses_devices_and_directories(engine, tmp_path, special):
    path = str(tmp_path) if special == "directory" else special
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    with pytest.raises(IntegrityError, match="not a regular file"):
        engine.read_segment(path, [])  # refused even with nothing to read
    dst = np.zeros(4096, dtype=np.uint8)
    with pytest.raises(IntegrityError, match="not a regular file"):
        engine.read_segment(path, [(0, ptr(dst), dst.nbytes, 0)])
    assert not dst.any()


@pytest.mark.parametrize("offset,nbytes", [
    (0, 5001), (4999, 2), (5000, 1), (1 << 40, 1), ((1 << 63) - 1, 1), (1, (1 << 63) - 1),
    ((1 << 63) - 1, (1 << 63) - 1),
])
def test_regions_past_the_end_are_refused_before_any_read(engine, tmp_path, offset, nbytes):
    path = tmp_path / "seg.bin"
    src, crc = _segment(engine, path)
    first = np.zeros_like(src)
    small = np.zeros(16, dtype=np.uint8)  # never written: the region check comes first
    items = [(0, ptr(first), first.nbytes, crc), (offset, ptr(small), nbytes, 0)]
    with pytest.raises(IntegrityError) as info:
        engine.read_segment(str(path), items)
    msg = str(info.value)
    assert f"{path} has 5000 bytes" in msg and f"[{offset}, {offset + nbytes})" in msg
    assert not first.any() and not small.any()  # the valid first item was not read either


@pytest.mark.parametrize("bad", [-1, -2, 1 << 32, (1 << 64) + 5, -(1 << 70)])
def test_every_item_is_checked_no_crc_means_unchecked(engine, tmp_path, bad):
    path = tmp_path / "seg.bin"
    src, crc = _segment(engine, path)
    dst = np.zeros_like(src)
    with pytest.raises(IntegrityError, match=rf"expected_crc {bad} .*not a CRC-32C") as info:
        engine.read_segment(str(path), [(0, ptr(dst), 10, crc), (0, ptr(dst), dst.nbytes, bad)])
    assert info.value.path == str(path)
    assert not dst.any()
    for wrong_type in (None, 1.0, "0"):
        with pytest.raises(TypeError):
            engine.read_segment(str(path), [(0, ptr(dst), dst.nbytes, wrong_type)])


# ---- writes ---------------------------------------------------------------------------

@pytest.mark.parametrize("direct", [False, True])
def test_write_never_follows_a_planted_symlink(engine, tmp_path, direct):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious" * 1000)
    link = tmp_path / "seg.bin"
    link.symlink_to(victim)
    src = random_bytes(100)
    with pytest.raises(OSError) as info:
        engine.write_segment(str(link), [(0, ptr(src), 100)], direct=direct)
    assert info.value.errno == errno.ELOOP and info.value.filename == str(link)
    assert "symbolic link" in str(info.value)
    assert victim.read_bytes() == b"precious" * 1000  # not truncated, not written
    assert link.is_symlink()


def test_write_to_a_dangling_symlink_creates_nothing(engine, tmp_path):
    link = tmp_path / "seg.bin"
    link.symlink_to(tmp_path / "created-elsewhere")
    src = random_bytes(10)
    with pytest.raises(OSError) as info:
        engine.write_segment(str(link), [(0, ptr(src), 10)])
    assert info.value.errno == errno.ELOOP
    assert not (tmp_path / "created-elsewhere").exists()


def test_write_to_a_fifo_without_reader_does_not_block(engine, tmp_path):
    fifo = str(tmp_path / "seg.bin")
    os.mkfifo(fifo)
    src = random_bytes(10)
    with pytest.raises(OSError) as info:
        _bounded(lambda: engine.write_segment(fifo, [(0, ptr(src), 10)]),
                 _unblock_fifo(fifo, os.O_RDONLY))
    assert info.value.errno == errno.ENXIO and info.value.filename == fifo
    assert "not a regular file" in str(info.value)


def test_write_to_a_fifo_with_a_reader_writes_nothing(engine, tmp_path):
    fifo = str(tmp_path / "seg.bin")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        src = random_bytes(10)
        with pytest.raises(OSError) as info:
            _bounded(lambda: engine.write_segment(fifo, [(0, ptr(src), 10)]))
        assert info.value.errno == errno.EINVAL and info.value.filename == fifo
        assert "is a FIFO, not a regular file" in str(info.value)
        assert os.read(reader, 100) == b""  # nothing was written into the pipe
    finally:
        os.close(reader)


def test_write_refuses_a_character_device(engine):
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    src = random_bytes(10)
    with pytest.raises(OSError) as info:
        engine.write_segment("/dev/null", [(0, ptr(src), 10)])
    assert info.value.errno == errno.EINVAL and "a character device" in str(info.value)


def test_write_does_not_rewrite_a_hard_linked_file(engine, tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep me")
    os.link(victim, tmp_path / "seg.bin")
    src = random_bytes(10)
    with pytest.raises(OSError) as info:
        engine.write_segment(str(tmp_path / "seg.bin"), [(0, ptr(src), 10)])
    assert info.value.errno == errno.EMLINK and "2 hard links" in str(info.value)
    assert victim.read_bytes() == b"keep me"


def test_rewriting_a_regular_file_still_replaces_it(engine, tmp_path):
    path = tmp_path / "seg.bin"
    path.write_bytes(b"y" * 50_000)
    src = random_bytes(10)
    engine.write_segment(str(path), [(0, ptr(src), 10)], direct=True)
    assert path.read_bytes() == src.tobytes()


# ---- NUL bytes in paths ---------------------------------------------------------------

@pytest.mark.parametrize("kind", [str, bytes])
def test_nul_in_a_path_is_an_error_not_a_truncation(engine, tmp_path, kind):
    base = str(tmp_path / "seg.bin")
    bad = kind(base + "\0.tmp") if kind is str else os.fsencode(base) + b"\0.tmp"
    src = random_bytes(10)
    with pytest.raises(ValueError, match="NUL byte"):
        engine.write_segment(bad, [(0, ptr(src), 10)])
    assert os.listdir(tmp_path) == []  # no file named by the part before the NUL
    _segment(engine, base)
    dst = np.zeros(10, dtype=np.uint8)
    with pytest.raises(ValueError, match="NUL byte"):
        engine.read_segment(bad, [(0, ptr(dst), 10, 0)])
    assert not dst.any()


def test_both_backends_refuse_with_the_same_errors(tmp_path):
    native, python = load_backend("native"), load_backend("python")
    victim = tmp_path / "victim"
    victim.write_bytes(b"v")
    (tmp_path / "link").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo")
    src = random_bytes(10)
    calls = [
        lambda e: e.write_segment(str(tmp_path / "link"), [(0, ptr(src), 10)]),
        lambda e: e.read_segment(str(tmp_path / "link"), []),
        lambda e: e.read_segment(str(tmp_path / "fifo"), []),
        lambda e: e.read_segment(str(victim), [(0, ptr(src), 2, 0)]),
        lambda e: e.read_segment(str(victim), [(0, ptr(src), 1, -1)]),
        lambda e: e.write_segment(str(tmp_path / "x\0"), []),
        lambda e: e.write_segment(str(tmp_path / "big"), [((1 << 63) - 5, ptr(src), 10)]),
    ]
    for call in calls:
        got = []
        for eng in (native, python):
            with pytest.raises(Exception) as info:
                call(eng)
            got.append((type(info.value), str(info.value), getattr(info.value, "errno", None)))
        assert got[0] == got[1]
