"""Run the real ``recoverkit`` command in a subprocess and build checkpoints to point it at."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy
from tests.models import Trainer

KEEP_ALL = CheckpointOptions(retention=RetentionPolicy(keep_last=None))


def cli(*args: str, cwd: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m recoverkit.cli ARGS`` in a fresh process; never raises on a non-zero exit."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "recoverkit.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def cli_json(*args: str) -> Any:
    """Run a command with ``--json``; assert it succeeded and return the parsed document."""
    p = cli(*args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def assert_user_error(p: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """One clear line on stderr, the documented exit code, no traceback."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, p.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])


def train_and_save(root: str, steps: tuple[int, ...] = (1, 2, 3), **extra: Any) -> Trainer:
    """Train a small transformer, saving the listed steps; return the trainer at the last one."""
    trainer = Trainer(seed=5)
    with Checkpointer(root, options=KEEP_ALL) as ckpt:
        for step in range(1, max(steps) + 1):
            trainer.train_step()
            if step in steps:
                ckpt.save(step, {**trainer.state(), **extra})
    return trainer


def segment(root: str, step: int, rank: int = 0) -> str:
    return os.path.join(root, f"step-{step:09d}", f"rank-{rank:05d}.seg")
