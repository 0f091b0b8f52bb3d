"""A second node lost while the survivors recover from the first, and the job still finishes.

The job of test_elastic_shrink.py (four torchrun agents, one rank each, a float64 MLP with
dropout under :class:`~recoverkit.elastic.ElasticTrainer`): launch rank 2 stops inside step
``KILL_STEP`` and the test SIGKILLs its node; the other three detect it and re-form a world
of 3 (generation 1). Launch rank 3 is the second victim: failure injection in its worker
only (``second=3:WHERE``, tests/integrations/elastic_worker.py) stops its recovery after the
new group formed, where ``WHERE`` says, and writes ``paused2``; the test then SIGKILLs its
node too. The other two survivors are then blocked in a collective of the recovery with it:

- ``reconcile``: the agreement on the completed step (the position all-gather);
- ``wrap``: DDP's construction on the new group (after the agreement completed).

That collective fails; the trainer treats it as a loss (elastic/waits' ``recovering``),
re-forms again from generation 1's membership (generation 2: launch ranks 0 and 1),
reconciles and redoes the step. Checked as in the shrink test: every survivor ran every
step once, in order, with the global batch kept (each sample of the epoch trained on once
across all ranks, losses equal on both survivors, final states equal; ``ordered``
bit-identical to the failure-free run, ``global`` within 1e-12); the step's recovery
records name both lost ranks (one record per re-forming: the first with ``failed`` set);
the second loss is detected within the group's timeout (no hang: every wait is bounded, and
the test has a pytest timeout).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.integrations import elastic_worker as W
from tests.integrations import test_elastic_shrink as S

SECOND = 3
PG_TIMEOUT_S = S.PG_TIMEOUT_S
DDP_PG_TIMEOUT_S = S.DDP_PG_TIMEOUT_S
SLACK_S = S.SLACK_S


def _freeze(out: str) -> None:
    """SIGSTOP the second victim's worker (its heartbeat thread stops too; no socket closes):
    a frozen node. The time goes to ``out/killed2``; the job's end SIGKILLs it."""
    _, pid = S._pids(out)[SECOND]
    t = time.time()
    os.kill(pid, signal.SIGSTOP)
    with open(os.path.join(out, "killed2.tmp"), "w") as f:
        f.write(repr(t))
    os.replace(os.path.join(out, "killed2.tmp"), os.path.join(out, "killed2"))


def _run_job(base: str, mode: str, ddp: bool, where: str, freeze: bool = False) -> tuple[dict[int, dict], str, float]:
    pg_timeout_s = DDP_PG_TIMEOUT_S if ddp else PG_TIMEOUT_S
    procs, out = S._launch(base, mode, S.VICTIM, {}, pg_timeout_s, ddp, flags=(f"second={SECOND}:{where}",))
    survivors = [r for r in range(len(S.NODES)) if r not in (S.VICTIM, SECOND)]
    try:
        S._wait_files(out, ["paused"], 150, base)
        deadline = time.monotonic() + 30
        while len(S._pids(out)) < len(S.NODES) and time.monotonic() < deadline:
            time.sleep(0.05)
        S._kill_node_of(procs, out, S.VICTIM)
        # the first recovery: detection, re-forming as a world of 3, then the second victim stops
        S._wait_files(out, ["paused2"], PG_TIMEOUT_S + 60 + SLACK_S, base)
        if freeze:
            _freeze(out)
        else:
            S._kill_node_of(procs, out, SECOND, marker="killed2")
        with open(os.path.join(out, "killed2")) as f:
            killed2 = float(f.read())
        S._wait_files(out, [f"exit-{r}" for r in survivors], PG_TIMEOUT_S + 60 + SLACK_S, base)
        results = {}
        for r in survivors:
            with open(os.path.join(out, f"result-{r}.json")) as f:
                results[r] = json.load(f)
        return results, out, killed2
    finally:
        S._end(procs, out)


@pytest.mark.timeout(280)
@pytest.mark.parametrize(("mode", "where"), [("ordered", "reconcile"), ("global-ddp", "reconcile"), ("global-ddp", "wrap")])
def test_a_second_rank_lost_during_the_recovery_is_recovered_from_too(tmp_path, mode, where):
    ref_losses, ref_params, _ = S.reference()
    ddp = mode.endswith("-ddp")
    mode = mode.removesuffix("-ddp")
    pg_timeout_s = DDP_PG_TIMEOUT_S if ddp else PG_TIMEOUT_S
    results, out, killed2 = _run_job(str(tmp_path), mode, ddp, where)
    print(f"\nelastic MTTR ({mode}{' DDP' if ddp else ''}, world 4 -> 3 -> 2 at step {S.KILL_STEP}, "
          f"second loss in {where}):", json.dumps(S._figures(results)))
    for res in results.values():
        assert "error" not in res, res
        assert res["generation"] == 2 and res["members"] == [0, 1] and res["steps_done"] == S.STEPS, res
        recs = res["recoveries"]
        assert [(x["step"], x["generation"], x["world_size"], x["lost"]) for x in recs] == [
            (S.KILL_STEP, 1, 3, [S.VICTIM]),
            (S.KILL_STEP, 2, 2, [SECOND]),
        ], recs
        first, final = recs
        # the first re-forming's recovery failed in a collective with the second victim
        want = "DDP's construction" if where == "wrap" else "agreement on the completed step"
        assert first["failed"] and first["moved"] == [] and first["redo_s"] is None, first
        if where == "wrap":  # DDP's own collectives: the backend's error
            assert first["failed"].startswith(f"collective ({want}"), first
        else:  # reconcile's waits: the backend's error, or given up at the heartbeat's verdict
            assert (first["failed"].startswith("collective (the agreement on the completed step): reconcile: ")
                    or first["failed"].startswith("heartbeat: reconcile: ")), first
        assert final["failed"] is None and final["redo_s"] is not None and final["moved"], final
        assert sorted(x for rec in recs for x in rec["lost"]) == [S.VICTIM, SECOND]
        # bounded: the second loss was seen within the group's timeout of the kill
        assert res["killed"] is not None and first["detected_at"] - res["killed"] < PG_TIMEOUT_S + SLACK_S, first
        assert 0 <= final["detected_at"] - killed2 < pg_timeout_s + SLACK_S, (final, killed2)
    logs = {r: S._steps(out, r) for r in range(len(S.NODES))}
    for lost in (S.VICTIM, SECOND):
        assert [s["step"] for s in logs[lost]] == list(range(S.KILL_STEP)), logs[lost]
    first_params = results[0]["params"]
    for r, res in results.items():
        assert res["params"] == first_params, f"rank {r}'s replica differs from rank 0's"
        assert [s["step"] for s in logs[r]] == list(range(S.STEPS)), logs[r]
        assert [s["world"] for s in logs[r]] == [4] * S.KILL_STEP + [2] * (S.STEPS - S.KILL_STEP), logs[r]
    losses = [float.fromhex(s["loss"]) for s in logs[0]]
    assert losses == [float.fromhex(s["loss"]) for s in logs[1]]
    # every step's global batch kept: its samples trained on exactly once over the live ranks
    for k in range(S.STEPS):
        got = sorted(i for r in logs for s in logs[r] if s["step"] == k for i in s["samples"])
        assert len(got) == W.GLOBAL_BATCH and len(set(got)) == len(got), (k, got)
    seen = [i for r in logs for s in logs[r] for i in s["samples"]]
    assert sorted(seen) == list(range(W.NUM_SAMPLES)), (len(seen), len(set(seen)))
    rel = S._rel(first_params, ref_params)
    print(f"elastic deviation ({mode}): final parameters {rel:.3e} relative; losses {losses} vs {ref_losses}")
    S.assert_like_reference(mode, first_params, losses, ref_params, ref_losses)


@pytest.mark.timeout(280)
def test_a_member_frozen_during_the_agreement_is_given_up_at_the_heartbeats_miss(tmp_path):
    """The second victim is frozen (SIGSTOP), not killed, while the survivors wait for it in
    the agreement's first all-gather: no socket closes, so only the heartbeat can tell them.
    The agreement's waits ask it (reconcile's ``abort=``), so they give the all-gather up
    after ``miss_s`` (1 s) instead of the group's timeout (20 s), re-form without the frozen
    rank and finish, bit-identical to the failure-free run."""
    ref_losses, ref_params, _ = S.reference()
    results, out, stopped = _run_job(str(tmp_path), "ordered", False, "reconcile", freeze=True)
    for res in results.values():
        assert "error" not in res, res
        assert res["generation"] == 2 and res["members"] == [0, 1] and res["steps_done"] == S.STEPS, res
        first, final = res["recoveries"]
        assert first["failed"].startswith("heartbeat: reconcile: "), first  # the heartbeat's verdict
        assert final["failed"] is None and final["lost"] == [SECOND], final
        assert 0 <= final["detected_at"] - stopped < PG_TIMEOUT_S / 2, (final, stopped)
        assert res["params"] == ref_params
    logs = {r: S._steps(out, r) for r in results}
    for r in results:
        assert [s["step"] for s in logs[r]] == list(range(S.STEPS)), logs[r]
        assert [float.fromhex(s["loss"]) for s in logs[r]] == ref_losses


# ---------------------------------------------------------------------- what counts as a second loss


def test_a_recovery_failure_is_a_loss_only_when_a_peer_was_lost():
    """``recovering`` classifies by type and origin: the recovery's own waits' errors (a
    collective given up, or failed in the backend: RecoveryCollectiveError) are losses
    (re-form again), and so is the backend's RuntimeError of code whose collectives run
    inside torch (``backend=True``: DDP's construction); a local failure (an allocation, out
    of memory) is not a lost peer and propagates, as do recoverkit's own errors, RuntimeError
    subclasses included (RegroupError's reasons, IntegrityError, CommitError ...)."""
    import torch

    from recoverkit.elastic.waits import Lost, lost_peer, recovering
    from recoverkit.errors import (
        CommitError,
        CopyError,
        IntegrityError,
        PeerLostError,
        PeerTimeoutError,
        RankFailure,
        RegroupError,
    )

    reset = RuntimeError("Connection reset by peer")
    for error, abandoned in ((lost_peer("reconcile: the position all-gather", reset), False),
                             (PeerLostError("launch rank(s) [3] stopped beating"), True),
                             (PeerTimeoutError("reconcile: the position all-gather: no answer in 20 s"), True)):
        with pytest.raises(Lost) as caught:
            with recovering("the agreement on the completed step"):
                raise error
        assert caught.value.cause is error and caught.value.abandoned is abandoned, caught.value.how
    assert caught.value.how.startswith("collective: ")
    with pytest.raises(Lost) as caught:
        with recovering("DDP's construction on the new group", backend=True):
            raise reset
    assert caught.value.cause is reset and not caught.value.abandoned
    assert caught.value.how == "collective (DDP's construction on the new group): RuntimeError: Connection reset by peer"
    local = [RuntimeError("DefaultCPUAllocator: can't allocate memory"), torch.OutOfMemoryError("CUDA out of memory")]
    for error in local:  # not a lost peer: never retried, even where the backend's errors are
        for backend in (False, True):
            if backend and type(error) is RuntimeError:
                continue  # indistinguishable from the backend's by type: DDP's construction retries it
            with pytest.raises(type(error)) as caught_local:
                with recovering("the agreement on the completed step", backend=backend):
                    raise error
            assert caught_local.value is error
    passing = [RegroupError("x", reason=r) for r in ("diverged", "restore", "store_lost", "excluded", "timeout")]
    passing += [IntegrityError("bad header"), CommitError("commit"), RankFailure("ranks", failures={1: "x"}),
                CopyError("copy"), ValueError("v"), KeyError("k")]
    for error in passing:
        with pytest.raises(type(error)) as caught:
            with recovering("the rebuild"):
                raise error
        assert caught.value is error


def test_a_rank_that_failed_its_part_of_the_agreement_is_never_retried_as_untouched(monkeypatch):
    """reconcile's outcome all-gather failing (a second peer lost): a rank whose own part
    went well may be reconciled again (the error propagates as it is, a loss); a rank whose
    part failed (possibly half-applied) raises RegroupError("diverged") instead."""
    import importlib

    from recoverkit.errors import IntegrityError, RegroupError

    R = importlib.import_module("recoverkit.elastic.reconcile")  # the package exports the function

    from recoverkit.elastic.waits import RecoveryCollectiveError

    def peer_reset(*_):  # what reconcile's waits raise for a peer's reset
        raise R.lost_peer("reconcile: the outcome all-gather", RuntimeError("Connection reset by peer"))

    monkeypatch.setattr(R, "_gather", peer_reset)
    with pytest.raises(RecoveryCollectiveError):
        R._agreed(None, 0, "applying the state", R._Waits(1.0))
    with pytest.raises(RegroupError) as refused:
        R._agreed(IntegrityError("the CRC did not match"), 0, "applying the state", R._Waits(1.0))
    assert refused.value.reason == "diverged" and "outcome all-gather failed too" in str(refused.value)
