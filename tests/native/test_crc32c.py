"""CRC-32C on both backends: known vectors, chaining, buffer kinds, raw pointers, combine."""

from __future__ import annotations

import ctypes

import google_crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import ptr, random_bytes

# RFC 3720 (iSCSI) appendix B.4 and the usual check value.
ISCSI_READ_PDU = bytes.fromhex(
    "01c00000000000000000000000000000" "14000000000004000000001400000018"
    "28000000000000000200000000000000"
)
VECTORS = [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (ISCSI_READ_PDU, 0xD9963A56),
]


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_known_vectors(engine, data, expected):
    assert engine.crc32c(data) == expected
    assert engine.crc32c(bytearray(data)) == expected
    assert engine.crc32c(memoryview(data)) == expected
    assert engine.crc32c(np.frombuffer(data, dtype=np.uint8)) == expected


def test_incremental_equals_whole(engine):
    data = random_bytes(100_003).tobytes()
    for cut in (0, 1, 7, 8, 9, 4096, 50_000, 100_003):
        assert engine.crc32c(data[cut:], engine.crc32c(data[:cut])) == engine.crc32c(data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), seed=st.integers(0, 2**32 - 1))
def test_matches_google_crc32c(engine, data, seed):
    assert engine.crc32c(data, seed) == google_crc32c.extend(seed, data)


@pytest.mark.parametrize("n", [0, 1, 7, 255, 256 * 3 + 5, 8192 * 3, 8192 * 3 + 17, 1 << 20, (1 << 20) + 13])
@pytest.mark.parametrize("misalign", [0, 1, 3, 7])
def test_sizes_and_alignments(engine, n, misalign):
    buf = random_bytes(n + 8, seed=n)
    data = buf[misalign:misalign + n]
    expected = google_crc32c.value(data.tobytes())
    assert engine.crc32c(data) == expected
    assert engine.crc32c_ptr(ptr(data), n) == expected


def test_multidimensional_and_typed_arrays(engine):
    a = np.arange(1000, dtype=np.float32).reshape(10, 100)
    assert engine.crc32c(a) == google_crc32c.value(a.tobytes())


def test_non_contiguous_buffer_rejected(engine):
    a = np.arange(100, dtype=np.uint8)[::2]
    with pytest.raises(BufferError):
        engine.crc32c(a)
    with pytest.raises(TypeError):
        engine.crc32c("not bytes")


def test_ptr_variant_and_errors(engine):
    raw = ctypes.create_string_buffer(b"123456789", 9)
    address = ctypes.addressof(raw)
    assert engine.crc32c_ptr(address, 9) == 0xE3069283
    assert engine.crc32c_ptr(address + 4, 5, engine.crc32c_ptr(address, 4)) == 0xE3069283
    assert engine.crc32c_ptr(0, 0) == 0
    assert engine.crc32c_ptr(0, 0, 1234) == 1234
    with pytest.raises(ValueError):
        engine.crc32c_ptr(0, 1)
    with pytest.raises(ValueError):
        engine.crc32c_ptr(address, -1)
    with pytest.raises(ValueError):
        engine.crc32c(b"x", -1)
    with pytest.raises(ValueError):
        engine.crc32c(b"x", 1 << 32)


@settings(max_examples=100, deadline=None)
@given(a=st.binary(max_size=500), b=st.binary(max_size=5000))
def test_combine(engine, a, b):
    whole = engine.crc32c(a + b)
    assert engine.crc32c_combine(engine.crc32c(a), engine.crc32c(b), len(b)) == whole


def test_combine_large_lengths(engine):
    a, zeros = b"prefix", bytes(2 << 20)
    assert engine.crc32c_combine(engine.crc32c(a), engine.crc32c(zeros), len(zeros)) == engine.crc32c(a + zeros)
    # associativity at lengths far beyond memory: (x . y) . z == x . (y . z)
    x, y, z = 0x12345678, 0x9ABCDEF0, 0x0F0F0F0F
    ly, lz = (5 << 30) + 3, (1 << 40) + 11
    left = engine.crc32c_combine(engine.crc32c_combine(x, y, ly), z, lz)
    right = engine.crc32c_combine(x, engine.crc32c_combine(y, z, lz), ly + lz)
    assert left == right
    assert engine.crc32c_combine(x, 0, 0) == x


def test_hardware_flag_is_bool(engine):
    assert isinstance(engine.hardware_crc32c(), bool)
    assert isinstance(engine.cuda_available(), bool)


@pytest.mark.parametrize("n", [0, 1, 9, 100, 8191, 24576, 100_000])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_native_hardware_and_software_agree(native, n, offset):
    data = random_bytes(n + offset, seed=n + offset)[offset:]
    assert native._crc32c_software(data) == google_crc32c.value(data.tobytes())
    assert native._crc32c_software(data, 0xDEADBEEF) == native.crc32c(data, 0xDEADBEEF)
    assert native._crc32c_software(b"123456789") == 0xE3069283


def test_native_reports_hardware_on_sse42(native):
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if " sse4_2" in flags:
        assert native.hardware_crc32c()
