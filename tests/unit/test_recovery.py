"""Recovery strategies and the chain: which strategy is used, what "cannot" carries, tier fallback
over real tiers (damaged steps skipped, lost tiers not read), and the reader's strategy seam."""

from __future__ import annotations

import logging
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from recoverkit import Checkpointer, CheckpointReader
from recoverkit.errors import CheckpointNotFoundError, IncompatibleCheckpointError, IntegrityError
from recoverkit.recovery import (
    CannotRecover,
    Loss,
    Recovered,
    RecoveryChain,
    RecoveryStrategy,
    Survivors,
    TierFallback,
    TierSource,
)
from recoverkit.storage.discovery import CheckpointSkippedWarning
from recoverkit.storage.local import LocalTier


def _state(value: float) -> dict[str, Any]:
    return {"w": torch.full((4096,), value), "note": f"v{value}"}


def _save(root: str, *steps: int) -> None:
    with Checkpointer(root) as ckpt:
        for s in steps:
            ckpt.save(s, _state(float(s)))


def _flip_data_byte(root: str, step: int, value: float) -> None:
    """Flip one byte of tensor data (not padding) in ``step``'s segment file."""
    d = os.path.join(root, f"step-{step:09d}")
    (seg,) = [f for f in os.listdir(d) if f.endswith(".seg")]
    path = os.path.join(d, seg)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        at = data.index(struct.pack("<f", value) * 4) + 8
        data[at] ^= 0x40
        f.seek(0)
        f.write(data)


class OtherDisk(LocalTier):
    """A second real local tier under another name (as a host or peer tier will be)."""

    name = "other"


@dataclass(frozen=True)
class MemorySource:
    """A state held in memory (what a peer replica will hand over), as a recovery Source."""

    step: int
    state: dict[str, Any]
    manifest: Any = None
    tier_name: str | None = None

    def describe(self) -> str:
        return f"memory copy of step {self.step}"

    def read(
        self, *, rank: int, allow_pickle: bool, sharded: Any = None, entries: Any = None
    ) -> dict[str, Any]:
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.state.items()}


class FromMemory(RecoveryStrategy):
    """A strategy over an in-memory copy, if it holds the step wanted."""

    name = "memory"

    def __init__(self, copies: dict[int, dict[str, Any]]) -> None:
        self.copies, self.calls = copies, 0

    def recover(self, loss, survivors, use):
        self.calls += 1
        step = max(self.copies) if loss.step is None and self.copies else loss.step
        if step not in self.copies:
            return CannotRecover(self.name, f"no copy of step {step}")
        source = MemorySource(step, self.copies[step])
        return Recovered(self.name, source, use(source))


class Never(RecoveryStrategy):
    name = "never"

    def __init__(self, error: BaseException | None = None) -> None:
        self.error, self.calls = error, 0

    def recover(self, loss, survivors, use):
        self.calls += 1
        return CannotRecover(self.name, "nothing survives", self.error)


# ------------------------------------------------------------------ the interface
def test_loss_describes_what_was_lost_and_validates():
    loss = Loss(step=3, ranks=[1, 2], tiers={"host"})
    assert (
        loss.ranks == frozenset({1, 2})
        and loss.tiers == frozenset({"host"})
        and loss.stages == frozenset()
    )
    with pytest.raises(ValueError, match="step"):
        Loss(step=-1)
    with pytest.raises(TypeError):
        Loss(3)  # keyword-only


def test_the_chain_uses_the_first_strategy_that_can_and_logs_it(caplog):
    never, memory = Never(), FromMemory({5: _state(5.0)})
    chain = RecoveryChain([never, memory, Never()])
    with caplog.at_level(logging.INFO, logger="recoverkit.recovery"):
        got = chain.run(Loss(), Survivors(), lambda source: source.read(rank=0, allow_pickle=False))
    assert (
        got.strategy == "memory"
        and got.step == 5
        and torch.equal(got.value["w"], torch.full((4096,), 5.0))
    )
    assert never.calls == 1 and memory.calls == 1
    assert (
        "recovered step 5 with memory from memory copy of step 5; never could not: nothing survives"
        in caplog.text
    )


def test_when_no_strategy_can_the_last_error_is_raised_with_every_reason():
    chain = RecoveryChain(
        [
            Never(IntegrityError("step 4 is damaged")),
            Never(),
            Never(CheckpointNotFoundError("none")),
        ]
    )
    with pytest.raises(CheckpointNotFoundError, match="none") as caught:
        chain.run(Loss(step=4), Survivors(), lambda s: s)
    assert caught.value.__notes__ == ["never could not recover step 4: nothing survives"] * 3
    with pytest.raises(
        CheckpointNotFoundError, match="no strategy could recover the newest step: never: nothing"
    ):
        RecoveryChain([Never()]).run(Loss(), Survivors(), lambda s: s)
    with pytest.raises(ValueError):
        RecoveryChain([])


def test_an_error_of_the_callers_request_ends_the_chain():
    memory, later = FromMemory({2: _state(2.0)}), FromMemory({2: _state(2.0)})

    def use(source):
        raise IncompatibleCheckpointError("does not fit")

    with pytest.raises(IncompatibleCheckpointError):
        RecoveryChain([memory, later]).run(Loss(), Survivors(), use)
    assert later.calls == 0


# ------------------------------------------------------------------ tier fallback
def test_tier_fallback_takes_the_newest_step_from_the_fastest_tier(tmp_path):
    fast, slow = str(tmp_path / "fast"), str(tmp_path / "slow")
    _save(fast, 1, 2)
    _save(slow, 1, 2, 3)
    tiers = [OtherDisk(fast), LocalTier(slow)]
    got = TierFallback().recover(Loss(), Survivors(tiers=tiers), lambda s: s)
    assert isinstance(got, Recovered) and got.step == 3 and got.source.tier_name == "local"
    got = TierFallback().recover(Loss(step=2), Survivors(tiers=tiers), lambda s: s)
    assert got.step == 2 and got.source.tier_name == "other"
    assert isinstance(got.source, TierSource) and got.source.manifest.step == 2
    # a lost tier is not read, even if it is still there
    got = TierFallback().recover(Loss(step=2, tiers={"other"}), Survivors(tiers=tiers), lambda s: s)
    assert got.source.tier_name == "local"
    state = got.source.read(rank=0, allow_pickle=False)
    assert torch.equal(state["w"], torch.full((4096,), 2.0)) and state["note"] == "v2.0"


def test_tier_fallback_skips_a_damaged_step_warns_and_reports_it(root):
    _save(root, 1, 2)
    _flip_data_byte(root, 2, 2.0)
    learned = []
    strategy = TierFallback(label="run", learn=lambda tier, **kw: learned.append((tier, kw)))

    def use(source):
        return source.read(rank=0, allow_pickle=False)

    with pytest.warns(CheckpointSkippedWarning, match="crc32c mismatch"):
        got = strategy.recover(Loss(), Survivors(tiers=[LocalTier(root)]), use)
    assert got.step == 1 and torch.equal(got.value["w"], torch.full((4096,), 1.0))
    assert learned == [("local", {"bad": 2})]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointSkippedWarning)
        asked = strategy.recover(Loss(step=2), Survivors(tiers=[LocalTier(root)]), use)
    assert isinstance(asked, CannotRecover) and isinstance(asked.error, IntegrityError)
    nothing = strategy.recover(Loss(step=9), Survivors(tiers=[LocalTier(root)]), use)
    assert isinstance(nothing, CannotRecover) and isinstance(nothing.error, CheckpointNotFoundError)
    assert str(nothing.error) == "run: no valid step 9"


# ------------------------------------------------------------------ the reader's seam
def test_the_reader_tries_its_strategies_in_order_and_falls_back_to_the_tiers(root):
    _save(root, 1, 2)
    memory = FromMemory({3: _state(3.0)})
    reader = CheckpointReader(root, strategies=[memory, TierFallback(label=root)])
    target = {"w": torch.zeros(4096), "note": None}
    assert reader.restore(target, restore_rng=False) == 3  # the newer in-memory copy first
    assert torch.equal(target["w"], torch.full((4096,), 3.0)) and target["note"] == "v3.0"
    assert reader.restore(target, step=2, restore_rng=False) == 2  # memory has no step 2: the tiers
    assert torch.equal(target["w"], torch.full((4096,), 2.0)) and memory.calls == 2


def test_the_default_reader_recovers_through_tier_fallback(root, caplog):
    _save(root, 1, 2)
    reader = CheckpointReader(root)
    assert [type(s) for s in reader.chain.strategies] == [TierFallback]
    with caplog.at_level(logging.INFO, logger="recoverkit.recovery"):
        assert reader.restore({"w": torch.zeros(4096), "note": None}, restore_rng=False) == 2
    assert "with tier fallback from" in caplog.text
