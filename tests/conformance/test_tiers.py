"""Every tier passes the same suite: a bit-exact round trip, a SIGKILL at every commit phase,
a flipped byte in data or manifest, and retention that never deletes the newest good step.

The tiers are the entries of ``kit.CASES``; a part that does not apply to a tier is skipped
with that tier's reason. A new tier is one entry there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest

from recoverkit.config import RetentionPolicy
from recoverkit.errors import IntegrityError
from recoverkit.storage.discovery import CheckpointSkippedWarning, apply_retention
from recoverkit.storage.faults import PHASES, FaultInjector

from .kit import CASES, PARTS, TierCase, bits, state_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: phases after which the step is committed (the commit point is ``after_rename``'s)
COMMITTED = ("after_rename", "after_latest", "retention")


@pytest.fixture(params=sorted(CASES), ids=str)
def case(request) -> TierCase:
    return CASES[request.param]


def _applies(case: TierCase, part: str) -> None:
    assert part in PARTS
    why = case.not_applicable.get(part)
    if why is not None:
        pytest.skip(f"not applicable to the {case.name} tier: {why}")


@pytest.fixture
def where(tmp_path) -> str:
    return str(tmp_path / "store")


def _read_all(reader, step=None):
    """The whole state of ``step`` (default: the newest valid), as bits."""
    tree = reader.read(step)
    return tree.step, bits(dict(tree))


# ------------------------------------------------------------------ round trip
def test_round_trip_is_bit_exact(case, where):
    _applies(case, "round_trip")
    h = case.open(where)
    try:
        for step in (1, 2):
            h.save(step, state_for(step))
        reader = h.reader()
        assert reader.steps() == [1, 2]
        assert _read_all(reader) == (2, bits(state_for(2)))
        assert _read_all(reader, 1) == (1, bits(state_for(1)))
    finally:
        h.close()


def test_every_phase_is_announced_in_order(case, where):
    """The tier tells its injector the same commit phases as every other tier."""
    _applies(case, "crash")
    faults = FaultInjector()
    h = case.open(where, faults)
    try:
        h.save(1, state_for(1))
    finally:
        h.close()
    assert [p for p, _, _ in faults.seen] == list(PHASES)


# ------------------------------------------------------------------------ crash
_CHILD = textwrap.dedent(
    """
    import sys
    from recoverkit.distributed.coordinator import LocalCoordinator
    from recoverkit.storage.faults import FaultInjector
    from tests.conformance.kit import CASES, save_step, state_for

    name, where, phase = sys.argv[1:4]
    faults = FaultInjector().kill_at(phase=phase, step=2)
    tier = CASES[name].writer(where, faults)
    coordinator = LocalCoordinator()
    save_step(tier, coordinator, 1, state_for(1), faults, seq=1)
    save_step(tier, coordinator, 2, state_for(2), faults, seq=2)
    print("survived")
    """
)


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_every_phase_leaves_whole_steps_only(case, where, phase):
    """A writer killed at ``phase`` of step 2: a fresh reader sees step 1, or steps 1 and 2,
    each whole and bit-exact; never a partial step 2. A new writer then saves on top."""
    _applies(case, "crash")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, case.name, where, phase],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    h = case.open(where)
    try:
        reader = h.reader()
        expected = [1, 2] if phase in COMMITTED else [1]
        assert reader.steps() == expected
        for step in expected:
            assert _read_all(reader, step) == (step, bits(state_for(step)))
        with warnings.catch_warnings():
            warnings.simplefilter("error", CheckpointSkippedWarning)  # nothing partial to skip
            assert reader.latest() == expected[-1]
        h.save(3, state_for(3))  # what the crash left behind does not stop the next save
        assert _read_all(h.reader()) == (3, bits(state_for(3)))
    finally:
        h.close()


# ------------------------------------------------------------------- corruption
def test_a_flipped_data_byte_is_an_integrity_error_and_the_previous_step_is_used(case, where):
    _applies(case, "data_corruption")
    h = case.open(where)
    try:
        h.save(1, state_for(1))
        h.save(2, state_for(2))
        h.damage_data(2)
        reader = h.reader()
        with pytest.raises(IntegrityError), pytest.warns(CheckpointSkippedWarning):
            reader.read(2)  # asked for by number: its fault, not a fallback
        with pytest.warns(CheckpointSkippedWarning, match="step 2|step-000000002"):
            assert _read_all(reader) == (1, bits(state_for(1)))
    finally:
        h.close()


def test_a_flipped_manifest_byte_is_an_integrity_error_and_the_previous_step_is_used(case, where):
    _applies(case, "manifest_corruption")
    h = case.open(where)
    try:
        h.save(1, state_for(1))
        h.save(2, state_for(2))
        h.damage_manifest(2)
        tier = h.reader_tier()
        with pytest.raises(IntegrityError):
            tier.manifest(2)
        reader = h.reader()
        with pytest.warns(CheckpointSkippedWarning):
            assert reader.latest() == 1
        with pytest.warns(CheckpointSkippedWarning):
            assert _read_all(reader) == (1, bits(state_for(1)))
    finally:
        h.close()


# -------------------------------------------------------------------- retention
def test_retention_keeps_the_newest_good_step(case, where):
    """keep_last=1 keeps exactly the step just committed; a known-bad newest step is
    neither counted nor deleted, and the newest good one survives next to it."""
    _applies(case, "retention")
    h = case.open(where)
    try:
        for step in (1, 2, 3):
            h.save(step, state_for(step), retention=RetentionPolicy(keep_last=2))
        assert h.reader().steps() == [2, 3]
        assert h.save(4, state_for(4), retention=RetentionPolicy(keep_last=1)) == [2, 3]
        assert h.reader().steps() == [4]
        h.save(5, state_for(5))
        h.damage_data(5)
        tier = h.reader_tier()
        assert apply_retention(tier, RetentionPolicy(keep_last=1), good=[4], bad=[5]) == []
        with pytest.warns(CheckpointSkippedWarning):
            assert _read_all(h.reader()) == (4, bits(state_for(4)))
    finally:
        h.close()
