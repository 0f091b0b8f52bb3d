"""``recoverkit gc`` and the trainer's retention cannot disagree: given the same steps and
the same knowledge of their data, they keep and delete the same steps.

Real roots: a few committed steps, some with a flipped data byte (manifests intact). gc runs
as the command does (its CRC pass, ``--yes``) on one copy; the trainer's
:func:`apply_retention` runs on another copy with what a reader would know of the same
steps, learned here from which bytes were flipped, not from gc.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy
from recoverkit.cli.gc import gc, known_by_crc_pass, plan_gc
from recoverkit.storage.discovery import apply_retention, decide_retention
from recoverkit.storage.local import LocalTier

STEPS = (1, 2, 3, 4, 5, 6)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("one_rule") / "ckpt")
    with Checkpointer(
        root, options=CheckpointOptions(retention=RetentionPolicy(keep_last=None))
    ) as ckpt:
        for s in STEPS:
            ckpt.save(s, {"w": torch.full((256,), float(s)), "b": torch.arange(64) * s})
    return root


def _rot(root: str, step: int) -> None:
    """Flip one byte inside a tensor shard of ``step`` (its manifest stays valid)."""
    tier = LocalTier(root)
    rec = next(s for t in tier.manifest(step).tensors.values() for s in t.shards if s.nbytes > 0)
    with open(os.path.join(tier.step_path(step), rec.file), "r+b") as f:
        f.seek(rec.offset)
        byte = f.read(1)
        f.seek(rec.offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _copy(src: str, rotten: set[int]) -> str:
    dst = os.path.join(tempfile.mkdtemp(prefix="rk-one-rule-"), "ckpt")
    shutil.copytree(src, dst)
    for s in rotten:
        _rot(dst, s)
    return dst


def _left(root: str) -> list[int]:
    return LocalTier(root).steps()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rotten=st.sets(st.sampled_from(STEPS)),
    keep_last=st.integers(min_value=1, max_value=4),
    keep_every=st.none() | st.integers(min_value=2, max_value=3),
    delete_damaged=st.booleans(),
)
def test_gc_and_the_trainers_retention_decide_alike(
    pristine, rotten, keep_last, keep_every, delete_damaged
):
    by_gc, by_trainer = _copy(pristine, rotten), _copy(pristine, rotten)
    try:
        # what a reader knows of the data: the newest step not rotten is good, the rotten ones
        # newer than it are bad (gc's CRC pass stops at the first step that passes)
        fine = [s for s in STEPS if s not in rotten]
        good = [max(fine)] if fine else []
        bad = {s for s in rotten if not good or s > good[0]}
        tier = LocalTier(by_gc)
        found_good, found_bad = known_by_crc_pass(tier)
        assert (sorted(found_good), set(found_bad)) == (good, bad)

        policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
        plan = plan_gc(tier, keep_last, keep_every, delete_damaged=delete_damaged)
        rule = decide_retention(STEPS, policy, good=good, bad=bad, delete_bad=delete_damaged)
        assert [(d.step, d.keep, d.damaged) for d in plan] == [
            (d.step, d.keep, d.damaged) for d in rule
        ]

        args = [by_gc, "--keep-last", str(keep_last), "--yes", "--json"]
        args += ["--keep-every", str(keep_every)] if keep_every else []
        args += ["--delete-damaged"] if delete_damaged else []
        result = CliRunner().invoke(gc, args)
        assert result.exit_code == 0, result.output
        deleted_by_gc = json.loads(result.output)["deleted"]
        deleted_by_trainer = apply_retention(
            LocalTier(by_trainer), policy, good=good, bad=bad, delete_bad=delete_damaged
        )
        assert sorted(deleted_by_gc) == deleted_by_trainer
        assert _left(by_gc) == _left(by_trainer)
        if good:  # the newest step whose data is known good survives both
            assert good[0] in _left(by_gc)
        assert delete_damaged or bad <= set(_left(by_gc))  # known-bad steps stay as evidence
    finally:
        shutil.rmtree(os.path.dirname(by_gc))
        shutil.rmtree(os.path.dirname(by_trainer))


def test_known_steps_given_with_how_they_were_learned_say_so():
    decisions = decide_retention(
        [1, 2, 3],
        RetentionPolicy(keep_last=1),
        good={1: "restored from"},
        bad={3: "crc32c mismatch"},
    )
    why = {d.step: d.reason for d in decisions}
    assert why[1] == "restored from (never deleted)"
    assert why[3].startswith("DAMAGED") and why[3].endswith(": crc32c mismatch")
    # the same knowledge as plain steps decides the same
    plain = decide_retention([1, 2, 3], RetentionPolicy(keep_last=1), good=[1], bad=[3])
    assert [(d.step, d.keep, d.damaged) for d in plain] == [
        (d.step, d.keep, d.damaged) for d in decisions
    ]
