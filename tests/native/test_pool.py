"""StagingPool on both backends: first-fit offsets, coalescing, errors, views, lifecycle."""

from __future__ import annotations

import ctypes
import gc
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recoverkit.errors import PoolExhaustedError

from .helpers import load_backend

KIB = 1024


def test_alloc_offsets_are_first_fit_and_aligned(engine):
    with engine.StagingPool(64 * KIB, register_cuda=False) as pool:
        assert (pool.capacity, pool.alignment, pool.used) == (64 * KIB, 4096, 0)
        assert pool.base_ptr % 4096 == 0
        a = pool.alloc(1)
        b = pool.alloc(4096)
        c = pool.alloc(4097)
        d = pool.alloc(0)  # zero bytes still get one aligned slot
        assert [a, b, c, d] == [0, 4096, 8192, 16384]
        assert pool.used == 5 * 4096
        assert pool.address(c) == pool.base_ptr + c


def test_free_out_of_order_coalesces(engine):
    with engine.StagingPool(16 * 4096, register_cuda=False) as pool:
        offs = [pool.alloc(4096) for _ in range(16)]
        with pytest.raises(PoolExhaustedError):
            pool.alloc(1)
        for i in (1, 3, 2):  # free a hole of three neighbours, middle last
            pool.free(offs[i])
        assert pool.alloc(3 * 4096) == offs[1]  # only possible if 1..3 were merged
        pool.free(offs[1])
        pool.free(offs[0])
        pool.free(offs[4])
        assert pool.alloc(5 * 4096) == 0  # merged with both neighbours
        for o in offs[5:]:
            pool.free(o)
        pool.free(0)
        assert pool.used == 0
        assert pool.alloc(16 * 4096) == 0  # everything merged back into one range


def test_first_fit_takes_lowest_hole(engine):
    with engine.StagingPool(10 * 4096, register_cuda=False) as pool:
        offs = [pool.alloc(4096) for _ in range(10)]
        pool.free(offs[6])
        pool.free(offs[2])
        assert pool.alloc(100) == offs[2]
        assert pool.alloc(100) == offs[6]


def test_exhaustion_error_names_sizes(engine):
    with engine.StagingPool(8 * 4096, register_cuda=False) as pool:
        a = pool.alloc(4096)
        pool.alloc(4096)
        pool.free(a)
        with pytest.raises(PoolExhaustedError) as info:
            pool.alloc(7 * 4096)
        msg = str(info.value)
        assert "requested 28672" in msg and "largest free range 24576" in msg
        assert "capacity 32768" in msg
        assert isinstance(info.value, MemoryError)
        with pytest.raises(PoolExhaustedError):
            pool.alloc(1 << 40)


def test_bad_and_double_free(engine):
    with engine.StagingPool(8 * 4096, register_cuda=False) as pool:
        a = pool.alloc(10)
        with pytest.raises(ValueError):
            pool.free(a + 1)
        with pytest.raises(ValueError):
            pool.free(-1)
        pool.free(a)
        with pytest.raises(ValueError, match="not allocated"):
            pool.free(a)


def test_high_water_tracks_peak_use(engine):
    with engine.StagingPool(8 * 4096, register_cuda=False) as pool:
        a = pool.alloc(3 * 4096)
        b = pool.alloc(4096)
        pool.free(a)
        assert (pool.used, pool.high_water) == (4096, 4 * 4096)
        c = pool.alloc(2 * 4096)
        assert pool.high_water == 4 * 4096
        pool.free(b)
        pool.free(c)
        assert pool.high_water == 4 * 4096 and pool.used == 0


def test_custom_alignment(engine):
    with engine.StagingPool(1 << 20, alignment=64, register_cuda=False) as pool:
        assert pool.alloc(1) == 0 and pool.alloc(65) == 64 and pool.alloc(1) == 192
    with engine.StagingPool(1 << 20, alignment=1 << 16, register_cuda=False) as pool:
        assert pool.base_ptr % (1 << 16) == 0
        assert pool.alloc(1) == 0 and pool.alloc(1) == 1 << 16
    for bad in (0, 3, 4095):
        with pytest.raises(ValueError):
            engine.StagingPool(1 << 20, alignment=bad)
    with pytest.raises(ValueError):
        engine.StagingPool(0)


def test_view_is_writable_and_bounds_checked(engine):
    with engine.StagingPool(4 * 4096, register_cuda=False) as pool:
        off = pool.alloc(100)
        v = pool.view(off, 100)
        assert (v.format, v.ndim, v.readonly, v.nbytes) == ("B", 1, False, 100)
        v[:5] = b"hello"
        assert ctypes.string_at(pool.address(off), 5) == b"hello"
        assert pool.view(0, 4 * 4096).nbytes == 4 * 4096
        assert pool.view(4 * 4096, 0).nbytes == 0
        for bad in ((0, 4 * 4096 + 1), (4 * 4096, 1), (-1, 1), (1, -1)):
            with pytest.raises(ValueError):
                pool.view(*bad)
        with pytest.raises(ValueError):
            pool.address(4 * 4096)


def test_view_outlives_close(engine):
    pool = engine.StagingPool(4 * 4096, register_cuda=False)
    v = pool.view(pool.alloc(10), 10)
    v[:] = b"0123456789"
    pool.close()
    del pool
    gc.collect()
    assert bytes(v) == b"0123456789"  # still mapped: the view holds the arena
    v[0] = 65
    assert bytes(v[:1]) == b"A"


def test_close_is_idempotent_and_final(engine):
    pool = engine.StagingPool(4 * 4096, register_cuda=False)
    off = pool.alloc(1)
    pool.close()
    pool.close()
    assert pool.closed
    for call in (lambda: pool.alloc(1), lambda: pool.free(off), lambda: pool.address(0),
                 lambda: pool.view(0, 1), lambda: pool.base_ptr):
        with pytest.raises(ValueError, match="pool is closed"):
            call()


def test_lock_memory(engine):
    try:
        pool = engine.StagingPool(1 << 20, lock_memory=True, register_cuda=False)
    except OSError as e:  # RLIMIT_MEMLOCK too small for an unprivileged user
        assert e.errno is not None
        pytest.skip(f"mlock not permitted here: {e}")
    with pool:
        assert pool.locked
    assert not pool.locked


def test_no_cuda_registration_without_driver(engine):
    with engine.StagingPool(1 << 20) as pool:
        assert pool.cuda_registered == engine.cuda_available()


def test_thread_safety(engine):
    with engine.StagingPool(256 * 4096, register_cuda=False) as pool:
        errors = []

        def churn(seed: int) -> None:
            try:
                for i in range(300):
                    offs = [pool.alloc(4096 * (1 + (seed + i + k) % 3)) for k in range(4)]
                    for o in reversed(offs):
                        pool.free(o)
            except Exception as e:  # noqa: BLE001 - collected and reported below
                errors.append(e)

        threads = [threading.Thread(target=churn, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert pool.used == 0 and pool.alloc(256 * 4096) == 0


# An operation: ("alloc", nbytes) or ("free", index into the live allocations).
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 40_000)),
        st.tuples(st.just("free"), st.integers(0, 1000)),
    ),
    max_size=60,
)


def _replay(engine, ops, capacity=64 * 4096):
    trace, live = [], []
    with engine.StagingPool(capacity, register_cuda=False) as pool:
        for op, arg in ops:
            if op == "alloc":
                try:
                    off = pool.alloc(arg)
                except PoolExhaustedError:
                    trace.append(("full", arg))
                    continue
                live.append(off)
                trace.append(("at", off))
            elif live:
                pool.free(live.pop(arg % len(live)))
        trace.append(("end", pool.used, pool.high_water))
    return trace


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_same_offsets_on_both_backends(ops):
    native, python = load_backend("native"), load_backend("python")
    assert _replay(native, ops) == _replay(python, ops)
