"""A pipeline's stage checkpoints (one run per stage) and the stages' agreement on a step.

Real files, a real gloo world of 3 processes (two stage holders and a spare); a hostile
member sends its own crafted offer through the same all-gather, and every honest member
refuses it by name instead of rolling back to a step that is not there.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from recoverkit import CheckpointOptions, RetentionPolicy, TierSpec
from recoverkit.elastic.stage_checkpoints import MAX_OFFERED, StageCheckpoints, agree_step
from recoverkit.errors import CheckpointNotFoundError, ConfigError, IntegrityError
from tests.distributed.harness import run_world


class Position:
    """A Stateful stand-in for the pipeline's position (any Stateful entry is saved alike)."""

    def __init__(self, steps: int = 0) -> None:
        self.steps = steps

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


def _model(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def test_each_stage_has_its_own_run_and_a_step_comes_back_exactly(tmp_path):
    ckpts = StageCheckpoints(str(tmp_path))
    models = {}
    for step in (1, 2, 3):
        models[step] = _model(step)
        ckpts.save(1, step, {"model": models[step], "pipeline": Position(step)})
    ckpts.save(0, 1, {"model": _model(9), "pipeline": Position(1)})
    ckpts.close()
    assert sorted(os.listdir(tmp_path)) == ["stage-0", "stage-1"]
    other = StageCheckpoints(str(tmp_path))  # another process: reads, never locks
    assert other.steps(1) == [1, 2, 3] and other.steps(0) == [1] and other.steps(7) == []
    target, pos = _model(0), Position()
    assert other.restore(1, 2, {"model": target, "pipeline": pos}) == 2
    assert pos.steps == 2
    for name, t in target.state_dict().items():
        assert torch.equal(t, models[2].state_dict()[name]), name
    with pytest.raises(CheckpointNotFoundError):
        other.restore(1, 5, {"model": _model(0), "pipeline": Position()})
    with pytest.raises(Exception, match="lacks"):  # an entry the saved step does not hold
        other.restore(0, 1, {"model": _model(0), "pipeline": Position(), "optimizer": Position()})


def test_bad_settings_are_refused_by_name(tmp_path):
    keep_one = CheckpointOptions(tiers=[TierSpec.local()], retention=RetentionPolicy(keep_last=1))
    with pytest.raises(ConfigError, match="keep the 2 newest"):
        StageCheckpoints(str(tmp_path), options=keep_one)
    with pytest.raises(ConfigError):
        StageCheckpoints("")
    ckpts = StageCheckpoints(str(tmp_path))
    for bad in (-1, True, "0", 2**40):
        with pytest.raises(ConfigError):
            ckpts.path(bad)  # type: ignore[arg-type]


def _agree(rank: int, world: int, case: str) -> object:
    import torch.distributed as dist

    held = {0: [1, 3, 5, 6], 1: [1, 3, 5]}
    stage = rank if rank < 2 else None
    if case == "honest":
        return [
            agree_step(held.get(rank), stage=stage, num_stages=2),
            agree_step(held.get(rank), stage=stage, num_stages=2, upto=4),
            agree_step({0: [2], 1: [1]}.get(rank), stage=stage, num_stages=2),
        ]
    if rank == 2:  # the hostile member: its own row through the same all-gather
        row = torch.full((2 + MAX_OFFERED,), -1.0, dtype=torch.float64)
        row[0], row[1], row[2] = {
            "twice": (0.0, 1.0, 5.0),  # claims stage 0, which rank 0 holds
            "count": (1.0, 99.0, 5.0),  # more steps than the row holds
            "nan": (1.0, 1.0, math.nan),
            "late": (1.0, 1.0, 7.0),  # a step past the bound asked for
            "stage": (5.0, 1.0, 1.0),  # no such stage
            "unreadable": (1.0, -1.0, -1.0),  # its run could not be listed
        }[case]
        got = [torch.zeros_like(row) for _ in range(world)]
        dist.all_gather(got, row)
        return "sent"
    try:
        agree_step(held.get(rank), stage=stage, num_stages=2, upto=6)
    except IntegrityError as e:
        return f"refused: {e}"
    return "accepted"


def test_the_stages_agree_on_the_newest_step_every_run_committed():
    results = run_world(3, _agree, "honest")
    assert results == [[5, 3, None]] * 3, results


@pytest.mark.parametrize("case", ["twice", "count", "nan", "late", "stage", "unreadable"])
def test_a_crafted_offer_is_refused_by_every_honest_member(case):
    results = run_world(3, _agree, case)
    assert results[2] == "sent"
    want = "refused: rank 2 cannot list" if case == "unreadable" else "refused: rank 2 offered"
    for got in results[:2]:
        assert isinstance(got, str) and got.startswith(want), results


def _damaged(rank: int, world: int, root: str) -> object:
    """Stage 0's step 2 is torn on disk (or holds the position of another step); stage 1's is
    whole. Every member gives step 2 up together and both stages load step 1 (a member
    holding none, rank 2, takes part); with no older step every member raises."""
    ckpts = StageCheckpoints(root)
    stage = rank if rank < 2 else None
    target = {"model": _model(0), "pipeline": Position()} if stage is not None else None
    pipeline = target["pipeline"] if target is not None else None
    try:
        got = ckpts.roll_back(stage, 2, target, None, position=lambda: pipeline.steps if pipeline else -1)
    except IntegrityError as e:
        return f"raised: {e}"
    if target is None:
        return [got, None]
    return [got, target["pipeline"].steps, [t.tolist() for t in target["model"].state_dict().values()]]


@pytest.mark.parametrize("fault", ["torn", "position"])
def test_a_step_one_stage_cannot_load_is_given_up_by_every_member(tmp_path, fault):
    ckpts = StageCheckpoints(str(tmp_path))
    saved = {}
    for stage in (0, 1):
        for step in (1, 2):
            saved[stage, step] = _model(10 * stage + step)
            pos = 3 if (fault, stage, step) == ("position", 0, 2) else step  # a crafted position
            ckpts.save(stage, step, {"model": saved[stage, step], "pipeline": Position(pos)})
    ckpts.close()
    if fault == "torn":
        seg = tmp_path / "stage-0" / "step-000000002" / "rank-00000.seg"
        data = bytearray(seg.read_bytes())
        data[len(data) // 2] ^= 0xFF  # inside the tensors' bytes: the checksum catches it
        seg.write_bytes(bytes(data))
    results = run_world(3, _damaged, str(tmp_path))
    assert results[2] == [1, None]
    for stage in (0, 1):
        step, pos, tensors = results[stage]
        assert step == 1 and pos == 1, results[stage]
        assert tensors == [t.tolist() for t in saved[stage, 1].state_dict().values()]
    # with no older step left, every member raises, naming the steps given up
    for stage in (0, 1):
        shutil.rmtree(tmp_path / f"stage-{stage}" / "step-000000001")
    results = run_world(3, _damaged, str(tmp_path))
    for got in results:
        assert isinstance(got, str) and got.startswith("raised: ") and "step(s) [2]" in got, results
