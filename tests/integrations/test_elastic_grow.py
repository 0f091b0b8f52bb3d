"""A node lost and a newcomer admitted in process: world 4 -> 3 -> 4 tracks the failure-free run.

Four torchrun agents (``RECOVERKIT_NODE`` a..d, one rank each, ``--nnodes 3:4``) run the
float64 MLP of tests/integrations/elastic_worker.py under
:class:`~recoverkit.elastic.ElasticTrainer` (tests/integrations/elastic_grow_worker.py).
Launch rank 2 stops inside step ``KILL_STEP``; the test SIGKILLs its node; the survivors
re-form as a world of 3 and redo the step. Meanwhile the test starts a joiner, a plain
process (not torchrun: a new agent at the rendezvous would make torchrun restart every
worker) that connects to the job's store and announces itself
(:func:`~recoverkit.elastic.admit.join`). The members see it before step ``JOIN_BEFORE``,
agree to admit it at the next boundary, form a world of 4 with it (launch rank 4, a fresh
one) and send it model, optimizer and position in disjoint pieces, one from each survivor,
CRC-checked on arrival; the job finishes the epoch at 4.

Compared with the failure-free run (test_elastic_shrink.reference):

- ``ordered``: losses and final parameters bit-identical, on every rank, the newcomer too;
- ``global`` with a DDP model (SUM hook; re-wrapped on every new group, the newcomer's after
  its state came): within 1e-12 relative;
- every sample of the epoch trained on exactly once across the shrink and the grow.

Joiners that die while admitted, in one job, after a hostile announcement (a launch rank
taken with a malformed record, refused): one acknowledges its admission and dies before the
group forms (the formation fails within ``admit_timeout_s``, the survivors re-form from the
old members); the next dies right after the group formed, before taking its state (the
transfer fails, the survivors recover without it). They finish the epoch at 3, still
bit-identical to the failure-free run.

The admission and transfer figures are printed, never asserted.

Without torchrun (a real TCPStore, a gloo world of 2): a joiner that never acknowledges is
left out after ``admit_timeout_s`` and the members keep their group; one that acknowledges
and never forms the group makes the formation fail within the bound, and the members re-form
from the fallback generation; hostile records (the proposal, a joiner's announcement, the
admit record, the piece table) are refused with errors that name them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed.harness import free_port
from tests.integrations import elastic_worker as W
from tests.integrations.test_elastic_shrink import (
    NODES,
    _end,
    _kill_node_of,
    _logs,
    _pids,
    _rel,
    _steps,
    _wait_files,
    reference,
)
from tests.integrations.test_torchrun_restart import REPO, torchrun_env

STEPS = 5  # one epoch
KILL_STEP = 1
JOIN_BEFORE = 2  # the joiner is seen before step 2, admitted at the boundary after it
VICTIM = 2
PG_TIMEOUT_S = 20.0
SLACK_S = 30.0


def _launch(base: str, mode: str, waits: str) -> tuple[list[subprocess.Popen], str]:
    out = os.path.join(base, "out")
    os.makedirs(out, exist_ok=True)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    port = free_port()
    procs = []
    for node in NODES:
        cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        cmd += ["--nnodes=3:4", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=elastic-grow", "--max-restarts=0", "--monitor-interval=0.1",
                "-m", "tests.integrations.elastic_grow_worker", "run",
                out, mode, str(VICTIM), str(KILL_STEP), waits, str(STEPS), str(PG_TIMEOUT_S)]
        log = open(os.path.join(base, f"agent-{node}.log"), "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=dict(torchrun_env(), RECOVERKIT_NODE=node), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
        if node == "a":
            time.sleep(1.0)  # its agent binds the rendezvous port first
    return procs, out


def _joiner(base: str, out: str, mode: str, fate: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.integrations.elastic_grow_worker", "join", out, mode, str(STEPS),
           str(PG_TIMEOUT_S), fate]
    log = open(os.path.join(base, f"joiner-{fate}.log"), "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(torchrun_env()), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    return proc


def _run(base: str, mode: str, fates: list[str], finishers: list[int], waits: str) -> tuple[dict[int, dict], str]:
    """The job, the victim's node killed, then the joiners: once the survivors redid the
    failed step (``fates == ["join"]``) or at once (they order themselves: ``afterack``)."""
    procs, out = _launch(base, mode, waits)
    joiners: list[subprocess.Popen] = []
    try:
        _wait_files(out, ["paused", "master"], 150, base)
        deadline = time.monotonic() + 30
        while len(_pids(out)) < len(NODES) and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill_node_of(procs, out, VICTIM)
        if fates[0] == "join":  # after the redone step: the admission comes at a known boundary
            _wait_steps(out, 0, KILL_STEP + 1, base)
        joiners.extend(_joiner(base, out, mode, fate) for fate in fates)
        try:
            _wait_files(out, [f"exit-{r}" for r in finishers], PG_TIMEOUT_S + 60 + SLACK_S, base)
        except AssertionError as e:
            tails = "".join(f"\n--- joiner {f}:\n" + open(os.path.join(base, f"joiner-{f}.log")).read()[-3000:] for f in fates)
            raise AssertionError(f"{e}{tails}") from None
        results = {}
        for r in finishers:
            with open(os.path.join(out, f"result-{r}.json")) as f:
                results[r] = json.load(f)
        return results, out
    finally:
        for joiner in joiners:
            if joiner.poll() is None:
                os.killpg(joiner.pid, signal.SIGKILL)
                joiner.wait(timeout=30)
        _end(procs, out)


def _wait_steps(out: str, rank: int, count: int, base: str) -> None:
    deadline = time.monotonic() + PG_TIMEOUT_S + 60 + SLACK_S
    while len(_steps(out, rank)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"launch rank {rank} did not complete {count} steps\n{_logs(base)}")
        time.sleep(0.05)


def _times(out: str, results: dict[int, dict]) -> dict:
    joined = {}
    for name in os.listdir(out):
        if name.startswith("joined-") and not name.endswith(".tmp"):
            with open(os.path.join(out, name)) as f:
                j = json.load(f)
            joined[name] = {"announce_to_group_s": round(j["joined"] - j["started"], 4),
                            "phases_s": {k: round(v, 4) for k, v in j["phases_s"].items()}}
    grows = {r: [{"admit_s": round(g["admit_s"], 4), "phases_s": {k: round(v, 4) for k, v in g["admit_phases_s"].items()},
                  "transfer_s": round(g["transfer_s"], 4), "nbytes": g["nbytes"], "pieces": g["pieces"],
                  "joined": g["joined"], "dropped": g["dropped"], "failed": g["failed"]} for g in res["grows"]]
             for r, res in sorted(results.items())}
    return {"joiner": joined, "members": grows}


def _losses(res: dict) -> list[list[int]]:
    """The launch ranks lost per recovery (a re-forming of the same members under load left out)."""
    return [rec["lost"] for rec in res["recoveries"] if rec["lost"]]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ordered", "global-ddp"])
def test_a_joiner_grows_the_world_back_and_the_run_tracks_the_failure_free_one(tmp_path, mode):
    ref_losses, ref_params, _ = reference(STEPS)
    members = [0, 1, 3, 4]
    results, out = _run(str(tmp_path), mode, ["join"], members, f"{JOIN_BEFORE}:4")
    print(f"\nelastic grow ({mode}, 4 -> 3 at step {KILL_STEP} -> 4 at step {JOIN_BEFORE + 1}):", json.dumps(_times(out, results)))
    for r, res in results.items():
        # a loaded machine may add a re-forming of the same members (a heartbeat late): not counted
        assert res["generation"] == results[4]["generation"] and res["members"] == members, res
        assert res["steps_done"] == STEPS, res
        assert len(res["grows"]) == 1, res["grows"]
        grow = res["grows"][0]
        assert grow["joined"] == [4] and grow["world_size"] == 4 and grow["step"] == JOIN_BEFORE + 1, grow
        assert grow["nbytes"] > 0 and len(grow["pieces"]) == 3, grow  # one piece from each survivor
        assert sorted(s for s, _ in grow["pieces"]) == [0, 1, 2] and sum(n for _, n in grow["pieces"]) == grow["nbytes"]
        if r != 4:
            assert _losses(res) == [[VICTIM]], res["recoveries"]
    logs = {r: _steps(out, r) for r in [*members, VICTIM]}
    assert [s["step"] for s in logs[VICTIM]] == list(range(KILL_STEP)), logs[VICTIM]
    assert [s["step"] for s in logs[4]] == list(range(JOIN_BEFORE + 1, STEPS)), logs[4]
    worlds = [4] * KILL_STEP + [3] * (JOIN_BEFORE + 1 - KILL_STEP) + [4] * (STEPS - JOIN_BEFORE - 1)
    for r in (0, 1, 3):
        assert [s["world"] for s in logs[r]] == worlds, logs[r]
    first = results[0]["params"]
    for r, res in results.items():
        assert res["params"] == first, f"launch rank {r}'s replica differs from rank 0's"
    losses = [float.fromhex(s["loss"]) for s in logs[0]]
    newcomer_losses = [float.fromhex(s["loss"]) for s in logs[4]]
    assert newcomer_losses == losses[JOIN_BEFORE + 1 :]
    rel = _rel(first, ref_params)
    print(f"elastic grow deviation ({mode}): final parameters {rel:.3e} relative")
    if mode == "ordered":
        assert first == ref_params
        assert losses == ref_losses
    else:
        assert rel < 1e-12, rel
        assert all(abs(a - b) <= 1e-12 * abs(b) for a, b in zip(losses, ref_losses)), (losses, ref_losses)
    seen = [i for r in logs for s in logs[r] for i in s["samples"]]
    assert sorted(seen) == list(range(W.NUM_SAMPLES)), (len(seen), len(set(seen)))


@pytest.mark.slow
def test_joiners_that_die_while_admitted_leave_the_survivors_training(tmp_path):
    """A malformed record under launch rank 4 is refused. The joiner of launch rank 5
    acknowledges its admission at a step boundary (the one after the redone step or the next:
    it starts when the victim is killed, so which one depends on the machine's load) and dies
    before the group forms: the formation fails within ``admit_timeout_s`` and the survivors
    re-form from the old members. The joiner of launch rank 6, announced meanwhile, is admitted
    at a later boundary and dies right after the group formed: the state transfer fails and the
    survivors recover without it. Every member records both at the same steps."""
    ref_losses, ref_params, _ = reference(STEPS)
    survivors = [0, 1, 3]
    results, out = _run(str(tmp_path), "ordered", ["garble-ackdie", "afterack-die"], survivors, f"{JOIN_BEFORE}:5")
    print("\nelastic grow, joiners that die:", json.dumps(_times(out, results)),
          json.dumps({r: [{k: v for k, v in rec.items() if k != "detected_by"} | {"by": rec["detected_by"][:50]}
                          for rec in res["recoveries"]] for r, res in results.items()}))
    assert os.path.exists(os.path.join(out, "acked-5")) and os.path.exists(os.path.join(out, "joined-6"))
    for res in results.values():
        assert res["members"] == survivors and res["steps_done"] == STEPS, res
        # the joiners start as soon as the victim is killed: the first is seen at the boundary after
        # the redone step or, at the latest, after the step it is waited for before; the second after it
        assert [(g["joined"], g["dropped"]) for g in res["grows"]] == [([], [5]), ([6], [])], res["grows"]
        first, second = (g["step"] for g in res["grows"])
        assert KILL_STEP + 1 <= first <= JOIN_BEFORE + 1 < STEPS and first < second < STEPS, res["grows"]
        assert [g["step"] for g in results[0]["grows"]] == [first, second], (results[0]["grows"], res["grows"])
        formation, transfer = res["grows"]
        assert "did not form" in formation["failed"] and "state transfer" in transfer["failed"], res["grows"]
        assert _losses(res) == [[VICTIM], [6]], res["recoveries"]
        assert any(rec["detected_by"].startswith("grow: ") for rec in res["recoveries"]), res["recoveries"]
        assert res["params"] == ref_params  # still the failure-free run, bit for bit
    logs = {r: _steps(out, r) for r in survivors}
    assert all(s["world"] == 3 for s in logs[0][KILL_STEP:]), logs[0]
    assert [float.fromhex(s["loss"]) for s in logs[0]] == ref_losses
    assert not any(os.path.exists(os.path.join(out, f"steps-{r}.jsonl")) for r in (5, 6))


# ---------------------------------------------------------------------- admission without torchrun


def _admit_without_ack(rank: int, world: int, acks: bool) -> dict:
    """Both members propose and admit launch rank 2, which rank 0 announced (and, with
    ``acks``, acknowledged) on its behalf; no process ever forms the group as launch rank 2."""
    import torch
    import torch.distributed as dist

    from recoverkit.distributed.regroup import LAUNCH_RANKS, Membership, job_store, regroup
    from recoverkit.elastic.admit import (
        FormationFailed,
        Proposal,
        admit,
        pending,
        propose,
        read_proposal,
    )

    store = job_store(timeout_s=20)
    m = Membership.initial(store)
    if rank == 0:
        joiner = store.add(f"{m.namespace}/{LAUNCH_RANKS}", 1) - 1
        store.set(f"{m.namespace}/joiners/{joiner}", json.dumps({"pid": 12345, "host": "elsewhere"}))
        if acks:
            store.set(f"{m.namespace}/g1/grow/ack/{joiner}", "1")
    assert read_proposal(store, m) is None  # nobody proposes before the barrier
    dist.barrier()
    valid, nxt, refused = pending(store, m, 2, {}, patience_s=5.0)
    agreed = propose(store, m, Proposal(at=0, joiners=tuple(valid), next=nxt))
    out = {"valid": valid, "next": nxt, "refused": refused, "agreed": list(agreed.joiners)}
    start = time.monotonic()
    try:
        adm = admit(store, m, agreed, form_timeout_s=2.0, pg_timeout_s=20.0)
        out.update(kind="admitted", joined=list(adm.joined), dropped=list(adm.dropped), generation=adm.membership.generation)
        m = adm.membership
    except FormationFailed as e:
        out.update(kind="formation failed", bound_s=time.monotonic() - start, message=str(e)[:200])
        m = regroup(store, e.fallback, timeout_s=20, join_window_s=5.0)
        out.update(generation=m.generation, members=list(m.members))
    t = torch.ones(1)
    dist.all_reduce(t)  # the group the members are left with works
    out["sum"] = float(t.item())
    return out


def test_a_joiner_that_never_acknowledges_is_left_out_and_the_group_is_kept():
    from tests.distributed.harness import run_world

    for res in run_world(2, _admit_without_ack, False, timeout_s=120):
        assert res["valid"] == [2] and res["next"] == 3 and res["agreed"] == [2], res
        assert res["kind"] == "admitted" and res["joined"] == [] and res["dropped"] == [2], res
        assert res["generation"] == 1 and res["sum"] == 2.0, res


def test_a_joiner_that_acknowledges_and_never_forms_the_group_is_dropped_within_the_bound():
    from tests.distributed.harness import run_world

    results = run_world(2, _admit_without_ack, True, timeout_s=120)
    print("\nformation given up after:", [round(r["bound_s"], 3) for r in results])
    for res in results:
        assert res["kind"] == "formation failed" and "did not form" in res["message"], res
        assert res["bound_s"] < 2.0 + SLACK_S, res
        assert res["generation"] == 2 and res["members"] == [0, 1] and res["sum"] == 2.0, res


@pytest.fixture
def store():
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))


def test_hostile_records_are_refused_with_named_errors(store):
    from recoverkit.distributed.regroup import LAUNCH_RANKS, NAMESPACE, Membership
    from recoverkit.elastic.admit import pending, read_proposal
    from recoverkit.errors import RegroupError

    ns = f"{NAMESPACE}/1"
    m = Membership(namespace=ns, generation=0, members=(0, 1), launch_rank=0, previous=(0, 1))
    # the members' side: the proposal
    key = f"{ns}/g1/grow/proposal"
    for bad in (b"\xff\xfe", b"[1, 2]", b'{"at": -1, "joiners": [2], "next": 3}', b'{"at": 0, "joiners": [1], "next": 3}',
                b'{"at": 0, "joiners": [3, 2], "next": 4}', b'{"at": 0, "joiners": [2], "next": 2}',
                b'{"at": 0, "joiners": [], "next": 2}', b"x" * ((1 << 20) + 1)):
        store.set(key, bad)
        with pytest.raises(RegroupError) as e:
            read_proposal(store, m)
        assert e.value.reason == "invalid" and key in str(e.value), bad[:40]
    # announcements: malformed, withdrawn, missing past the patience; a valid one after them
    store.add(f"{ns}/{LAUNCH_RANKS}", 7)  # ranks 2..6 handed out
    store.set(f"{ns}/joiners/2", b'{"pid": "1", "host": "h"}')
    store.set(f"{ns}/joiners/3", json.dumps({"pid": 9, "host": "h" * 300}))
    store.set(f"{ns}/joiners/4", json.dumps({"pid": 9, "host": "h"}))
    store.set(f"{ns}/joiners/4/withdrawn", "1")
    store.set(f"{ns}/joiners/6", json.dumps({"pid": 9, "host": "h"}))
    first_seen: dict[int, float] = {}
    assert pending(store, m, 2, first_seen, patience_s=30.0) == ([], 5, [2, 3, 4])  # 5: its record awaited
    assert pending(store, m, 5, {5: time.monotonic() - 60}, patience_s=30.0) == ([6], 7, [5])
    store.set(f"{ns}/{LAUNCH_RANKS}", b"12x")  # a counter that is not one
    with pytest.raises(RegroupError, match="launch rank counter"):
        pending(store, m, 7, {}, patience_s=1.0)


def test_a_joiner_refuses_a_garbled_admit_record_and_withdraws_when_not_admitted(store):
    import threading

    from recoverkit.distributed.regroup import LAUNCH_RANKS, NAMESPACE
    from recoverkit.elastic.admit import join
    from recoverkit.errors import RegroupError

    with pytest.raises(RegroupError, match="no elastic job"):
        join(store, timeout_s=1.0)
    store.add(f"{NAMESPACE}/epoch", 1)
    ns = f"{NAMESPACE}/1"
    store.add(f"{ns}/{LAUNCH_RANKS}", 2)
    with pytest.raises(RegroupError, match="not admitted within") as e:
        join(store, timeout_s=0.3)
    assert e.value.reason == "timeout" and store.check([f"{ns}/joiners/2/withdrawn"])

    def admit_garbled() -> None:
        deadline = time.monotonic() + 10
        while not store.check([f"{ns}/joiners/3"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        store.set(f"{ns}/joiners/3/admit", json.dumps({"generation": 1, "members": [0, 1], "joiners": [1], "at": 0}))

    threading.Thread(target=admit_garbled, daemon=True).start()
    with pytest.raises(RegroupError, match="does not admit launch rank 3") as e:
        join(store, timeout_s=10.0)
    assert e.value.reason == "invalid"


def test_a_hostile_piece_table_or_extra_record_is_refused():
    from recoverkit.elastic.grow import _extra, _pieces, _split
    from recoverkit.errors import IntegrityError

    senders = [0, 1, 2]
    table = [[s, off, n, 0] for s, off, n in _split(100, senders)]
    assert sum(n for _, _, n, _ in _pieces(table, 100, senders)) == 100
    for bad in (table[:2], [table[1], table[0], table[2]], [[0, 0, 34, 0], [1, 30, 33, 0], table[2]],
                [[0, 0, 34, 0], [1, 34, 33, 0], [2, 67, 1 << 40, 0]], [[0, 0, 34, -1], table[1], table[2]],
                [[0, 0, 34, 0], [1, 34, 33, 0], [2, 67, 30, 0]], [[0, 0, "34", 0], table[1], table[2]], {"a": 1}):
        with pytest.raises(IntegrityError):
            _pieces(bad, 100, senders)
    assert _extra({"slots": [0, 1, 4, 3], "next_launch_rank": 5}) == {"slots": [0, 1, 4, 3], "next_launch_rank": 5}
    for bad in ({"slots": [0, 0], "next_launch_rank": 5}, {"slots": [], "next_launch_rank": 5},
                {"slots": [0, 1], "next_launch_rank": -1}, {"slots": [0, True], "next_launch_rank": 2}, [0]):
        with pytest.raises(IntegrityError):
            _extra(bad)
