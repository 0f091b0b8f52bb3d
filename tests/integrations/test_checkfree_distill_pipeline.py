"""CheckFree's optional fit (``CheckFreeOptions.distill_steps``) on the real pipeline.

The job of test_checkfree_pipeline.py (a 4-stage byte-level model over gloo, one stage per
process plus a spare; stage 2's node SIGKILLed inside step KILL_STEP) in mode ``distill``:
every stage keeps its module's inputs and outputs of the last committed step, and the spare
rebuilds stage 2 as the neighbours' weighted average, then fits it for DISTILL_STEPS steps
to the pairs stage 1 (its outputs: stage 2's inputs) and stage 3 (its inputs: stage 2's
outputs) served. The test replays that offline from what the worker dumped (the neighbours'
states, norms and pairs after step KILL_STEP-1) and compares it with the rebuilt stage. In
mode ``distill_gap`` stage 3 holds no pairs (as a stage just rebuilt): the fit is skipped,
the log says why, and the rebuilt stage is the plain average.

The same under ``schedule="1f1b"`` (``distill_1f1b``) and with CheckFree+ on
(``distill_plus``: only the in-order, even micro-batches are recorded and served): the
served pairs are checked against an offline forward of the survivors' states through the
micro-batches of step KILL_STEP-1, in order, and the rebuilt stage against the offline fit.
In mode ``distill_lost`` stage 3's process (alone on a third node) SIGKILLs itself when the
rebuild asks for its inputs: the replacement tells the others to start over (RETRY), and
the next recovery, stages 2 and 3 both lost without stage checkpoints, fails on every
member with PipelineRecoveryError well before any transfer timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from tests.distributed.harness import free_port
from tests.integrations import checkfree_pipeline_worker as W
from tests.integrations.test_checkfree_pipeline import (
    JOB_TIMEOUT_S,
    KILL_STEP,
    SLACK_S,
    STEPS,
    _logs,
    _result,
    _same,
    _start_agent,
    _state,
    _steps,
    _wait_files,
    _wait_listening,
    _worker_args,
    run_failure,
)
from tests.integrations.test_elastic_shrink import _end, _pids


def _average(out: str) -> dict[str, torch.Tensor]:
    """Stage 2 as CheckFree rebuilds it: stages 1 and 3 after step KILL_STEP-1, weighted by
    their clipped gradient norms of that step (the survivors' own files of this run)."""
    from recoverkit.recovery.checkfree import CheckFreeOptions, average_neighbours

    k = KILL_STEP
    norms = _steps(out, 1)[k - 1]["norms"]
    return average_neighbours(
        _state(out, 1, k - 1),
        _state(out, 3, k - 1),
        norms[1],
        norms[3],
        CheckFreeOptions(),
        keys=list(W.build_stage(W.VICTIM).state_dict()),
    )


def _pairs(out: str, stage: int) -> dict | None:
    return torch.load(os.path.join(out, f"pairs-{stage}-{KILL_STEP - 1}.pt"), weights_only=True)


def _single_threaded(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _assert_rebuilt_as_replayed(out: str, rec: dict, inputs: list, outputs: list) -> None:
    """Offline replay: the average, then the same fit at the stage's base rate of step k;
    the rebuilt stage (and the fit's error in the record) must be that."""
    from recoverkit.recovery.checkfree import distill_stage

    module = W.build_stage(W.VICTIM)
    module.load_state_dict(_average(out))
    replay = _single_threaded(
        lambda: distill_stage(
            module, inputs, outputs, steps=W.DISTILL_STEPS, lr=3e-3 * W.lr_factor(KILL_STEP)
        )
    )
    assert f"(mse {replay.first_mse:.4g} -> {replay.last_mse:.4g})" in rec["source"], rec
    rebuilt = torch.load(os.path.join(out, f"rebuilt-{W.VICTIM}.pt"), weights_only=True)
    want = module.state_dict()
    assert rebuilt.keys() == want.keys()
    for key, value in rebuilt.items():
        assert torch.allclose(value, want[key], rtol=1e-5, atol=1e-6), key
    assert not _same(rebuilt, _average(out))  # the fit moved it


def _recomputed(out: str, micro: list[int]) -> tuple[list, list]:
    """Stage 2's inputs and outputs of step KILL_STEP-1's micro-batches ``micro``, in that
    order, recomputed offline: stages 0, 1 and 2 as they were after step KILL_STEP-2 (the
    weights that step ran with), over its batch split as the schedule splits it."""
    k = KILL_STEP
    stages = []
    for i in range(3):
        m = W.build_stage(i)
        m.load_state_dict(_state(out, i, k - 2))
        stages.append(m)
    xs = W.batch(k - 1)[0].tensor_split(W.MICRO)

    def run() -> tuple[list, list]:
        ins, outs = [], []
        with torch.no_grad():
            for j in micro:
                h = stages[1](stages[0](xs[j]))
                ins.append(h)
                outs.append(stages[2](h))
        return ins, outs

    return _single_threaded(run)


def _assert_served_in_order(out: str, micro: list[int]) -> tuple[list, list]:
    """What stages 1 and 3 recorded in step KILL_STEP-1 (and served, tagged KILL_STEP) is
    stage 2's input and output of exactly micro-batches ``micro``, in order."""
    before, after = _pairs(out, 1), _pairs(out, 3)
    assert before is not None and after is not None
    assert before["step"] == after["step"] == KILL_STEP
    inputs, outputs = before["outputs"], after["inputs"]
    assert len(inputs) == len(outputs) == len(micro)
    want_in, want_out = _recomputed(out, micro)
    for j, (got, want) in enumerate([*zip(inputs, want_in), *zip(outputs, want_out)]):
        assert got.shape == want.shape == (W.BATCH // W.MICRO, W.SEQ, W.D), j
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), j
    others = [j for j in range(W.MICRO) if j not in micro]
    if others:  # not recorded: the pairs are not those of the other micro-batches
        alt_in, _ = _recomputed(out, others)
        assert not any(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a in inputs for b in alt_in)
    return inputs, outputs


def _finished(out: str) -> dict:
    res = _result(out, "spare")
    assert res["took_stage"] == W.VICTIM and res["steps_done"] == STEPS, res
    for stage in (0, 1, 3):
        r = _result(out, stage)
        assert r["steps_done"] == STEPS and len(r["recoveries"]) == 1, r
        assert [s["step"] for s in _steps(out, stage)] == list(range(STEPS))
    assert [s["step"] for s in _steps(out, "spare")] == list(range(KILL_STEP, STEPS))
    return res


def test_a_rebuilt_stage_is_fitted_to_the_pairs_its_neighbours_served(tmp_path):
    out, logs = run_failure(str(tmp_path), "distill")
    k = KILL_STEP
    rec = _fitted(out, logs)  # the record and the chain's log name the fit; both neighbours served
    fit = re.search(
        rf"then fitted to the lost stage's last step in {W.DISTILL_STEPS} steps "
        r"\(mse ([0-9.e+-]+) -> ([0-9.e+-]+)\)",
        rec["source"],
    )
    assert fit is not None and float(fit.group(2)) < float(fit.group(1)), rec["source"]  # it lowered the error
    # what the neighbours served: their pairs of step k-1, tagged with the agreed step k
    before, after = _pairs(out, 1), _pairs(out, 3)
    assert before is not None and after is not None
    assert before["step"] == after["step"] == k
    inputs, outputs = before["outputs"], after["inputs"]
    assert len(inputs) == len(outputs) == W.MICRO
    rows = W.BATCH // W.MICRO
    assert all(t.shape == (rows, W.SEQ, W.D) for t in [*inputs, *outputs])
    _assert_rebuilt_as_replayed(out, rec, inputs, outputs)
    # fresh optimizer as without the fit: lr x 1.1, the warm-up continued
    for s in _steps(out, "spare"):
        assert s["lr"] == [pytest.approx(3e-3 * 1.1 * W.lr_factor(s["step"]))], s


def test_the_fit_is_skipped_when_a_neighbour_holds_no_pairs(tmp_path):
    out, logs = run_failure(str(tmp_path), "distill_gap")
    k = KILL_STEP
    res = _finished(out)
    (rec,) = res["recoveries"]
    assert rec["strategy"] == "checkfree" and rec["step"] == k, rec
    why = f"not fitted: stage 3 holds no recorded inputs of step {k}"
    assert rec["source"].startswith("CheckFree average of stages 1 and 3") and why in rec["source"], rec
    assert f"is not fitted: stage 3 holds no recorded inputs of step {k}" in logs
    assert _pairs(out, 3) is None and _pairs(out, 1) is not None
    rebuilt = torch.load(os.path.join(out, f"rebuilt-{W.VICTIM}.pt"), weights_only=True)
    assert _same(rebuilt, _average(out))  # the plain average, bit for bit
    assert _result(out, 3)["recoveries"][0]["served"] == ["neighbour of stage 2"]


def _fitted(out: str, logs: str, strategy: str = "checkfree") -> dict:
    res = _finished(out)
    (rec,) = res["recoveries"]
    assert rec["strategy"] == strategy and rec["step"] == KILL_STEP, rec
    assert rec["source"].startswith("CheckFree average of stages 1 and 3"), rec
    assert f"then fitted to the lost stage's last step in {W.DISTILL_STEPS} steps" in rec["source"], rec
    assert f"recovered step {KILL_STEP} with {strategy} from {rec['source']}" in logs
    assert sorted(_result(out, 1)["recoveries"][0]["served"]) == [
        "neighbour of stage 2",
        "recorded outputs for stage 2",
    ]
    assert sorted(_result(out, 3)["recoveries"][0]["served"]) == [
        "neighbour of stage 2",
        "recorded inputs for stage 2",
    ]
    return rec


def test_the_fit_under_1f1b_uses_every_micro_batch_in_order(tmp_path):
    out, logs = run_failure(str(tmp_path), "distill_1f1b")
    rec = _fitted(out, logs)
    inputs, outputs = _assert_served_in_order(out, list(range(W.MICRO)))
    _assert_rebuilt_as_replayed(out, rec, inputs, outputs)


def test_the_fit_with_checkfree_plus_uses_the_in_order_micro_batches_only(tmp_path):
    """CheckFree+: the even micro-batches run in pipeline order, the odd ones with the edge
    pairs swapped (stage 2's neighbours then are not its inputs' and outputs' holders): only
    the even half is recorded, served and fitted to. Stage 2, interior, is rebuilt by the
    average (the edge stages are CheckFree+'s copies, tested in test_checkfree_pipeline)."""
    out, logs = run_failure(str(tmp_path), "distill_plus")
    rec = _fitted(out, logs, "checkfree+")  # the chain's name with plus on
    inputs, outputs = _assert_served_in_order(out, list(range(0, W.MICRO, 2)))
    _assert_rebuilt_as_replayed(out, rec, inputs, outputs)


def _run_three_nodes(base: str, mode: str, procs: list[subprocess.Popen]) -> tuple[str, float]:
    """run_failure's job with stage 3 alone on a third node (c), so that its process's death
    ends no one else's (its agent stops only its own workers): node a holds stages 0, 1 and
    the spare (launch rank 0, the store), node b stage 2, SIGKILLed inside step KILL_STEP.
    The agents are appended to ``procs`` (the caller ends them). Returns (out, the time of
    the kill); the caller waits for what it expects."""
    out = os.path.join(base, mode)
    os.makedirs(out, exist_ok=True)
    port = free_port()
    # a's local address sorts first: its local rank 0 is launch rank 0 and hosts the store
    layout = {"a": ("127.0.0.1", ["0", "1", "spare"]), "b": ("localhost", ["2"]), "c": ("127.0.0.2", ["3"])}
    for node, (addr, roles) in layout.items():
        procs.append(_start_agent(base, node, addr, roles, len(layout), port, _worker_args(out, mode)))
        if node == "a":
            _wait_listening(port, 60.0, procs[0], base)
    _wait_files(out, ["paused"], JOB_TIMEOUT_S, base)
    pids = [pid for node, pid in _pids(out).values() if node == "b"]
    assert len(pids) == 1, pids
    killed = time.time()
    os.killpg(procs[1].pid, signal.SIGKILL)
    try:
        os.kill(pids[0], signal.SIGKILL)
    except ProcessLookupError:
        pass
    return out, killed


def test_a_neighbour_lost_while_serving_its_inputs_restarts_the_recovery_then_fails_cleanly(tmp_path):
    """Stage 3's process dies the moment the replacement asks for its recorded inputs. What
    the code promises (rebuild_stage, serve_requests, StagePipeline.step): the replacement
    sees the lost peer and sends RETRY to the others (it stays a spare); stages 0 and 1 raise
    PeerLostError out of serving and start the recovery over; the new group lacks stages 2
    and 3, which without stage checkpoints every member refuses at once with
    PipelineRecoveryError. Nobody waits out a transfer timeout (30 s): without RETRY the
    survivors would sit in their wait for the next request until it expires."""
    base, procs = str(tmp_path), []
    out = os.path.join(base, "distill_lost")
    try:
        out, killed = _run_three_nodes(base, "distill_lost", procs)
        roles = ["0", "1", "spare"]
        _wait_files(out, ["asked-inputs", *(f"failed-{r}.json" for r in roles)],
                    W.PG_TIMEOUT_S + JOB_TIMEOUT_S / 2 + SLACK_S, base)  # fmt: skip
        with open(os.path.join(out, "asked-inputs")) as f:
            asked = float(json.load(f))
        assert asked > killed
        logs = _logs(base)
        for role in roles:
            with open(os.path.join(out, f"failed-{role}.json")) as f:
                failed = json.load(f)
            assert failed["type"] == "PipelineRecoveryError", (role, failed)
            assert "stages [2, 3] were lost at once" in failed["message"], (role, failed)
            took = failed["time"] - asked
            assert 0 < took < 0.8 * 30.0, (role, took, logs)  # 30 s: the transfer timeout
            assert not os.path.exists(os.path.join(out, f"result-{role}.json")), role
        # the spare's first recovery failed on the lost peer (RETRY sent), not on a refusal
        with open(os.path.join(base, "agent-a.log")) as f:
            node_a = f.read()
        assert re.search(r"a recovery failed on a spare \(rank \d+: rank \d+ was lost during", node_a), logs
        for role in ("0", "1"):  # the survivors completed the steps before the loss only
            assert [s["step"] for s in _steps(out, role)] == list(range(KILL_STEP)), role
        # stage 3 served its neighbour state first: the fetch was under way
        assert not os.path.exists(os.path.join(out, "result-3.json"))
    finally:
        _end(procs, out)  # agents a and c wait in torchrun's exit barrier: end them
