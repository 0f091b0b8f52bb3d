"""Checkpoint-restart of a pipeline job: the fallback when a loss cannot be recovered in process.

The 4-stage byte-level pipeline of test_checkfree_pipeline.py (ScheduleGPipe over gloo, one
stage per process, no spare) runs under one torchrun agent with ``--max-restarts=1``. Every
stage saves its module, its AdamW and its :class:`~recoverkit.elastic.pipeline.StagePipeline`
position (completed steps, the last step's gradient norms) to its run of a
:class:`~recoverkit.elastic.StageCheckpoints` on local disk after every step. The test SIGKILLs
stage 2's worker inside step ``KILL_STEP``; torchrun stops the other workers and restarts all
four, each rolls back to the newest step every stage committed (``StagePipeline.resume``) and
the job finishes. The in-process variant: a lost stage that no strategy can rebuild (an edge
stage, without CheckFree+ or a replica), or several stages lost with one node, roll every
stage back without a restart.

Checked: every stage resumes at ``KILL_STEP`` (a save every step loses no step), and every
stage's state after every step, every loss and every learning rate equal the failure-free
run's bit for bit (the warm-up schedule continues on the global step). A position of another
stage is refused by name.

Figures (printed, never asserted; :func:`restart_figures`, published by
``python -m tests.integrations.test_checkfree_pipeline`` beside the in-process recovery's):
SIGKILL -> every new worker started (torchrun's detection, the other workers stopped, the
workers relaunched), its interpreter and imports, the pipeline formed, the state restored,
the first step done; each the slowest process's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from recoverkit.elastic.pipeline_options import validate_position
from recoverkit.errors import IncompatibleCheckpointError
from tests.integrations import checkfree_pipeline_worker as W
from tests.integrations import test_checkfree_pipeline as P
from tests.integrations.test_elastic_shrink import _end, _pids
from tests.integrations.test_torchrun_restart import REPO, torchrun_env


def run_restart(base: str) -> str:
    """One agent, 4 workers, one restart allowed; stage ``VICTIM``'s worker SIGKILLed inside
    step KILL_STEP. Returns the run's directory once the job ended with success."""
    out = os.path.join(base, "restart")
    os.makedirs(out, exist_ok=True)
    cmd = P._torchrun() + [
        "--standalone",
        f"--nproc-per-node={W.NUM_STAGES}",
        "--max-restarts=1",
        "--monitor-interval=0.1",
    ]
    log_path = os.path.join(base, "agent-restart.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd + P._worker_args(out, "restart"),
            cwd=REPO,
            env=torchrun_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        P._wait_files(out, ["paused"], P.JOB_TIMEOUT_S, base)
        _, pid = _pids(out)[W.VICTIM]
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        with open(os.path.join(out, "killed"), "w") as f:
            f.write(repr(killed))
        try:
            code = proc.wait(timeout=P.JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        with open(log_path) as f:
            tail = f.read()[-4000:]
        assert code == 0, f"torchrun ended with {code}\n{tail}"
        return out
    finally:
        _end([proc], out)


def _timing(out: str, stage: int) -> dict:
    with open(os.path.join(out, f"restart-{stage}.json")) as f:
        return json.load(f)


def restart_figures(out: str) -> dict:
    """The slowest process's time from the SIGKILL to each phase of the restarted job."""
    with open(os.path.join(out, "killed")) as f:
        killed = float(f.read())
    rows = [_timing(out, s) for s in range(W.NUM_STAGES)]
    last = {k: max(r[k] for r in rows) for k in ("started", "imported", "formed", "restored", "first_step")}
    return {
        "relaunched_s": last["started"] - killed,
        "imported_s": last["imported"] - killed,
        "job_ready_s": last["formed"] - killed,
        "restored_s": last["restored"] - killed,
        "first_step_s": last["first_step"] - killed,
        "restore_s": max(r["restored"] - r["formed"] for r in rows),
        "import_s": max(r["imported"] - r["started"] for r in rows),
        "resumed_at": sorted({r["resumed_at"] for r in rows}),
    }


@pytest.fixture(scope="module")
def free(tmp_path_factory) -> str:
    return P.run_free(str(tmp_path_factory.mktemp("free")))


def test_torchrun_restarts_the_pipeline_from_its_checkpoint_bit_identical(tmp_path, free):
    out = run_restart(str(tmp_path))
    fig = restart_figures(out)
    print("checkpoint-restart of the pipeline:", json.dumps(fig))
    assert fig["resumed_at"] == [P.KILL_STEP], fig
    for stage in range(W.NUM_STAGES):
        assert _timing(out, stage)["started"] > float(open(os.path.join(out, "killed")).read())
        for step in range(P.STEPS):
            assert P._same(P._state(out, stage, step), P._state(free, stage, step)), (stage, step)
        # the restarted attempt logs the steps from KILL_STEP on: the last line of each step
        ran = {s["step"]: s for s in P._steps(out, stage)}
        want = {s["step"]: s for s in P._steps(free, stage)}
        assert sorted(ran) == list(range(P.STEPS)), sorted(ran)
        for step in range(P.STEPS):
            assert ran[step]["lr"] == want[step]["lr"] == [W.make_optimizer(W.build_stage(stage)).param_groups[0]["lr"]
                                                          * W.lr_factor(step)], (stage, step)
            if stage == W.NUM_STAGES - 1:
                assert ran[step]["loss"] == want[step]["loss"], step
        assert P._result(out, stage)["recoveries"] == []


def test_a_position_of_another_stage_or_a_crafted_one_is_refused():
    good = {"stage": 2, "num_stages": 4, "steps_done": 7, "norms": [0.5, float("nan"), 1.0, 0.25]}
    steps, norms = validate_position(good, 2, 4)
    assert steps == 7 and norms[0] == 0.5 and norms[1] != norms[1]
    bad = [
        ({**good, "stage": 1}, "saved stage 1, this process has 2"),
        ({**good, "num_stages": 5}, "saved num_stages 5"),
        ({**good, "steps_done": -1}, "steps_done must be"),
        ({**good, "steps_done": True}, "steps_done must be"),
        ({**good, "steps_done": 1 << 63}, "steps_done must be"),
        ({**good, "norms": [0.5, 1.0]}, "norms must be 4 floats"),
        ({**good, "norms": [0.5, -1.0, 1.0, 1.0]}, "norms must be"),
        ({**good, "norms": [0.5, float("inf"), 1.0, 1.0]}, "norms must be"),
        ({**good, "norms": [0.5, "1", 1.0, 1.0]}, "norms must be"),
        ({**good, "extra": 1}, "needs keys"),
        ([1, 2], "needs keys"),
        ({k: v for k, v in good.items() if k != "norms"}, "needs keys"),
    ]
    for state, message in bad:
        with pytest.raises(IncompatibleCheckpointError, match=message):
            validate_position(state, 2, 4)


def test_a_checkpointed_position_round_trips_through_the_checkpointer(tmp_path):
    """The position as the Checkpointer stores it (ints, a list of floats with NaN) comes back
    equal and passes the validation (a stage's norms are NaN before its first step)."""
    from recoverkit import Checkpointer
    from recoverkit.distributed.coordinator import LocalCoordinator

    class Position:
        def __init__(self, value: dict) -> None:
            self.value = value

        def state_dict(self) -> dict:
            return self.value

        def load_state_dict(self, state: dict) -> None:
            self.value = state

    saved = {"stage": 3, "num_stages": 4, "steps_done": 12, "norms": [0.125, float("nan"), 2.5, 1e-9]}
    model = torch.nn.Linear(2, 2)
    with Checkpointer(str(tmp_path), coordinator=LocalCoordinator()) as ckpt:
        ckpt.save(12, {"model": model, "pipeline": Position(dict(saved))})
    got = Position({})
    with Checkpointer(str(tmp_path), coordinator=LocalCoordinator()) as ckpt:
        ckpt.restore({"model": torch.nn.Linear(2, 2), "pipeline": got})
    steps, norms = validate_position(got.value, 3, 4)
    assert steps == 12 and norms[0] == 0.125 and norms[2] == 2.5 and norms[3] == 1e-9
    assert norms[1] != norms[1]


def rollback_figures(out: str) -> dict:
    """The in-process rollback as each process saw it: detection (SIGKILL -> its failed op),
    regroup, rollback (agreement + restore from disk), total; the slowest process's."""
    with open(os.path.join(out, "killed")) as f:
        killed = float(f.read())
    recs = [P._result(out, r)["recoveries"][0] for r in ("spare", *range(1, W.NUM_STAGES))]
    return {
        "detection_s": max(r["detected_at"] - killed for r in recs),
        "regroup_s": max(r["regroup_s"] for r in recs),
        "rollback_s": max(r["rebuild_s"] for r in recs),
        "recovery_s": max(r["total_s"] for r in recs),
        "rolled_back_to": sorted({r["rolled_back_to"] for r in recs}),
    }


def test_a_stage_no_strategy_can_rebuild_rolls_every_stage_back_in_process(tmp_path, free):
    """Stage 0, an edge stage (CheckFree refuses it; no replica), is lost inside step
    KILL_STEP; the job keeps stage checkpoints after every odd step. The spare takes stage 0
    and every stage rolls back in process to step KILL_STEP-1, the newest all committed (no
    process restarts: torchrun has --max-restarts=0); the steps redone and the rest of the
    run are bit-identical to the failure-free run."""
    out, logs = P.run_failure(str(tmp_path), "rollback", victim=0)
    k = P.KILL_STEP
    assert "checkfree cannot recover step 2: stage 0 is an edge stage" in logs
    res = P._result(out, "spare")
    assert res["took_stage"] == 0 and res["steps_done"] == P.STEPS, res
    (rec,) = res["recoveries"]
    assert rec["strategy"] == "checkpoint rollback" and rec["step"] == k and rec["lost"] == [0], rec
    assert rec["rolled_back_to"] == k - 1 and rec["source"].startswith(f"step {k - 1} of every stage's run")
    assert [s["step"] for s in P._steps(out, "spare")] == list(range(k - 1, P.STEPS))
    for stage in range(1, W.NUM_STAGES):
        r = P._result(out, stage)
        assert [x["rolled_back_to"] for x in r["recoveries"]] == [k - 1], r
        assert r["steps_done"] == P.STEPS
        # steps 0..k-1 once, step k-1 again after the rollback, then the rest
        assert [s["step"] for s in P._steps(out, stage)] == [*range(k), *range(k - 1, P.STEPS)]
    for stage in range(W.NUM_STAGES):
        for step in range(P.STEPS):
            assert P._same(P._state(out, stage, step), P._state(free, stage, step)), (stage, step)
    ran = {s["step"]: s for s in P._steps(out, W.NUM_STAGES - 1)}  # the last line of each step
    assert [ran[s]["loss"] for s in range(P.STEPS)] == [s["loss"] for s in P._steps(free, W.NUM_STAGES - 1)]
    assert [ran[s]["lr"] for s in range(P.STEPS)] == [s["lr"] for s in P._steps(free, W.NUM_STAGES - 1)]
    print("in-process rollback of the pipeline:", json.dumps(rollback_figures(out)))


def test_several_stages_lost_at_once_roll_back_in_process(tmp_path, free):
    """Stages 1 and 2 share the node that is lost (no strategy rebuilds two stages at once;
    CheckFree needs both neighbours of each): the two spares take them and every stage rolls
    back in process to step KILL_STEP-1; the run stays bit-identical to the failure-free one."""
    out, logs = P.run_failure(str(tmp_path), "rollback", victim=1, also=(2,), spares=("spare", "spare2"))
    k = P.KILL_STEP
    assert "stages [1, 2] were lost at once" in logs
    took = {P._result(out, s)["took_stage"] for s in ("spare", "spare2")}
    assert took == {1, 2}, took
    for role in ("spare", "spare2", 0, 3):
        r = P._result(out, role)
        (rec,) = r["recoveries"]
        assert rec["strategy"] == "checkpoint rollback" and rec["lost"] == [1, 2], (role, rec)
        assert rec["rolled_back_to"] == k - 1 and r["steps_done"] == P.STEPS, (role, rec)
    for stage in range(W.NUM_STAGES):
        for step in range(P.STEPS):
            assert P._same(P._state(out, stage, step), P._state(free, stage, step)), (stage, step)
    ran = {s["step"]: s for s in P._steps(out, W.NUM_STAGES - 1)}
    assert [ran[s]["loss"] for s in range(P.STEPS)] == [s["loss"] for s in P._steps(free, W.NUM_STAGES - 1)]
