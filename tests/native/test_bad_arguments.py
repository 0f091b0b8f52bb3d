"""Raw pointers and integers from a caller, on both backends: a range with an unmapped page
is OSError(EFAULT) on every path (with or without CRC, buffered or O_DIRECT, copy engine,
crc32c_ptr) instead of a SIGSEGV, and negative or oversized integers are ValueError or
OverflowError in every entry point (issue 9).

The pointer cases run in a child process, so a crash is a failed test, not a dead run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from .helpers import BACKENDS, load_backend, ptr

_CHILD = r"""
import ctypes, errno, json, mmap, os, sys, tempfile
from recoverkit._native import load

eng = load(sys.argv[1])
PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
base = libc.mmap(None, 5 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
ctypes.memset(base, 7, 5 * PAGE)
assert libc.munmap(base + PAGE, PAGE) == 0               # a hole between two mapped pages
assert libc.mprotect(base + 3 * PAGE, PAGE, mmap.PROT_READ) == 0  # a read-only page
assert libc.mprotect(base + 4 * PAGE, PAGE, 0) == 0      # a PROT_NONE page
hole, before, readonly, noaccess = base + PAGE, base, base + 3 * PAGE, base + 4 * PAGE
good = ctypes.create_string_buffer(3 * PAGE)
g = ctypes.addressof(good)
d = tempfile.mkdtemp()
seg = os.path.join(d, "valid.bin")
eng.write_segment(seg, [(0, g, 3 * PAGE)])
crc = eng.crc32c_ptr(g, 3 * PAGE)

def fresh():
    return os.path.join(d, f"w{len(os.listdir(d))}.bin")

CASES = {
    "crc32c_ptr": lambda: eng.crc32c_ptr(hole, 10),
    "crc32c_ptr_straddles": lambda: eng.crc32c_ptr(before + PAGE - 8, 16),
    "copy_src_crc": lambda: eng.CopyEngine(1).submit(hole, g, 100),
    "copy_src_nocrc": lambda: eng.CopyEngine(1).submit(hole, g, 100, crc=False),
    "copy_dst": lambda: eng.CopyEngine(1).submit(g, hole + 8, 100),
    "copy_straddles": lambda: eng.CopyEngine(1).submit(g, before, 2 * PAGE),
    "read_dst_unmapped": lambda: eng.read_segment(seg, [(0, g, 10, eng.crc32c_ptr(g, 10)), (0, hole, PAGE, 0)]),
    "read_dst_readonly": lambda: eng.read_segment(seg, [(0, readonly, 100, eng.crc32c_ptr(g, 100))]),
}
for direct in (False, True):
    for crc in (False, True):
        tag = f"{'direct' if direct else 'buffered'}_{'crc' if crc else 'nocrc'}"
        CASES[f"write_{tag}"] = lambda direct=direct, crc=crc: eng.write_segment(
            fresh(), [(0, g, 100), (4096, hole + 3, 5000)], direct=direct, crc=crc)
        CASES[f"write_many_small_{tag}"] = lambda direct=direct, crc=crc: eng.write_segment(
            fresh(), [(i * 16, before + i * 16, 16) for i in range(256)] + [(8192, hole + PAGE - 1, 1)],
            direct=direct, crc=crc)
# mapped but unreadable: only paths the kernel reads for us can report it; the buffered
# write reads through pwrite before it checksums, with and without crc
for crc in (False, True):
    CASES[f"write_buffered_protnone_{crc}"] = lambda crc=crc: eng.write_segment(fresh(), [(0, noaccess, 100)], crc=crc)

for name, call in CASES.items():
    if len(sys.argv) > 2 and name not in sys.argv[2:]:
        continue
    print(json.dumps({"case": name, "started": True}), flush=True)
    existing = set(os.listdir(d))
    try:
        call()
        out = {"case": name, "error": None}
    except BaseException as e:
        out = {"case": name, "error": type(e).__name__, "errno": getattr(e, "errno", None), "msg": str(e)}
    out["files"] = sorted(set(os.listdir(d)) - existing)  # created by this case
    print(json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module", params=BACKENDS)
def child_results(request):
    load_backend(request.param)  # skip when the native engine is not built
    proc = subprocess.run([sys.executable, "-c", _CHILD, request.param], capture_output=True,
                          text=True, timeout=300, check=False)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = {r["case"]: r for r in lines if "started" not in r}
    started = [r["case"] for r in lines if "started" in r]
    return request.param, proc, done, started


def _result(child_results, case):
    backend, proc, done, started = child_results
    if case not in done:
        crashed = started[-1] if started else None
        pytest.fail(f"{backend}: the child died with {proc.returncode} in case {crashed!r}\n"
                    f"{proc.stderr[-2000:]}")
    return done[case]


UNMAPPED = ["crc32c_ptr", "crc32c_ptr_straddles", "copy_src_crc", "copy_src_nocrc", "copy_dst",
            "copy_straddles", "read_dst_unmapped"] + [
    f"write_{many}{mode}_{crc}" for many in ("", "many_small_") for mode in ("buffered", "direct")
    for crc in ("crc", "nocrc")]


@pytest.mark.parametrize("case", UNMAPPED)
def test_unmapped_range_is_efault_not_a_signal(child_results, case):
    r = _result(child_results, case)
    assert r["error"] == "OSError" and r["errno"] == 14, r
    assert "is not mapped memory" in r["msg"], r
    assert r["files"] == []  # checked before a file was created or a byte written


@pytest.mark.parametrize("case", ["read_dst_readonly", "write_buffered_protnone_True",
                                  "write_buffered_protnone_False"])
def test_kernel_checked_paths_report_unreadable_memory_as_efault(child_results, case):
    r = _result(child_results, case)
    assert r["error"] == "OSError" and r["errno"] == 14, r


def test_the_first_unmapped_range_is_named(child_results):
    r = _result(child_results, "write_many_small_buffered_crc")
    assert "src_ptr [0x" in r["msg"] and "(1 bytes)" in r["msg"], r


# ---- integers ------------------------------------------------------------------------

BIG, HUGE = 1 << 63, 1 << 64


def _calls(e, buf, tmp):
    """(name, call, allowed exceptions) for every entry point that takes an integer."""
    p, seg = ptr(buf), str(tmp / "seg.bin")
    e.write_segment(seg, [(0, p, 64)])
    pool = e.StagingPool(1 << 16, register_cuda=False)
    eng = e.CopyEngine(1)
    return [
        ("crc32c value", lambda: e.crc32c(b"x", HUGE), ValueError),
        ("crc32c value negative", lambda: e.crc32c(b"x", -HUGE), ValueError),
        ("crc32c_ptr ptr", lambda: e.crc32c_ptr(HUGE, 1), OverflowError),
        ("crc32c_ptr nbytes", lambda: e.crc32c_ptr(p, BIG), OverflowError),
        ("crc32c_ptr negative", lambda: e.crc32c_ptr(p, -1), ValueError),
        ("crc32c_combine len", lambda: e.crc32c_combine(1, 2, HUGE), OverflowError),
        ("crc32c_combine crc", lambda: e.crc32c_combine(HUGE, 2, 1), ValueError),
        ("pool capacity", lambda: e.StagingPool(HUGE), OverflowError),
        ("pool capacity negative", lambda: e.StagingPool(-1), ValueError),
        ("pool alignment", lambda: e.StagingPool(4096, alignment=HUGE), OverflowError),
        ("pool alloc", lambda: pool.alloc(HUGE), OverflowError),
        ("pool alloc negative", lambda: pool.alloc(-1), ValueError),
        ("pool free", lambda: pool.free(HUGE), OverflowError),
        ("pool address", lambda: pool.address(HUGE), OverflowError),
        ("pool view", lambda: pool.view(0, HUGE), OverflowError),
        ("pool view wraps", lambda: pool.view(BIG - 1, BIG - 1), ValueError),
        ("copy threads", lambda: e.CopyEngine(HUGE), OverflowError),
        ("copy chunk", lambda: e.CopyEngine(1, HUGE), OverflowError),
        ("copy chunk negative", lambda: e.CopyEngine(1, -1), ValueError),
        ("submit src", lambda: eng.submit(HUGE, p, 1), OverflowError),
        ("submit dst negative", lambda: eng.submit(p, -p, 1), ValueError),
        ("submit nbytes", lambda: eng.submit(p, p, BIG), OverflowError),
        ("submit nbytes negative", lambda: eng.submit(p, p, -1), ValueError),
        ("submit device", lambda: eng.submit(p, p, 1, device=1 << 40), OverflowError),
        ("submit stream", lambda: eng.submit(p, p, 1, stream=-1), ValueError),
        ("write offset", lambda: e.write_segment(seg, [(HUGE, p, 1)]), OverflowError),
        ("write end", lambda: e.write_segment(seg, [(BIG - 5, p, 10)]), OverflowError),
        ("write nbytes", lambda: e.write_segment(seg, [(0, p, -1)]), ValueError),
        ("read offset", lambda: e.read_segment(seg, [(HUGE, p, 1, 0)]), OverflowError),
        ("read nbytes", lambda: e.read_segment(seg, [(0, p, BIG, 0)]), OverflowError),
        ("read negative", lambda: e.read_segment(seg, [(-1, p, 1, 0)]), ValueError),
    ], pool, eng


def test_bad_integers_are_value_or_overflow_errors(engine, tmp_path):
    buf = np.zeros(4096, dtype=np.uint8)
    calls, pool, eng = _calls(engine, buf, tmp_path)
    try:
        for name, call, expected in calls:
            with pytest.raises(expected) as info:
                call()
            assert not isinstance(info.value, TypeError), name
    finally:
        pool.close()
        eng.close()
    assert not buf[64:].any()


def test_bad_integers_give_the_same_error_on_both_backends(tmp_path):
    native, python = load_backend("native"), load_backend("python")
    buf = np.zeros(4096, dtype=np.uint8)
    (tmp_path / "n").mkdir()
    (tmp_path / "p").mkdir()
    n_calls, n_pool, n_eng = _calls(native, buf, tmp_path / "n")
    p_calls, p_pool, p_eng = _calls(python, buf, tmp_path / "p")
    try:
        for (name, n_call, _), (_, p_call, _) in zip(n_calls, p_calls):
            errors = []
            for call in (n_call, p_call):
                with pytest.raises(Exception) as info:
                    call()
                errors.append((type(info.value), str(info.value).replace(str(tmp_path / "p"), str(tmp_path / "n"))))
            assert errors[0] == errors[1], name
    finally:
        for closeable in (n_pool, n_eng, p_pool, p_eng):
            closeable.close()
