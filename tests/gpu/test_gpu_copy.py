"""Device-to-host copies through the native engine on a real GPU (skipped without CUDA).

The copy must be ordered after work enqueued on the producing stream: each test queues a
long GPU spin and then an in-place op on that stream, submits the copy with that stream,
and checks that the bytes that land on the host already include the op.
"""

from __future__ import annotations

import pytest
import torch

from recoverkit._native import load

pytestmark = pytest.mark.gpu

SPIN_CYCLES = 200_000_000  # ~0.1 s of GPU time: without ordering, the copy would see old data


@pytest.fixture
def native():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        eng = load("native")
    except ImportError as e:
        pytest.fail(f"a GPU machine must have the native engine: {e}")
    assert eng.cuda_available()
    return eng


def _expected(n: int, factor: float) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) * factor


@pytest.mark.parametrize("chunk_bytes", [8 << 20, 1 << 20])
def test_copy_waits_for_side_stream(native, chunk_bytes):
    n = 4 << 20  # 16 MiB of float32: several chunks at 1 MiB
    x = torch.arange(n, dtype=torch.float32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(SPIN_CYCLES)
        x.mul_(2)
    nbytes = x.numel() * x.element_size()
    with native.StagingPool(nbytes) as pool, native.CopyEngine(chunk_bytes=chunk_bytes) as eng:
        assert pool.cuda_registered
        off = pool.alloc(nbytes)
        h = eng.submit(x.data_ptr(), pool.address(off), nbytes, device=x.device.index,
                       stream=side.cuda_stream)
        crc = h.result(timeout_s=60)
        out = torch.frombuffer(pool.view(off, nbytes), dtype=torch.float32)
        expected = _expected(n, 2)
        assert torch.equal(out, expected)
        assert crc == native.crc32c(expected.numpy())
    torch.cuda.synchronize()


def test_copy_on_legacy_default_stream(native):
    n = 1 << 20
    x = torch.arange(n, dtype=torch.float32, device="cuda")
    torch.cuda._sleep(SPIN_CYCLES)
    x.mul_(3)  # on the current (legacy default) stream, handle 0
    assert torch.cuda.current_stream().cuda_stream == 0
    host = torch.empty(n, dtype=torch.float32)
    with native.CopyEngine() as eng:  # pageable destination: slower, still correct
        h = eng.submit(x.data_ptr(), host.data_ptr(), host.nbytes, device=x.device.index, stream=0)
        assert h.result(timeout_s=60) == native.crc32c(_expected(n, 3).numpy())
    assert torch.equal(host, _expected(n, 3))


def test_many_device_copies_and_crc_off(native):
    xs = [torch.full((1000 + i,), float(i), device="cuda") for i in range(32)]
    stream = torch.cuda.current_stream().cuda_stream
    with native.StagingPool(1 << 20) as pool, native.CopyEngine(num_threads=2) as eng:
        offs = [pool.alloc(x.nbytes) for x in xs]
        hs = [eng.submit(x.data_ptr(), pool.address(o), x.nbytes, device=0, stream=stream,
                         crc=bool(i % 2)) for i, (x, o) in enumerate(zip(xs, offs))]
        for i, (x, o, h) in enumerate(zip(xs, offs, hs)):
            crc = h.result(timeout_s=60)
            got = torch.frombuffer(pool.view(o, x.nbytes), dtype=torch.float32)
            assert torch.equal(got, x.cpu())
            assert crc == (native.crc32c(pool.view(o, x.nbytes)) if i % 2 else 0)


def test_fallback_refuses_device_sources():
    fallback = load("python")
    with fallback.CopyEngine() as eng, pytest.raises(RuntimeError, match="no CUDA driver"):
        eng.submit(1, 1, 1, device=0)
