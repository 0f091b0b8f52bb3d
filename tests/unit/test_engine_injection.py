"""The copy/IO engine is injected everywhere it is used: a file system, a checksum helper or a
Checkpointer given an engine computes with that engine and never with the process-wide one.

The engines here are real ones (the native engine when it is built, the pure-Python fallback
``recoverkit._fallback``) wrapped in a :class:`Recording` engine that notes every name asked
of it and otherwise is the engine it wraps. The process-wide default is replaced by such a
recording of itself, so any use of it, however indirect, is seen.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy, _native
from recoverkit.format.checksum import crc32c, crc32c_ptr
from recoverkit.reading import ReadOnlyFS
from recoverkit.storage.faults import FaultInjector, FaultyFS
from recoverkit.storage.fs import LocalFS


class Recording:
    """An engine that is ``inner``, noting the name of every attribute asked of it."""

    def __init__(self, inner: object, name: str) -> None:
        self.inner = inner
        self.name = name
        self.used: list[str] = []

    def __getattr__(self, attr: str) -> object:
        self.used.append(attr)
        return getattr(self.inner, attr)

    def __repr__(self) -> str:
        return f"<{self.name} engine>"


@pytest.fixture
def default(monkeypatch: pytest.MonkeyPatch) -> Recording:
    """The process-wide engine, recorded: whatever reaches it shows up in ``.used``."""
    recording = Recording(_native.engine, "process-wide")
    monkeypatch.setattr(_native, "engine", recording)
    return recording


@pytest.fixture
def given() -> Recording:
    """The engine handed in: the pure-Python fallback, a different engine from the default."""
    return Recording(_native.load("python"), "injected")


def _segment_round_trip(fs: LocalFS, path: str) -> torch.Tensor:
    src = torch.arange(4096, dtype=torch.uint8)
    crcs = fs.write_segment(path, [(0, int(src.data_ptr()), src.numel())], crc=True)
    assert crcs == [crc32c(src.numpy().tobytes(), engine=_native.load("python"))]
    out = torch.zeros_like(src)
    fs.read_segment(path, [(0, int(out.data_ptr()), out.numel(), crcs[0])])
    return out


def test_a_file_system_writes_and_reads_segments_with_its_own_engine(tmp_path, default, given):
    out = _segment_round_trip(LocalFS(engine=given), str(tmp_path / "rank-00000.seg"))
    assert torch.equal(out, torch.arange(4096, dtype=torch.uint8))
    assert {"write_segment", "read_segment"} <= set(given.used)
    assert default.used == []


def test_wrapped_file_systems_use_the_engine_of_the_one_they_wrap(tmp_path, default, given):
    faults = FaultInjector()
    faulty = FaultyFS(faults, inner=LocalFS(engine=given))
    _segment_round_trip(faulty, str(tmp_path / "a.seg"))
    assert given.used.count("write_segment") == 1 and given.used.count("read_segment") == 1
    reader = ReadOnlyFS(LocalFS(engine=given))
    out = torch.zeros(4096, dtype=torch.uint8)
    crc = crc32c(torch.arange(4096, dtype=torch.uint8).numpy().tobytes())
    reader.read_segment(str(tmp_path / "a.seg"), [(0, int(out.data_ptr()), 4096, crc)])
    assert given.used.count("read_segment") == 2
    assert default.used == ["crc32c"]  # only the crc32c above, which was given no engine


def test_a_file_system_given_no_engine_uses_the_process_wide_one(tmp_path, default):
    _segment_round_trip(LocalFS(), str(tmp_path / "b.seg"))
    assert {"write_segment", "read_segment"} <= set(default.used)


def test_checksum_helpers_compute_with_the_engine_given(default, given):
    data = torch.arange(1000, dtype=torch.uint8)
    whole = crc32c(data.numpy().tobytes(), engine=given)
    assert crc32c_ptr(int(data.data_ptr()), 1000, engine=given) == whole
    assert (
        crc32c(
            data[500:].numpy().tobytes(),
            crc32c(data[:500].numpy().tobytes(), engine=given),
            engine=given,
        )
        == whole
    )
    assert given.used == ["crc32c", "crc32c_ptr", "crc32c", "crc32c"]
    assert default.used == []
    assert crc32c(data.numpy().tobytes()) == whole  # no engine: the process-wide one
    assert default.used == ["crc32c"]


def test_a_checkpointer_given_the_fallback_engine_never_touches_the_process_wide_one(
    root, default, given
):
    from recoverkit.restore.verify import verify_step
    from recoverkit.storage.local import LocalTier

    state = {"w": torch.randn(1000), "b": torch.arange(17), "step": 3, "name": "run"}
    options = CheckpointOptions(retention=RetentionPolicy(keep_last=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with Checkpointer(root, options=options, engine=given) as ckpt:
            ckpt.save(1, state)
            ckpt.save(2, state)  # retention deletes step 1
            target = {
                "w": torch.zeros(1000),
                "b": torch.zeros(17, dtype=torch.int64),
                "step": 0,
                "name": "",
            }
            ckpt.restore(target)
    assert torch.equal(target["w"], state["w"]) and target["step"] == 3
    assert os.listdir(root)
    report = verify_step(LocalTier(root, fs=LocalFS(engine=given)), 2)
    assert report.ok
    assert {"write_segment", "read_segment", "crc32c"} <= set(given.used)
    assert default.used == [], f"the process-wide engine was used for {sorted(set(default.used))}"
