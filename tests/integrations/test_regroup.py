"""A node lost under torchrun, and the survivors re-form the process group in process.

Two torchrun agents on this machine, one per simulated node (``RECOVERKIT_NODE`` a and b),
``--nnodes 1:2 --nproc-per-node 2`` with a c10d rendezvous on localhost and no restarts, run
4 gloo ranks (tests/integrations/regroup_worker.py) that all-reduce in a loop. The test
SIGKILLs one node: its agent's process group and its workers (torchrun starts each worker
in its own session).

- Node b lost (SIGKILL): the 2 survivors on node a see their collective fail within the
  group's timeout, agree through the shared store (on node a, hosted by global rank 0 or, with
  torch's default TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0, by node a's agent) on a world of 2,
  form a new default group with dense ranks (launch ranks 0, 1 -> 0, 1) and all-reduce the
  right sum; node a's agent (restarts allowed) does not restart them, and they exit 0.
- Node b frozen (SIGSTOP: no socket closes): a plain collective ends at gloo's timeout;
  waited with ``wait_alive``, it raises once the frozen ranks' heartbeats stop. The frozen
  ranks neither beat nor acknowledge, and the survivors go on without them.
- Node a lost (the store lives there, whether the agent or global rank 0 hosts it): the
  survivors on node b get ``RegroupError(reason="store_lost")`` within the bound, no hang.
- The lost node hosted the c10d rendezvous: the surviving agent fails and ends its workers
  (torchrun's behaviour, recorded here: in-process recovery needs the rendezvous host alive).

Which node hosts what is fixed, not raced: ``--rdzv-conf is_host=`` picks the rendezvous host,
and ``--local-addr`` (127.0.0.1 for node a, localhost for node b) puts global ranks 0 and 1 on
node a.

Bounds, not speed: detection must come within the group's timeout plus slack for a loaded
machine. The figures (detection, re-forming) are printed for the record.
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
from tests.integrations.test_torchrun_restart import REPO, torchrun_env

PG_TIMEOUT_S = 10.0
SLACK_S = 15.0  # a loaded 2-core machine


def _launch(
    base: str, env_extra: dict[str, str], pg_timeout_s: float = PG_TIMEOUT_S, wait: str = "alive", rdzv_host: str = "a"
) -> tuple[list[subprocess.Popen], str]:
    """Both agents. Node a gets global ranks 0 and 1: the rendezvous numbers the nodes in the
    order of their addresses (then pids), and a's 127.0.0.1 sorts before b's localhost. The
    agent of ``rdzv_host`` hosts the c10d rendezvous store (``is_host``), the other connects
    to it (retrying until it is up)."""
    out = os.path.join(base, "out")
    os.makedirs(out, exist_ok=True)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    port = free_port()
    procs = []
    for node, addr in (("a", "127.0.0.1"), ("b", "localhost")):
        cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        cmd += ["--nnodes=1:2", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-conf=is_host={int(node == rdzv_host)}", f"--local-addr={addr}",
                "--rdzv-id=regroup", "--max-restarts=1", "--monitor-interval=0.1",
                "-m", "tests.integrations.regroup_worker", out, str(pg_timeout_s), wait]
        env = dict(torchrun_env(), RECOVERKIT_NODE=node, LOGLEVEL="INFO", **env_extra)
        log = open(os.path.join(base, f"agent-{node}.log"), "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    return procs, out


def _wait_files(out: str, names: list[str], timeout_s: float, procs: list[subprocess.Popen], base: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(os.path.exists(os.path.join(out, n)) for n in names):
        if time.monotonic() > deadline:
            logs = {n: open(os.path.join(base, f"agent-{n}.log")).read()[-3000:] for n in "ab"}
            raise AssertionError(f"missing {[n for n in names if not os.path.exists(os.path.join(out, n))]}; "
                                 f"have {sorted(os.listdir(out))}; logs {logs}")
        time.sleep(0.05)


def _pids(out: str, node: str) -> dict[int, int]:
    pids = {}
    for name in os.listdir(out):
        if name.startswith(f"pid-{node}-") and not name.endswith(".tmp"):
            with open(os.path.join(out, name)) as f:
                pids[int(name.rsplit("-", 1)[1])] = int(json.load(f))
    return pids


def _kill_node(procs: list[subprocess.Popen], out: str, node: str, sig: int = signal.SIGKILL) -> None:
    """SIGKILL (or SIGSTOP) a node: its agent's process group and its workers; records the time first."""
    agent = procs["ab".index(node)]
    workers = _pids(out, node)
    t = time.time()
    os.killpg(agent.pid, sig)
    for pid in workers.values():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    with open(os.path.join(out, "killed.tmp"), "w") as f:
        f.write(repr(t))
    os.replace(os.path.join(out, "killed.tmp"), os.path.join(out, "killed"))


def _end(procs: list[subprocess.Popen], out: str) -> None:
    """Ends whatever is left: the agents' process groups and every worker recorded."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=30)
    for node in "ab":
        for pid in _pids(out, node).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _result(out: str, rank: int) -> dict:
    with open(os.path.join(out, f"result-{rank}.json")) as f:
        return json.load(f)


def _survive(tmp_path, sig: int, pg_timeout_s: float, share_store: bool = False, wait: str = "alive") -> list[dict]:
    """Node b SIGKILLed (or SIGSTOPped: its sockets stay open); node a's 2 ranks go on as a world of 2."""
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0" if share_store else "1"}
    procs, out = _launch(str(tmp_path), env, pg_timeout_s, wait)
    try:
        _wait_files(out, [f"step-{r}" for r in range(4)], 120, procs, str(tmp_path))
        before = _pids(out, "a")
        assert sorted(before) == [0, 1], before
        _kill_node(procs, out, "b", sig)
        _wait_files(out, ["result-0.json", "result-1.json", "exit-0", "exit-1"], pg_timeout_s + 20 + SLACK_S, procs, str(tmp_path))
        results = [_result(out, r) for r in (0, 1)]
        for r, res in enumerate(results):
            assert "error" not in res, res
            assert res["generation"] == 1 and res["members"] == [0, 1] and res["lost"] == [2, 3], res
            assert res["rank"] == r and res["world_size"] == 2 and res["rank_map"] == {"0": 0, "1": 1}, res
            assert res["sum"] == 3.0, res  # launch ranks 0 and 1 contribute 1 and 2
            assert res["detect_s"] is not None and res["detect_s"] < pg_timeout_s + SLACK_S, res
        # node a's agent (restarts allowed) did not restart its workers: same processes, and
        # after they exited 0 it reports success and waits in its exit barrier for node b
        log = str(tmp_path / "agent-a.log")
        deadline = time.monotonic() + 30
        while "worker group successfully finished" not in open(log).read() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = open(log).read()
        assert "worker group successfully finished" in text, text[-3000:]
        assert "will restart worker group" not in text, text[-3000:]
        assert _pids(out, "a") == before
        assert procs[0].poll() is None  # in its exit barrier (300 s), not restarting
        return results
    finally:
        _end(procs, out)


def _figures(results: list[dict]) -> str:
    keys = ("detect_s", "heartbeat_detect_s", "reform_s", "phases_s")
    return json.dumps([{k: res[k] for k in keys} for res in results])


@pytest.mark.slow
@pytest.mark.parametrize(("host", "wait"), [("rank0", "alive"), ("agent", "alive"), ("rank0", "plain")])
def test_survivors_of_a_lost_node_regroup_in_process(tmp_path, host, wait):
    """The store on node a: hosted by global rank 0 (as the project's launches do) or by node
    a's agent; collectives waited with wait_alive or plainly."""
    results = _survive(tmp_path, signal.SIGKILL, PG_TIMEOUT_S, share_store=host == "agent", wait=wait)
    print(f"\nregroup figures (SIGKILL, store in {host}, {wait}):", _figures(results))


@pytest.mark.slow
@pytest.mark.parametrize("wait", ["alive", "plain"])
def test_survivors_of_a_frozen_node_regroup(tmp_path, wait):
    """SIGSTOP keeps the node's sockets open: no reset. A plain collective ends only at gloo's
    timeout (20 s here); wait_alive raises once the frozen ranks' heartbeats stop (1 s), and
    regroup does not wait for the stuck collective. The frozen ranks neither beat nor
    acknowledge: they are left out either way."""
    pg_timeout_s = 20.0
    results = _survive(tmp_path, signal.SIGSTOP, pg_timeout_s, wait=wait)
    for res in results:
        assert res["heartbeat_detect_s"] is not None, res
        if wait == "alive":  # seen by the heartbeat, not by gloo's timeout (a bound, with slack)
            assert res["detect_s"] < pg_timeout_s, res
            # its own heartbeat saw them stop, or saw the other survivor's regroup first
            assert "stopped beating" in res["collective_error"] or "started a regroup" in res["collective_error"], res
    print(f"\nregroup figures (SIGSTOP, {wait}):", _figures(results))


@pytest.mark.slow
@pytest.mark.parametrize("host", ["rank0", "agent"])
def test_losing_the_node_that_hosts_the_store_raises_regroup_error(tmp_path, host):
    """Node a holds the store (in global rank 0, or in its agent); the rendezvous is on node b,
    so node b's agent lives on and only the store is gone."""
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1" if host == "rank0" else "0"}
    procs, out = _launch(str(tmp_path), env, rdzv_host="b")
    try:
        _wait_files(out, [f"step-{r}" for r in range(4)], 120, procs, str(tmp_path))
        assert sorted(_pids(out, "a")) == [0, 1], _pids(out, "a")
        _kill_node(procs, out, "a")
        _wait_files(out, ["result-2.json", "result-3.json"], PG_TIMEOUT_S + 20 + SLACK_S, procs, str(tmp_path))
        for rank in (2, 3):
            res = _result(out, rank)
            assert res.get("error") == "store_lost", res
            assert res["detect_s"] is not None and res["detect_s"] < PG_TIMEOUT_S + SLACK_S, res
            assert res["regroup_s"] < 20 + SLACK_S, res
        print("\nstore-lost figures:", json.dumps([{k: _result(out, r)[k] for k in ("detect_s", "regroup_s")} for r in (2, 3)]))
    finally:
        _end(procs, out)


@pytest.mark.slow
def test_losing_the_rendezvous_host_ends_the_surviving_agent(tmp_path):
    """torchrun's behaviour, recorded: when the lost node's agent hosted the c10d rendezvous
    store, the surviving agent's next look at the rendezvous (``num_nodes_waiting``, every
    monitor interval) raises RendezvousConnectionError, and the agent ends its own workers and
    exits non-zero, whatever they were doing. In-process recovery needs the rendezvous host
    (in production: a node that is not lost, or an etcd/external store) to survive."""
    procs, out = _launch(str(tmp_path), {"RECOVERKIT_REGROUP_LINGER_S": "30"}, rdzv_host="b")
    try:
        _wait_files(out, [f"step-{r}" for r in range(4)], 120, procs, str(tmp_path))
        _kill_node(procs, out, "b")
        try:
            code = procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        text = open(tmp_path / "agent-a.log").read()
        assert code not in (0, None), (code, text[-3000:])
        assert "RendezvousConnectionError" in text, text[-3000:]
        assert not os.path.exists(os.path.join(out, "exit-0")), "the workers were ended by their agent, before their end"
    finally:
        _end(procs, out)
