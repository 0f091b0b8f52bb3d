"""A lost pipeline stage on torch.distributed.pipelining, brought back in process, no rollback.

A 4-stage byte-level model (tests/integrations/checkfree_pipeline_worker.py) trains with
PyTorch's ScheduleGPipe over gloo, one stage per process, plus one spare process. The
failure-free run is one torchrun agent with 5 workers. The failure runs are two torchrun
agents on this machine, simulated nodes (``--nnodes 2``, c10d rendezvous on localhost, no
restarts): node a runs the other three stages and the spare, node b the victim stage alone;
the victim stops inside step ``KILL_STEP`` and the test SIGKILLs node b (agent and worker). The survivors see their pipeline's
point-to-point ops fail, the spare sees the heartbeat stop; all re-form the group in process,
the spare takes stage 2 and rebuilds it, the failed step is redone, the job finishes.

- ``checkfree`` (no copy of stage 2 survives): the rebuilt stage equals, bit for bit,
  ``average_neighbours`` of stages 1 and 3 of the failure-free run after step KILL_STEP-1,
  weighted by their clipped gradient norms of that step; the other stages' states match the
  failure-free run bit for bit up to that step (none rolled back); the rebuilt stage's
  optimizer is fresh with the learning rate x 1.1, and continues the warm-up schedule at the
  failure step (the others' rates unchanged by the recovery); the chain's log says CheckFree
  was used.
- ``replica`` (each stage's model and optimizer copied to the next stage's process every
  step): the exact copy is used, not CheckFree, and every stage's state after every step, and
  every loss, is bit-identical to the failure-free run.
- ``replace`` (replica copies, no spare launched): the survivors re-form and wait; the test
  starts a replacement after the kill, a plain process that joins through the job's store
  (``admit.join``) with a fresh launch rank; it takes stage 2 from its replica and the run is
  again bit-identical to the failure-free one.

Figures (printed, never asserted): per-step time, detection (SIGKILL -> each survivor's
error), regroup, rebuild and total recovery; written to bench/results/checkfree_pipeline.json
by ``python -m tests.integrations.test_checkfree_pipeline``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

from tests.distributed.harness import free_port
from tests.integrations import checkfree_pipeline_worker as W
from tests.integrations.test_elastic_shrink import _end, _pids
from tests.integrations.test_torchrun_restart import REPO, torchrun_env

NODES = "ab"
STEPS = 5
KILL_STEP = 2
SLACK_S = 60.0  # a loaded 2-core machine
JOB_TIMEOUT_S = 240.0


def _torchrun() -> list[str]:
    found = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def _worker_args(out: str, mode: str, victim: int = W.VICTIM) -> list[str]:
    return [
        "-m",
        "tests.integrations.checkfree_pipeline_worker",
        out,
        mode,
        str(KILL_STEP),
        str(STEPS),
        str(victim),
    ]


def run_free(base: str) -> str:
    """The failure-free run: one agent, five workers."""
    out = os.path.join(base, "free")
    os.makedirs(out, exist_ok=True)
    cmd = _torchrun() + [
        "--standalone",
        "--nproc-per-node=5",
        "--max-restarts=0",
        "--monitor-interval=0.1",
    ]
    done = subprocess.run(
        cmd + _worker_args(out, "free"),
        cwd=REPO,
        env=torchrun_env(),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _logs(base: str) -> str:
    paths = [os.path.join(base, f"{n}.log") for n in [*(f"agent-{n}" for n in NODES), "joiner"]]
    return "\n".join(f"--- {p}:\n" + open(p).read()[-3000:] for p in paths if os.path.exists(p))


def _wait_files(out: str, names: list[str], timeout_s: float, base: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(os.path.exists(os.path.join(out, n)) for n in names):
        if time.monotonic() > deadline:
            missing = [n for n in names if not os.path.exists(os.path.join(out, n))]
            raise AssertionError(
                f"missing {missing}; have {sorted(os.listdir(out))}\n{_logs(base)}"
            )
        time.sleep(0.05)


def _wait_listening(port: int, timeout_s: float, agent: subprocess.Popen, base: str) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and agent.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"node a's agent does not listen on {port}\n{_logs(base)}")


def _start_agent(base: str, node: str, addr: str, roles: list[str], nnodes: int, port: int,
                 worker_args: list[str]) -> subprocess.Popen:
    """One node's torchrun agent of the job (node ``a`` hosts the c10d rendezvous), running
    the worker with ``roles`` on it; its output goes to ``base/agent-<node>.log``."""
    cmd = _torchrun() + [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={len(roles)}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-conf=is_host={int(node == 'a')}",
        f"--local-addr={addr}",
        "--rdzv-id=checkfree",
        "--max-restarts=0",
        "--monitor-interval=0.1",
    ] + worker_args
    env = dict(torchrun_env(), RECOVERKIT_NODE=node, RECOVERKIT_STAGES=",".join(roles))
    with open(os.path.join(base, f"agent-{node}.log"), "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_failure(
    base: str,
    mode: str,
    victim: int = W.VICTIM,
    joiners: tuple[str, ...] = ("",),
    spares: tuple[str, ...] = ("spare",),
    also: tuple[int, ...] = (),
) -> tuple[str, str]:
    """Two agents: node a runs the other stages and the spare, node b the stage ``victim``
    (and the stages ``also``, lost with it); node b is SIGKILLed (agents and workers) inside
    step KILL_STEP. In mode
    ``replace`` node a has no spare: the test starts the replacement (a plain process that
    joins through the job's store) once node b is killed; ``joiners`` are their fates in
    order (``die``: it dies once admitted; the next starts when it is gone). ``spares``: the
    spares' roles on node a (``dyingspare`` dies as it takes the stage). Returns (out, the
    logs)."""
    out = os.path.join(base, mode)
    os.makedirs(out, exist_ok=True)
    port = free_port()
    lost = [victim, *also]
    others = [str(i) for i in range(W.NUM_STAGES) if i not in lost]
    # node a: local address 127.0.0.1 sorts first, so its worker of local rank 0 is launch
    # rank 0 and hosts the store; node b (localhost) holds the victim (and ``also``) alone
    late = mode == "replace"
    extra = ["joiner"] if late else [r for r in spares if r != "dyingspare"]
    layout = {"a": ("127.0.0.1", others if late else [*others, *spares]), "b": ("localhost", [str(i) for i in lost])}
    procs: list[subprocess.Popen] = []
    try:
        for node, (addr, roles) in layout.items():
            procs.append(_start_agent(base, node, addr, roles, len(layout), port, _worker_args(out, mode, victim)))
            if node == "a":  # its agent hosts the rendezvous: b connects once it listens
                _wait_listening(port, 60.0, procs[0], base)
        _wait_files(out, ["paused"], JOB_TIMEOUT_S, base)
        pids = [pid for node, pid in _pids(out).values() if node == "b"]
        assert len(pids) == len(lost), pids
        killed = time.time()
        os.killpg(procs[1].pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        with open(os.path.join(out, "killed.tmp"), "w") as f:
            f.write(repr(killed))
        os.replace(os.path.join(out, "killed.tmp"), os.path.join(out, "killed"))
        for fate in joiners if late else ():  # replacements, started after the loss, outside torchrun
            log = open(os.path.join(base, "joiner.log"), "a")
            proc = subprocess.Popen(
                [sys.executable, *_worker_args(out, "join")[:6], fate],
                cwd=REPO,
                env=torchrun_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            procs.append(proc)
            if fate == "die":
                proc.wait(timeout=JOB_TIMEOUT_S)
        _wait_files(
            out,
            [f"exit-{r}" for r in [*others, *extra]],
            W.PG_TIMEOUT_S + JOB_TIMEOUT_S / 2 + SLACK_S,
            base,
        )
        time.sleep(0.5)  # the final barrier's output
        return out, _logs(base)
    finally:
        _end(procs, out)  # agents wait in torchrun's exit barrier for the lost node: end them


def _state(out: str, stage: int, step: int) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out, f"state-{stage}-{step}.pt"), weights_only=True)


def _steps(out: str, role: int | str) -> list[dict]:
    """The steps logged by the process whose first role was ``role`` (a stage, or "spare")."""
    path = os.path.join(out, f"steps-{role}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _result(out: str, role: int | str) -> dict:
    with open(os.path.join(out, f"result-{role}.json")) as f:
        return json.load(f)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def figures(free: str, failed: str, victim: int = W.VICTIM) -> dict:
    """Per-step time (failure-free run), detection, regroup, rebuild, recovery (failure run)."""
    step_s = [s["seconds"] for r in range(W.NUM_STAGES) for s in _steps(free, r)[1:]]
    roles: list[int | str] = [r for r in range(W.NUM_STAGES) if r != victim]
    results = {str(r): _result(failed, r) for r in [*roles, "spare"]}
    rows = []
    for r, res in sorted(results.items()):
        for rec in res["recoveries"]:
            rows.append(
                {
                    "role": r,
                    "launch_rank": res["launch_rank"],
                    "detect_s": rec["detected_at"] - res["killed"],
                    "regroup_s": rec["regroup_s"],
                    "rebuild_s": rec["rebuild_s"],
                    "total_s": rec["total_s"],
                    "strategy": rec["strategy"],
                    "detected_by": rec["detected_by"][:80],
                }
            )
    spare = [row for row in rows if row["strategy"] is not None]
    redo = [s["seconds"] for s in _steps(failed, "spare") if s["step"] == KILL_STEP]
    detect = max(row["detect_s"] for row in rows)
    return {
        "summary": {
            "step_s": statistics.median(step_s),
            "detection_s": detect,
            "relaunch_s": spare[0]["regroup_s"] if spare else None,
            "fetch_s": spare[0]["rebuild_s"] if spare else None,
            "recovery_s": max(row["total_s"] for row in rows),
            "redo_step_s": redo[0] if redo else None,
        },
        "per_process": rows,
    }


@pytest.fixture(scope="module")
def free(tmp_path_factory) -> str:
    """The failure-free run, shared by the tests of this module."""
    return run_free(str(tmp_path_factory.mktemp("free")))


def test_a_lost_stage_is_rebuilt_from_its_neighbours(tmp_path, free):
    from recoverkit.recovery.checkfree import CheckFreeOptions, average_neighbours

    out, logs = run_failure(str(tmp_path), "checkfree")
    k = KILL_STEP
    spare = "spare"
    res = _result(out, spare)
    assert res["took_stage"] == W.VICTIM and res["steps_done"] == STEPS, res
    (rec,) = res["recoveries"]
    assert rec["strategy"] == "checkfree" and rec["step"] == k and rec["lost"] == [W.VICTIM], rec
    assert "recovered step 2 with checkfree from CheckFree average of stages 1 and 3" in logs
    # the rebuilt stage: the neighbours' average at the failure step, weighted by their norms
    norms = _steps(free, W.VICTIM - 1)[k - 1]["norms"]
    expect = average_neighbours(
        _state(free, 1, k - 1),
        _state(free, 3, k - 1),
        norms[1],
        norms[3],
        CheckFreeOptions(),
        keys=list(W.build_stage(W.VICTIM).state_dict()),
    )
    rebuilt = torch.load(os.path.join(out, f"rebuilt-{W.VICTIM}.pt"), weights_only=True)
    assert _same(rebuilt, expect)
    assert not _same(rebuilt, _state(free, W.VICTIM, k - 1))  # an approximation, not the lost state
    # fresh optimizer, lr x 1.1 kept for that stage, the warm-up continued on the global step
    assert res["lr"] == [pytest.approx(3e-3 * 1.1)], res["lr"]
    for s in _steps(out, spare):
        assert s["lr"] == [pytest.approx(3e-3 * 1.1 * W.lr_factor(s["step"]))], s
    # no survivor rolled back: their states match the failure-free run up to the failure step
    for stage in (0, 1, 3):
        r = _result(out, stage)
        assert r["steps_done"] == STEPS and len(r["recoveries"]) == 1, r
        assert r["recoveries"][0]["step"] == k and r["lr"] == [pytest.approx(3e-3)]
        for step in range(k):
            assert _same(_state(out, stage, step), _state(free, stage, step)), (stage, step)
        assert [s["step"] for s in _steps(out, stage)] == list(range(STEPS))
        for s in _steps(out, stage):
            assert s["lr"] == [pytest.approx(3e-3 * W.lr_factor(s["step"]))], (stage, s)
    assert [s["step"] for s in _steps(out, spare)] == list(range(k, STEPS))
    served = sorted(x for r in (1, 3) for x in _result(out, r)["recoveries"][0]["served"])
    assert served == ["neighbour of stage 2", "neighbour of stage 2"], served
    fig = figures(free, out)
    print("\ncheckfree pipeline figures:", json.dumps(fig, indent=1))


def test_a_surviving_replica_is_preferred_and_exact(tmp_path, free):
    out, logs = run_failure(str(tmp_path), "replica")
    spare = "spare"
    res = _result(out, spare)
    (rec,) = res["recoveries"]
    assert rec["strategy"] == "stage replica" and rec["step"] == KILL_STEP, rec
    assert "recovered step 2 with stage replica from the replica held by stage 3" in logs
    assert "with checkfree" not in logs and "checkfree cannot" not in logs
    assert res["lr"] == [pytest.approx(3e-3)]
    for stage in range(W.NUM_STAGES):
        for step in range(STEPS):
            assert _same(_state(out, stage, step), _state(free, stage, step)), (stage, step)
    assert [s["loss"] for s in _steps(out, 3)] == [s["loss"] for s in _steps(free, 3)]
    print("\nreplica pipeline figures:", json.dumps(figures(free, out), indent=1))


def test_a_replacement_started_after_the_loss_takes_the_stage(tmp_path, free):
    """No spare: the survivors re-form, wait for a replacement, admit the process the test
    starts after the kill; it takes stage 2 from its replica on stage 3's process (exact),
    and the run is bit-identical to the failure-free one."""
    out, logs = run_failure(str(tmp_path), "replace")
    res = _result(out, "joiner")
    assert res["took_stage"] == W.VICTIM and res["steps_done"] == STEPS, (res, logs[-3000:])
    (rec,) = res["recoveries"]
    assert rec["strategy"] == "stage replica" and rec["step"] == KILL_STEP, rec
    assert rec["detected_by"] == "joined the job" and rec["replaced_by"] == {"2": res["launch_rank"]}, rec
    assert res["launch_rank"] >= W.NUM_STAGES  # a fresh launch rank, never the lost one's
    for stage in (0, 1, 3):
        r = _result(out, stage)
        assert r["steps_done"] == STEPS and len(r["recoveries"]) == 1, r
        assert r["recoveries"][0]["replaced_by"] == {"2": res["launch_rank"]}, r["recoveries"]
        assert [s["step"] for s in _steps(out, stage)] == list(range(STEPS))
    assert [s["step"] for s in _steps(out, "joiner")] == list(range(KILL_STEP, STEPS))
    for stage in range(W.NUM_STAGES):
        for step in range(STEPS):
            assert _same(_state(out, stage, step), _state(free, stage, step)), (stage, step)
    assert [s["loss"] for s in _steps(out, 3)] == [s["loss"] for s in _steps(free, 3)]
    killed = _result(out, 0)["killed"]
    print(
        "\nreplacement after the loss:",
        json.dumps(
            {
                "survivors_back_s": {
                    str(r): round(_result(out, r)["recoveries"][0]["total_s"], 3) for r in (0, 1, 3)
                },
                "joiner_rebuild_s": round(rec["rebuild_s"], 3),
                "joiner_ready_after_kill_s": round(rec["detected_at"] + rec["total_s"] - killed, 3)
                if killed
                else None,
            }
        ),
    )


def test_a_replacement_that_dies_as_it_joins_is_followed_by_the_next(tmp_path, free):
    """The first replacement is admitted and dies before taking the stage: the survivors'
    recovery fails on it, starts over (regroup, wait) and admits the next one, which takes
    stage 2 exactly; the run is still bit-identical to the failure-free one."""
    out, logs = run_failure(str(tmp_path), "replace", joiners=("die", ""))
    (first,) = [n for n in os.listdir(out) if n.startswith("admitted-")]
    res = _result(out, "joiner")
    assert res["took_stage"] == W.VICTIM and res["steps_done"] == STEPS, (res, logs[-3000:])
    assert res["launch_rank"] > int(first.split("-")[1]) >= W.NUM_STAGES, (first, res)
    assert res["recoveries"][0]["strategy"] == "stage replica", res["recoveries"]
    for stage in (0, 1, 3):
        recs = _result(out, stage)["recoveries"]
        assert recs[-1]["replaced_by"] == {"2": res["launch_rank"]} and recs[-1]["step"] == KILL_STEP, recs
    for stage in range(W.NUM_STAGES):
        for step in range(STEPS):
            assert _same(_state(out, stage, step), _state(free, stage, step)), (stage, step)


def test_a_spare_that_dies_as_it_takes_the_stage_is_followed_by_the_next(tmp_path, free):
    """Two spares; the first dies after the members handed it stage 2: the survivors' and
    the other spare's recovery fails on it and starts over, the second spare takes the stage
    from its replica, and the run is bit-identical to the failure-free one."""
    out, logs = run_failure(str(tmp_path), "replica", spares=("dyingspare", "spare"))
    assert os.path.exists(os.path.join(out, "dying")), logs[-3000:]
    res = _result(out, "spare")
    assert res["took_stage"] == W.VICTIM and res["steps_done"] == STEPS, (res, logs[-3000:])
    assert res["recoveries"][-1]["strategy"] == "stage replica", res["recoveries"]
    for stage in (0, 1, 3):
        r = _result(out, stage)
        assert r["recoveries"][-1]["replaced_by"] == {"2": res["launch_rank"]}, r["recoveries"]
    for stage in range(W.NUM_STAGES):
        for step in range(STEPS):
            assert _same(_state(out, stage, step), _state(free, stage, step)), (stage, step)


def main() -> None:
    """Measure once and write bench/results/checkfree_pipeline.json."""
    import platform
    import tempfile

    from tests.integrations.test_pipeline_checkpoint_restart import (
        restart_figures,
        rollback_figures,
        run_restart,
    )

    global STEPS, KILL_STEP
    STEPS, KILL_STEP = 24, 12  # longer than the tests' runs, for steadier step medians
    # the library's default wait for a member that has not acknowledged the regroup (three
    # beats), as a deployment gets it; the tests wait 1.0 s, generous on a loaded CI host
    os.environ["RECOVERKIT_ACK_S"] = str(3 * 0.1)
    base = tempfile.mkdtemp(prefix="checkfree-pipeline-")
    try:
        free = run_free(base)
        out, _ = run_failure(base, "checkfree")
        fig = figures(free, out)
        exact, _ = run_failure(base, "replica")
        replica = figures(free, exact)["summary"]
        steps = [
            s["seconds"]
            for r in [*(i for i in range(W.NUM_STAGES) if i != W.VICTIM), "spare"]
            for s in _steps(exact, r)
            if s["step"] not in (0, KILL_STEP)
        ]
        replica["step_s"] = statistics.median(steps)
        replica["step_overhead"] = replica["step_s"] / fig["summary"]["step_s"] - 1.0
        fig["replica"] = replica
        fig["restart"] = restart_figures(run_restart(base))
        fig["rollback"] = rollback_figures(run_failure(base, "rollback", victim=0)[0])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    fig["definitions"] = {
        "step_s": "one training step, median over the failure-free run's steps after the first, every stage",
        "detection_s": "SIGKILL of the victim's node -> the slowest survivor's failed pipeline op",
        "relaunch_s": "the spare's share: joining the survivors' regroup until the new group formed",
        "fetch_s": "the spare rebuilding the stage: neighbours' weights and norms fetched point to point, averaged, fresh optimizer, new schedules",
        "recovery_s": "detection -> pipeline re-formed, the slowest process",
        "redo_step_s": "the failed step, redone by the rebuilt stage",
        "replica": "the same failure with a per-step replica of every stage (model + AdamW) on the next stage's process: exact recovery; step_s and step_overhead are that mode's step and its cost over step_s",
        "restart": "checkpoint-restart of the same pipeline (4 workers, one torchrun agent, --max-restarts=1, a StageCheckpoints save of every stage to local disk after every step): the victim's worker SIGKILLed, torchrun stops the others and restarts all four; each figure is the SIGKILL -> the slowest worker's phase: relaunched_s (its process started), imported_s (interpreter and imports), job_ready_s (process group, job store and pipeline formed; building the first optimizer imports torch._dynamo), restored_s (the newest checkpoint restored), first_step_s (the first step after it done); restore_s: the restore alone, import_s: the interpreter and imports alone",
        "rollback": "the same pipeline with a spare and stage checkpoints saved after every odd step; stage 0 (an edge: CheckFree refuses it, no replica) lost inside the kill step: every stage rolls back in process (no process restarted) to the newest step all committed. detection_s: SIGKILL -> the slowest process's failed op; regroup_s: the group re-formed with the spare; rollback_s: the step agreed and every stage restored from disk; recovery_s: detection -> pipeline re-formed, the slowest process",
    }
    fig["setup"] = {
        "stages": W.NUM_STAGES,
        "spares": 1,
        "schedule": "ScheduleGPipe",
        "micro_batches": W.MICRO,
        "backend": "gloo",
        "model": f"byte-level, d={W.D}, {W.LAYERS} block(s) per stage",
        "steps": STEPS,
        "kill_step": KILL_STEP,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "launch": "2 torchrun agents (simulated nodes: the victim's alone), its node SIGKILLed",
        "heartbeat": "a beat every 0.1 s, dead after 2.0 s without one; the regroup closes without a member "
                     f"that has not acknowledged it after {os.environ['RECOVERKIT_ACK_S']} s (the library's "
                     "default, three beats; the tests wait 1.0 s)",
    }
    path = os.path.join(REPO, "bench", "results", "checkfree_pipeline.json")
    with open(path, "w") as f:
        json.dump(fig, f, indent=1)
        f.write("\n")
    print(json.dumps(fig, indent=1))


if __name__ == "__main__":
    main()


@pytest.mark.parametrize("edge", ["first", "last"])
def test_checkfree_plus_a_lost_edge_stage_copies_its_partner(tmp_path, edge):
    """CheckFree+ on the real pipeline (odd micro-batches through the swapped order), an edge
    stage's node SIGKILLed: the spare rebuilds it as its partner's blocks after step
    KILL_STEP-1 plus its own embedding or head as copied to the partner's process after that
    step. (The first stage's process is then not launch rank 0, which hosts the store.)"""
    lost_stage = 0 if edge == "first" else W.NUM_STAGES - 1
    partner_stage = 1 if edge == "first" else W.NUM_STAGES - 2
    out, logs = run_failure(str(tmp_path), "plus", victim=lost_stage)
    k, spare = KILL_STEP, "spare"
    res = _result(out, spare)
    assert res["took_stage"] == lost_stage and res["steps_done"] == STEPS, res
    (rec,) = res["recoveries"]
    assert rec["strategy"] == "checkfree+" and rec["step"] == k and rec["lost"] == [lost_stage]
    assert (
        f"recovered step 2 with checkfree+ from CheckFree+ copy of stage {partner_stage} at step 2"
        in logs
    )
    partner, lost = _state(out, partner_stage, k - 1), _state(out, lost_stage, k - 1)
    rebuilt = torch.load(os.path.join(out, f"rebuilt-{lost_stage}.pt"), weights_only=True)
    assert sorted(rebuilt) == sorted(lost)
    own = {"first": ("embed.",), "last": ("head.", "head_norm.")}[edge]
    assert any(key.startswith(own) for key in rebuilt)
    for key, value in rebuilt.items():
        want = lost[key] if key.startswith(own) else partner[key]
        assert torch.equal(value, want), key
    assert res["lr"] == [pytest.approx(3e-3 * 1.1)]
    served = _result(out, partner_stage)["recoveries"][0]["served"]
    assert sorted(served) == [
        f"edge copy of stage {lost_stage}",
        f"neighbour of stage {lost_stage}",
    ]
    for stage in range(W.NUM_STAGES):
        if stage != lost_stage:
            r = _result(out, stage)
            assert r["steps_done"] == STEPS
            assert [s["step"] for s in _steps(out, stage)] == list(range(STEPS))


def _swapped_step_grads(rank: int, world: int) -> dict[str, bytes]:
    """One CheckFree+ step of the 4-stage pipeline (no clipping); this stage's gradients as
    float32 bytes (plain bytes: a tensor sent through the result queue shares its storage by
    a file descriptor that the worker's exit may close before the parent reads it)."""
    from recoverkit.distributed.regroup import Heartbeat, Membership, job_store
    from recoverkit.elastic.pipeline import PipelineOptions, StagePipeline
    from recoverkit.recovery.checkfree import CheckFreeOptions

    store = job_store(timeout_s=30.0)
    membership = Membership.initial(store)
    heartbeat = Heartbeat(store, membership, interval_s=0.1, miss_s=5.0).start()
    try:
        options = PipelineOptions(
            num_stages=W.NUM_STAGES,
            n_microbatches=W.MICRO,
            checkfree=CheckFreeOptions(plus=True, max_grad_norm=float("inf")),
        )
        pipe = StagePipeline(
            W.build_stage,
            W.make_optimizer,
            W.loss_fn,
            W.batch,
            store=store,
            membership=membership,
            heartbeat=heartbeat,
            options=options,
            split=W.split,
        )
        pipe.step()
        assert pipe.module is not None
        return {
            n: p.grad.detach().contiguous().numpy().tobytes()
            for n, p in pipe.module.named_parameters()
            if p.grad is not None
        }
    finally:
        heartbeat.stop()


def test_checkfree_plus_swapped_micro_batches_have_the_hand_computed_gradients():
    """The gradients of one step whose odd micro-batches run the blocks in the order
    1, 0, 3, 2 (embedding first, head last) equal those of running the blocks in that order by
    hand, bit for bit, and differ from the order 0, 1, 2, 3 for every micro-batch."""
    from tests.distributed.harness import run_world

    raw = run_world(W.NUM_STAGES, _swapped_step_grads, timeout_s=120)

    def by_hand(swap: bool) -> list[dict[str, torch.Tensor]]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            stages = [W.build_stage(i) for i in range(W.NUM_STAGES)]
            parts = [W.split(m) for m in stages]
            x, y = W.batch(0)
            xs, ys = x.tensor_split(W.MICRO), y.tensor_split(W.MICRO)
            for m in [*range(0, W.MICRO, 2), *range(1, W.MICRO, 2)]:  # the pipeline's order
                order = [1, 0, 3, 2] if swap and m % 2 else [0, 1, 2, 3]
                embed, head = parts[0][0], parts[-1][2]
                assert embed is not None and head is not None
                h = embed(xs[m])
                for i in order:
                    h = parts[i][1](h)
                (W.loss_fn(head(h), ys[m]) / W.MICRO).backward()
            return [{n: p.grad for n, p in s.named_parameters()} for s in stages]
        finally:
            torch.set_num_threads(threads)

    swapped, ordered = by_hand(True), by_hand(False)
    got = [
        {
            n: torch.frombuffer(bytearray(b), dtype=torch.float32).view_as(swapped[s][n])
            for n, b in raw[s].items()
        }
        for s in range(W.NUM_STAGES)
    ]
    for stage in range(W.NUM_STAGES):
        assert sorted(got[stage]) == sorted(swapped[stage])
        for name, grad in got[stage].items():
            assert torch.equal(grad, swapped[stage][name]), (stage, name)
        assert not all(torch.equal(got[stage][n], ordered[stage][n]) for n in got[stage]), stage
