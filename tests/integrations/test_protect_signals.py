"""protect() signals and exits: group signals with DataLoader workers, releasing everything
when entry fails, the final step saved once, failed saves never ending in exit 0, and one
INFO line per committed save.

The signal tests run real trainers in process groups of their own and signal the whole group
with ``os.killpg``, as SLURM, torchrun and a terminal's Ctrl-C do. This module is also the
trainer of the hidden-loader test: ``python -m tests.integrations.test_protect_signals ROOT``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import recoverkit
from recoverkit import Checkpointer, CheckpointOptions, CommitError, TierPolicy
from recoverkit.storage.faults import FaultInjector, FaultyFS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST_AND_LOCAL = CheckpointOptions(tiers=TierPolicy(local_every=1, host_keep=1))


# ------------------------------------------------------------------ group signals
def _start_group(*args: str) -> subprocess.Popen:
    """A trainer leading a process group of its own (its DataLoader workers start in it)."""
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )


def _signal_group_at(proc: subprocess.Popen, step: int, sig: int) -> tuple[int, int, str]:
    """Signal the trainer's whole group once it reports ``step``; return (exit code, last
    step it reported, its stderr)."""
    last = 0
    try:
        for line in proc.stdout:
            ev = json.loads(line)
            if ev["event"] == "step":
                last = ev["step"]
                if last == step:
                    os.killpg(proc.pid, sig)
                    break
        for line in proc.stdout:
            ev = json.loads(line)
            if ev["event"] == "step":
                last = ev["step"]
        code = proc.wait(timeout=120)
        return code, last, proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _latest(root: str) -> int | None:
    with Checkpointer(root) as ckpt:
        return ckpt.latest()


def test_group_sigterm_with_loader_workers_saves_the_reached_step_and_exits_143(tmp_path):
    root = str(tmp_path / "run")
    # a TinyTransformer over a shuffling DataLoader with num_workers=2; no periodic saves
    proc = _start_group("-m", "tests.integrations.protect_worker", root, "1000", "1000")
    code, last, err = _signal_group_at(proc, 5, signal.SIGTERM)
    assert code == 143, err[-3000:]
    assert "killed by signal" not in err and "exited unexpectedly" not in err, err[-3000:]
    assert last >= 5 and _latest(root) == last  # the reached step is durable and committed


def test_group_sigint_warns_once_and_exits_130(tmp_path):
    root = str(tmp_path / "run")
    proc = _start_group("-m", "tests.integrations.protect_worker", root, "1000", "1000")
    code, last, err = _signal_group_at(proc, 5, signal.SIGINT)
    assert code == 130, err[-3000:]
    assert err.count("SIGINT received") == 1, err[-3000:]  # not once more per worker
    assert _latest(root) == last


class _Hidden:
    """An iterable whose DataLoader protect() cannot see (so cannot move its workers out of
    the trainer's process group): its workers die of a group signal."""

    def __init__(self, loader: DataLoader) -> None:
        self._batches = lambda: iter(loader)

    def __iter__(self):
        return self._batches()


def _hidden_loader_trainer(root: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = TensorDataset(torch.randn(4096, 8))
    loader = _Hidden(DataLoader(data, batch_size=8, num_workers=2))
    with recoverkit.protect(root, model=model, optimizer=opt, loader=loader, save_every=1000, epochs=None,
                            max_steps=100_000, grace_s=20) as run:
        for (x,) in run:
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            print(json.dumps({"event": "step", "step": run.step + 1}), flush=True)


def test_group_sigterm_killing_unreachable_workers_is_still_a_preemption(tmp_path):
    root = str(tmp_path / "run")
    proc = _start_group("-m", "tests.integrations.test_protect_signals", root)
    code, last, err = _signal_group_at(proc, 20, signal.SIGTERM)
    assert code == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert last >= 20 and _latest(root) == last


# ------------------------------------------------------------------ failures on entry
class _BrokenLoader:
    """A loader that fails as soon as protect() looks at it."""

    def __getattribute__(self, name: str):
        raise RuntimeError(f"broken loader ({name})")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 4)


def _train(root: str, model: torch.nn.Module, **kwargs) -> recoverkit.session.Run:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with recoverkit.protect(root, model=model, optimizer=opt, **kwargs) as run:
        for _ in run:
            model(torch.ones(1, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
    return run


def test_a_bad_loader_on_entry_releases_the_lock_and_the_handlers(tmp_path):
    root = str(tmp_path / "run")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
    with pytest.raises(RuntimeError, match="broken loader"):
        with recoverkit.protect(root, model=_model(), loader=_BrokenLoader(), save_every=1):
            pass
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    run = _train(root, _model(), loader=range(3), save_every=1)  # the retry gets the lock
    assert run.step == 3 and _latest(root) == 3


def test_a_restore_error_on_entry_releases_the_lock_and_the_handlers(tmp_path):
    root = str(tmp_path / "run")
    _train(root, _model(), loader=range(2), save_every=1)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
    with pytest.raises((ValueError, RuntimeError)):  # the checkpoint holds a 4x4 layer
        _train(root, torch.nn.Linear(3, 3), loader=range(2), save_every=1)
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    run = _train(root, _model(), loader=range(100), epochs=None, max_steps=5, save_every=1)
    assert run.resumed_from == 2 and _latest(root) == 5


def test_protect_takes_nothing_until_entered(tmp_path):
    root = str(tmp_path / "run")
    pending = recoverkit.protect(root, model=_model(), loader=range(2))
    with Checkpointer(root) as ckpt:  # the lock is free: nothing was taken yet
        ckpt.save(1, {"x": torch.ones(2)})
    del pending


# ------------------------------------------------------------------ the final step
class _Recording(Checkpointer):
    """The real Checkpointer, remembering the step of every lazy save it was asked for."""

    def __init__(self, root: str, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.asked: list[int] = []

    def save_async(self, step, state, **kwargs):
        self.asked.append(step)
        return super().save_async(step, state, **kwargs)


@pytest.mark.parametrize(
    "kwargs, saves",
    [
        (dict(loader=range(100), epochs=None, max_steps=5, save_every=2), [2, 4, 5]),
        (dict(loader=range(100), epochs=None, max_steps=4, save_every=2), [2, 4]),
        (dict(loader=range(7), epochs=1, save_every=3), [3, 6, 7]),
        (dict(loader=range(6), epochs=1, save_every=3), [3, 6]),
    ],
)
def test_the_final_step_is_saved_once(tmp_path, kwargs, saves):
    root = str(tmp_path / "run")
    ckpt = _Recording(root)
    run = _train(root, _model(), checkpointer=ckpt, **kwargs)
    assert run.step == saves[-1]
    assert ckpt.asked == saves
    assert _latest(root) == saves[-1]


def test_a_loop_left_by_break_saves_no_half_counted_step(tmp_path):
    root = str(tmp_path / "run")
    ckpt = _Recording(root)
    with recoverkit.protect(root, model=_model(), loader=range(10), save_every=2, checkpointer=ckpt) as run:
        for _ in run:
            if run.step == 3:
                break
    assert ckpt.asked == [2]


# ------------------------------------------------------------------ failed saves
def _train_through_failed_saves(root: str, **kwargs) -> tuple[recoverkit.session.Run, FaultInjector]:
    """Six steps, a save at each; the write of the save of step 3 fails."""
    faults = FaultInjector()
    ckpt = Checkpointer(root, options=HOST_AND_LOCAL, fs=FaultyFS(faults), faults=faults)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with recoverkit.protect(root, model=model, optimizer=opt, loader=range(6), save_every=1, checkpointer=ckpt,
                            **kwargs) as run:
        for _ in run:
            model(torch.ones(1, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            if run.step + 1 == 3:
                assert ckpt.wait(60)
                faults.fail_at(op="write_segment")
            if run.step + 1 == 4:
                assert ckpt.settle(60)  # step 3's save is written, not superseded by step 4's
    return run, faults


def test_failed_saves_raise_when_the_loop_ends_by_default(tmp_path):
    root = str(tmp_path / "run")
    with pytest.raises(CommitError, match="step 3") as info:
        _train_through_failed_saves(root)
    assert info.value.step == 3
    assert _latest(root) == 6  # everything was flushed and the lock released before raising


def test_failed_saves_exit_non_zero_when_asked(tmp_path, caplog):
    root = str(tmp_path / "run")
    with caplog.at_level(logging.ERROR, logger="recoverkit"):
        with pytest.raises(SystemExit) as info:
            _train_through_failed_saves(root, on_failed_saves="exit")
    assert info.value.code == 1
    assert any("1 save(s) failed (steps 3)" in r.getMessage() for r in caplog.records)
    assert _latest(root) == 6


def test_failed_saves_only_warn_when_asked(tmp_path, caplog):
    root = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="recoverkit"):
        run, faults = _train_through_failed_saves(root, on_failed_saves="warn")
    assert faults.fired == 1 and [s for s, _ in run.failed_saves] == [3]
    assert any("1 save(s) failed (steps 3)" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_on_failed_saves_is_checked_before_anything_is_taken(tmp_path):
    with pytest.raises(ValueError, match="on_failed_saves"):
        recoverkit.protect(str(tmp_path / "run"), model=_model(), loader=range(2), on_failed_saves="ignore")
    assert not os.path.exists(tmp_path / "run")


def test_a_failed_save_exits_non_zero_from_a_real_script(tmp_path):
    """The default, end to end: the script's last save fails, so it must not exit 0."""
    script = (
        "import sys, torch, recoverkit\n"
        "from recoverkit import Checkpointer\n"
        "from recoverkit.storage.faults import FaultInjector, FaultyFS\n"
        "faults = FaultInjector()\n"
        "ckpt = Checkpointer(sys.argv[1], fs=FaultyFS(faults), faults=faults)\n"
        "model = torch.nn.Linear(2, 2)\n"
        "with recoverkit.protect(sys.argv[1], model=model, loader=range(4), save_every=2, checkpointer=ckpt) as run:\n"
        "    for _ in run:\n"
        "        if run.step + 1 == 4:\n"
        "            ckpt.wait(60); faults.fail_at(op='write_segment')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "CommitError" in done.stderr, done.stderr[-2000:]


# ------------------------------------------------------------------ the save log
def _save_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "recoverkit" and r.levelno == logging.INFO and "saved step" in r.getMessage()]


def test_one_info_line_per_committed_save(tmp_path, caplog):
    model = _model()
    with caplog.at_level(logging.INFO, logger="recoverkit"):
        with recoverkit.protect(str(tmp_path / "run"), model=model, loader=range(5), save_every=2) as run:
            for _ in run:
                assert run.ckpt.settle(60)  # each save is written, none superseded by the next
                model.weight.data += 1
    lines = _save_lines(caplog)
    assert [int(line.split("saved step ")[1].split()[0]) for line in lines] == [2, 4, 5], lines
    assert all(" to local (" in line and "B, training stalled " in line and " ms)" in line for line in lines), lines


def test_the_save_log_can_be_turned_off(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="recoverkit"):
        _train(str(tmp_path / "off"), _model(), loader=range(5), save_every=2, log_saves=False)
    assert _save_lines(caplog) == []
    with caplog.at_level(logging.WARNING, logger="recoverkit"):
        _train(str(tmp_path / "level"), _model(), loader=range(5), save_every=2)
    assert _save_lines(caplog) == []


if __name__ == "__main__":
    _hidden_loader_trainer(sys.argv[1])
