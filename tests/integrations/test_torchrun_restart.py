"""2-rank DDP and FSDP2 jobs under ``torchrun --max-restarts``: a worker SIGKILLed mid-run, the
workers restarted by torchrun, resumed by ``recoverkit.protect``, end bit-identical to a run
that never stopped (every loss after the resume, every final parameter).

Real launches: ``torchrun --standalone`` (a c10d rendezvous on localhost) with 2 processes
per node, gloo on CPU. Every torchrun gets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with
torch's default, the agent's store is shared with the workers and kept across restarts, and
gloo's ``init_process_group`` on a restart reads the dead attempt's addresses (see the README,
"torchrun"). The worker is this module: ``python -m tests.integrations.test_torchrun_restart
WRAP ROOT OUT TOTAL SAVE_EVERY DIE_AT DIE_RANK``.

Repeated runs (outside the test suite): ``python -m tests.integrations.test_torchrun_restart
loop N`` runs each job N times in a row and prints runs/passes per job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Any

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL, SAVE_EVERY = 12, 2


def torchrun_env() -> dict[str, str]:
    """The environment for every torchrun the tests launch (see the module docstring)."""
    return dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")


def launch(wrap: str, root: str, out: str, die_at: int, die_rank: int, *, timeout_s: float = 240) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc-per-node=2", "--max-restarts=2", "--monitor-interval=0.1",
            "-m", "tests.integrations.test_torchrun_restart",
            wrap, root, out, str(TOTAL), str(SAVE_EVERY), str(die_at), str(die_rank)]
    os.makedirs(out, exist_ok=True)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=torchrun_env())


def read_run(out: str) -> dict[str, Any]:
    """{(attempt, rank): {"losses": {step: hex}, "final": {...} or None}}."""
    runs: dict[tuple[int, int], dict[str, Any]] = {}
    for name in sorted(os.listdir(out)):
        kind, attempt, rank = name.split(".")[0].split("-")
        r = runs.setdefault((int(attempt), int(rank)), {"losses": {}, "final": None})
        with open(os.path.join(out, name)) as f:
            if kind == "losses":
                for line in f:
                    ev = json.loads(line)
                    r["losses"][ev["step"]] = ev["loss"]
            else:
                r["final"] = json.load(f)
    return runs


def check_restarted_equals_straight(straight: dict[str, Any], restarted: dict[str, Any], die_at: int) -> int:
    """Assert the restart resumed and matched the straight run bit for bit; return the resume step."""
    assert sorted(straight) == [(0, 0), (0, 1)], sorted(straight)
    attempts = sorted({a for a, _ in restarted})
    assert attempts == [0, 1], f"expected one restart, got attempts {attempts}"
    last = {rank: restarted[(1, rank)] for rank in (0, 1)}
    resumed = {f["resumed"] for f in (last[0]["final"], last[1]["final"])}
    assert len(resumed) == 1, resumed
    step = resumed.pop()
    assert step is not None and step % SAVE_EVERY == 0 and 0 < step <= die_at, step
    for rank in (0, 1):
        ref = straight[(0, rank)]
        assert ref["final"]["resumed"] is None
        first = restarted[(0, rank)]["losses"]
        assert set(first) >= set(range(1, die_at)), (rank, sorted(first))
        for s, loss in first.items():
            assert loss == ref["losses"][s], ("attempt 0", rank, s)
        assert sorted(last[rank]["losses"]) == list(range(step + 1, TOTAL + 1)), (rank, sorted(last[rank]["losses"]))
        for s, loss in last[rank]["losses"].items():
            assert loss == ref["losses"][s], ("after the restart", rank, s)
        assert last[rank]["final"]["params"] == ref["final"]["params"], rank
        assert last[rank]["final"]["step"] == ref["final"]["step"] == TOTAL
    return step


@pytest.mark.slow
@pytest.mark.parametrize("wrap,die_rank", [("ddp", 1), ("fsdp2", 0)])
def test_sigkilled_worker_is_restarted_by_torchrun_and_resumes_bit_exact(tmp_path, wrap, die_rank):
    die_at = 7
    straight = launch(wrap, str(tmp_path / "a"), str(tmp_path / "out-a"), -1, die_rank)
    assert straight.returncode == 0, straight.stderr[-4000:]
    restarted = launch(wrap, str(tmp_path / "b"), str(tmp_path / "out-b"), die_at, die_rank)
    assert restarted.returncode == 0, restarted.stderr[-4000:]
    assert "Signals.SIGKILL" in restarted.stderr or "exitcode: -9" in restarted.stderr, restarted.stderr[-4000:]
    check_restarted_equals_straight(read_run(str(tmp_path / "out-a")), read_run(str(tmp_path / "out-b")), die_at)


# --------------------------------------------------------------------------- the worker
def _digest(t: Any) -> str:
    import hashlib

    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return hashlib.sha256(full.detach().contiguous().numpy().tobytes()).hexdigest()


def worker(wrap: str, root: str, out: str, total: int, save_every: int, die_at: int, die_rank: int) -> None:
    """Train ``total`` steps under protect; on attempt 0, rank ``die_rank`` SIGKILLs itself after ``die_at``."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset

    import recoverkit
    from recoverkit import CheckpointOptions

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model: Any = DistributedDataParallel(net)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(net[0])
        fully_shard(net[3])
        model = fully_shard(net)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    data = TensorDataset(torch.randn(96, 5, generator=torch.Generator().manual_seed(7)))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    torch.manual_seed(100 + rank)  # dropout differs per rank, and must resume per rank
    # the survivor's in-flight save fails after this long (the peer is dead) before it exits
    opts = CheckpointOptions(commit_timeout_s=5.0)
    log_path = os.path.join(out, f"losses-{attempt}-{rank}.jsonl")
    with open(log_path, "a") as log, recoverkit.protect(
        root, model=model, optimizer=opt, loader=loader, save_every=save_every, epochs=None, max_steps=total,
        grace_s=5.0, options=opts,
    ) as run:
        resumed = run.resumed_from
        for (x,) in run:
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            step = run.step + 1
            log.write(json.dumps({"step": step, "loss": loss.item().hex()}) + "\n")
            log.flush()
            if attempt == 0 and step == die_at and rank == die_rank:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-run, on the first attempt only
        reached = run.step
    params = {k: _digest(v) for k, v in model.state_dict().items()}  # FSDP2: a collective, on every rank
    with open(os.path.join(out, f"final-{attempt}-{rank}.json"), "w") as f:
        json.dump({"resumed": resumed, "step": reached, "params": params}, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def loop(n: int) -> dict[str, tuple[int, int]]:
    """Run each job ``n`` times in a row (straight + restarted each time); print and return runs/passes."""
    import tempfile
    import time
    import traceback

    tally: dict[str, tuple[int, int]] = {}
    for wrap, die_rank in (("ddp", 1), ("fsdp2", 0)):
        passes = 0
        for i in range(n):
            t0 = time.monotonic()
            with tempfile.TemporaryDirectory(prefix=f"rk-torchrun-{wrap}-") as d:
                try:
                    straight = launch(wrap, f"{d}/a", f"{d}/out-a", -1, die_rank)
                    restarted = launch(wrap, f"{d}/b", f"{d}/out-b", 7, die_rank)
                    assert straight.returncode == 0, straight.stderr[-3000:]
                    assert restarted.returncode == 0, restarted.stderr[-3000:]
                    step = check_restarted_equals_straight(read_run(f"{d}/out-a"), read_run(f"{d}/out-b"), 7)
                    passes += 1
                    print(f"{wrap} run {i + 1}: pass (resumed from step {step}, {time.monotonic() - t0:.1f} s)", flush=True)
                except Exception:  # noqa: BLE001 - counted and shown
                    print(f"{wrap} run {i + 1}: FAIL\n{traceback.format_exc()[-3000:]}", flush=True)
        tally[wrap] = (n, passes)
        print(f"{wrap}: {passes}/{n} passed", flush=True)
    return tally


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "loop":
        result = loop(int(a[1]) if len(a) > 1 else 5)
        sys.exit(0 if all(p == r for r, p in result.values()) else 1)
    worker(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]), int(a[6]))
