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
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from tests.integrations import checkfree_pipeline_worker as W
from tests.integrations.test_checkfree_pipeline import (
    KILL_STEP,
    STEPS,
    _result,
    _same,
    _state,
    _steps,
    run_failure,
)


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
    from recoverkit.recovery.checkfree import distill_stage

    out, logs = run_failure(str(tmp_path), "distill")
    k = KILL_STEP
    res = _finished(out)
    (rec,) = res["recoveries"]
    assert rec["strategy"] == "checkfree" and rec["step"] == k, rec
    # the record and the chain's log name the fit, and it lowered the error
    fit = re.search(
        rf"then fitted to the lost stage's last step in {W.DISTILL_STEPS} steps "
        r"\(mse ([0-9.e+-]+) -> ([0-9.e+-]+)\)",
        rec["source"],
    )
    assert fit is not None and rec["source"].startswith("CheckFree average of stages 1 and 3"), rec
    assert float(fit.group(2)) < float(fit.group(1)), rec["source"]
    assert f"recovered step {k} with checkfree from {rec['source']}" in logs
    assert sorted(_result(out, 1)["recoveries"][0]["served"]) == [
        "neighbour of stage 2",
        "recorded outputs for stage 2",
    ]
    assert sorted(_result(out, 3)["recoveries"][0]["served"]) == [
        "neighbour of stage 2",
        "recorded inputs for stage 2",
    ]
    # what the neighbours served: their pairs of step k-1, tagged with the agreed step k
    before, after = _pairs(out, 1), _pairs(out, 3)
    assert before is not None and after is not None
    assert before["step"] == after["step"] == k
    inputs, outputs = before["outputs"], after["inputs"]
    assert len(inputs) == len(outputs) == W.MICRO
    rows = W.BATCH // W.MICRO
    assert all(t.shape == (rows, W.SEQ, W.D) for t in [*inputs, *outputs])
    # offline replay: the average, then the same fit at the stage's base rate of step k
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        module = W.build_stage(W.VICTIM)
        module.load_state_dict(_average(out))
        replay = distill_stage(
            module, inputs, outputs, steps=W.DISTILL_STEPS, lr=3e-3 * W.lr_factor(k)
        )
    finally:
        torch.set_num_threads(threads)
    assert f"(mse {replay.first_mse:.4g} -> {replay.last_mse:.4g})" in rec["source"]
    rebuilt = torch.load(os.path.join(out, f"rebuilt-{W.VICTIM}.pt"), weights_only=True)
    want = module.state_dict()
    assert rebuilt.keys() == want.keys()
    for key, value in rebuilt.items():
        assert torch.allclose(value, want[key], rtol=1e-5, atol=1e-6), key
    assert not _same(rebuilt, _average(out))  # the fit moved it
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
