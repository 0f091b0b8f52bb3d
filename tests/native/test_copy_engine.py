"""CopyEngine on both backends: correctness and CRC for many sizes, waits, errors, close."""

from __future__ import annotations

import threading
import time

import google_crc32c
import numpy as np
import pytest

from recoverkit.errors import CopyError

from .helpers import ptr, random_bytes

MIB = 1 << 20


@pytest.fixture
def copier(engine):
    with engine.CopyEngine(num_threads=2, chunk_bytes=64 * 1024) as eng:
        yield eng


SIZES = [0, 1, 7, 4095, 4097, 64 * 1024, 64 * 1024 + 1, 3 * 64 * 1024 - 5, 1_000_003, 4 * MIB + 3]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("misalign", [0, 3])
def test_copy_and_crc(copier, n, misalign):
    src = random_bytes(n + 8, seed=n)
    dst = np.zeros(n + 8, dtype=np.uint8)
    h = copier.submit(ptr(src) + misalign, ptr(dst) + 5, n)
    crc = h.result(timeout_s=30)
    assert crc == google_crc32c.value(src[misalign:misalign + n].tobytes())
    assert h.crc32c == crc and h.done() and h.error is None and h.nbytes == n
    assert bytes(dst[5:5 + n]) == bytes(src[misalign:misalign + n])
    assert not dst[:5].any() and not dst[5 + n:].any()  # nothing written outside
    assert h.elapsed_s >= 0


def test_copy_without_crc(copier):
    src, dst = random_bytes(3 * MIB + 1), np.zeros(3 * MIB + 1, dtype=np.uint8)
    h = copier.submit(ptr(src), ptr(dst), src.nbytes, crc=False)
    assert h.wait(30)
    assert h.result() == 0
    assert np.array_equal(src, dst)


def test_default_chunking_large_copy(engine):
    n = 40 * MIB + 12345  # several default 8 MiB chunks, spread over the workers
    src, dst = random_bytes(n, seed=1), np.empty(n, dtype=np.uint8)
    with engine.CopyEngine() as eng:
        assert eng.num_threads == 2
        crc = eng.submit(ptr(src), ptr(dst), n).result(60)
        stats = eng.stats()
    assert crc == engine.crc32c(src)
    assert np.array_equal(src, dst)
    assert stats["bytes_copied"] == n and stats["copies_done"] == 1


def test_many_concurrent_submitters(copier, engine):
    rng = np.random.default_rng(7)
    sizes = [int(s) for s in rng.integers(0, 300_000, 120)]
    srcs = [random_bytes(s, seed=i) for i, s in enumerate(sizes)]
    dsts = [np.zeros(s, dtype=np.uint8) for s in sizes]
    handles = [None] * len(sizes)

    def submit_range(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            handles[i] = copier.submit(ptr(srcs[i]), ptr(dsts[i]), sizes[i])

    threads = [threading.Thread(target=submit_range, args=(k * 30, k * 30 + 30)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, h in enumerate(handles):
        assert h.result(30) == google_crc32c.value(srcs[i].tobytes())
        assert np.array_equal(srcs[i], dsts[i])
    stats = copier.stats()
    assert stats["copies_done"] == len(sizes) and stats["bytes_copied"] == sum(sizes)
    assert stats["copies_pending"] == 0


def _backlog(eng, count=8, n=64 * MIB):
    """Queues `count` large copies on a 1-thread engine; the last ones are surely pending."""
    src = np.ones(n, dtype=np.uint8)
    dsts = [np.empty(n, dtype=np.uint8) for _ in range(count)]
    return src, dsts, [eng.submit(ptr(src), ptr(d), n) for d in dsts]


def test_wait_timeout_and_result_timeout(engine):
    with engine.CopyEngine(num_threads=1) as eng:
        src, dsts, handles = _backlog(eng)
        last = handles[-1]
        assert last.wait(0.0) is False
        assert not last.done()
        with pytest.raises(TimeoutError):
            last.result(timeout_s=0.0)
        with pytest.raises(ValueError):
            _ = last.crc32c
        assert last.error is None
        assert last.wait(None) is True
        assert last.crc32c == engine.crc32c(src)


def test_wait_releases_the_gil(engine):
    counter = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal counter
        while not stop.is_set():
            counter += 1

    with engine.CopyEngine(num_threads=1) as eng:
        src, dsts, handles = _backlog(eng, count=4)
        t = threading.Thread(target=spin)
        t.start()
        before = counter
        handles[-1].wait()
        stop.set()
        t.join()
    assert counter - before > 1000


def test_close_fails_pending_copies(engine):
    eng = engine.CopyEngine(num_threads=1)
    src, dsts, handles = _backlog(eng, count=8)
    eng.close()
    eng.close()  # idempotent
    assert all(h.done() for h in handles)
    failed = [h for h in handles if h.error is not None]
    assert failed, "close() with a backlog must fail the copies still queued"
    for h in failed:
        assert h.error == "engine closed"
        with pytest.raises(CopyError, match="engine closed"):
            h.result()
        with pytest.raises(ValueError):
            _ = h.crc32c
    for h in handles:
        if h.error is None:
            assert h.result() == engine.crc32c(src)
    stats = eng.stats()
    assert stats["copies_failed"] == len(failed) and stats["copies_pending"] == 0
    with pytest.raises(ValueError, match="closed"):
        eng.submit(ptr(src), ptr(dsts[0]), 1)


def test_bad_arguments(engine):
    a = np.zeros(16, dtype=np.uint8)
    with engine.CopyEngine(num_threads=1) as eng:
        with pytest.raises(ValueError):
            eng.submit(ptr(a), ptr(a) + 8, -1)
        with pytest.raises(ValueError):
            eng.submit(0, ptr(a), 8)
        with pytest.raises(ValueError):
            eng.submit(ptr(a), 0, 8)
        with pytest.raises(ValueError):
            eng.submit(-5, ptr(a), 8)
        assert eng.submit(0, 0, 0).result() == 0  # an empty copy needs no memory
        if not engine.cuda_available():
            with pytest.raises(RuntimeError, match="no CUDA driver"):
                eng.submit(ptr(a), ptr(a) + 8, 8, device=0)
    with pytest.raises(ValueError):
        engine.CopyEngine(num_threads=0)
    with pytest.raises(ValueError):
        engine.CopyEngine(chunk_bytes=0)


def test_engine_into_staging_pool(engine):
    """The path the staging pipeline takes: tensor bytes into pool slots, then a view."""
    data = random_bytes(300_000, seed=3)
    with engine.StagingPool(1 * MIB, register_cuda=False) as pool, engine.CopyEngine() as eng:
        off = pool.alloc(data.nbytes)
        crc = eng.submit(ptr(data), pool.address(off), data.nbytes).result(10)
        assert bytes(pool.view(off, data.nbytes)) == data.tobytes()
        assert crc == engine.crc32c(pool.view(off, data.nbytes))


def test_elapsed_is_measured(engine):
    with engine.CopyEngine(num_threads=1) as eng:
        src, dsts, handles = _backlog(eng, count=2, n=32 * MIB)
        handles[-1].wait()
        time.sleep(0.01)
        e1 = handles[-1].elapsed_s
        time.sleep(0.01)
        assert handles[-1].elapsed_s == e1 > 0  # frozen once done
