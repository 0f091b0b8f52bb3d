"""``recoverkit demo``: train, SIGKILL the trainer mid-run, restart, resume, compare.

The parent launches the training job (``demo_train``) as a worker process, kills it with a
real SIGKILL at a chosen step, starts it again (it resumes from the newest valid
checkpoint), and finally runs the same job without a failure to show that the final model
is bit-identical. It prints a timeline: steps lost, time to recover, save stalls.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import click

__all__ = ["demo", "run_demo", "DemoReport"]


@dataclass
class DemoReport:
    killed_at: int
    resumed_from: int
    steps_lost: int
    recover_s: float
    save_stalls_s: list[float] = field(default_factory=list)
    fingerprint_failed_run: str = ""
    fingerprint_reference: str = ""

    @property
    def identical(self) -> bool:
        return bool(self.fingerprint_reference) and self.fingerprint_failed_run == self.fingerprint_reference


def _worker(root: str, steps: int, save_every: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "recoverkit.cli.demo_train", root, str(steps), str(save_every)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})


def _events(proc: subprocess.Popen[str]):  # type: ignore[no-untyped-def]
    assert proc.stdout is not None
    for line in proc.stdout:
        yield json.loads(line)


def run_demo(root: str, *, steps: int = 60, save_every: int = 5, kill_at: int = 37, echo=print) -> DemoReport:  # type: ignore[no-untyped-def]
    """Run the demo under ``root`` and return its report."""
    if not 0 < kill_at < steps:
        raise click.BadParameter(f"--kill-at must be between 1 and {steps - 1}, got {kill_at}")
    stalls: list[float] = []
    proc = _worker(os.path.join(root, "run"), steps, save_every)
    killed_t = 0.0
    for ev in _events(proc):
        if ev["event"] == "step":
            if ev["save_s"]:
                stalls.append(ev["save_s"])
                echo(f"  step {ev['step']:4d}  loss {ev['loss']:.4f}  training stalled {ev['save_s'] * 1e3:.2f} ms by the step {ev['step'] - 1} checkpoint")
            if ev["step"] == kill_at:
                proc.send_signal(signal.SIGKILL)
                killed_t = time.perf_counter()
                break
    proc.wait()
    echo(f"  step {kill_at:4d}  trainer killed with SIGKILL (exit {proc.returncode})")

    proc = _worker(os.path.join(root, "run"), steps, save_every)
    resumed_from, recover_s, fp = -1, 0.0, ""
    for ev in _events(proc):
        if ev["event"] == "restored":
            resumed_from = ev["step"]
        elif ev["event"] == "step" and recover_s == 0.0:
            recover_s = time.perf_counter() - killed_t
            echo(f"  step {ev['step']:4d}  first step after restart, {recover_s:.2f} s after the kill")
        elif ev["event"] == "step" and ev["save_s"]:
            stalls.append(ev["save_s"])
        elif ev["event"] == "done":
            fp = ev["fingerprint"]
    if proc.wait() != 0:
        raise click.ClickException(f"the restarted trainer failed (exit {proc.returncode})")

    ref = _worker(os.path.join(root, "reference"), steps, steps + 1)
    ref_fp = next(ev["fingerprint"] for ev in _events(ref) if ev["event"] == "done")
    ref.wait()
    return DemoReport(kill_at, resumed_from, kill_at - resumed_from, recover_s, stalls, fp, ref_fp)


@click.command()
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Where to keep checkpoints (default: a temporary directory).")
@click.option("--steps", default=60, show_default=True, help="Training steps.")
@click.option("--save-every", default=5, show_default=True, help="Checkpoint interval in steps.")
@click.option("--kill-at", default=37, show_default=True, help="Step at which the trainer is SIGKILLed.")
def demo(root: str | None, steps: int, save_every: int, kill_at: int) -> None:
    """Train a small transformer, kill it mid-run, resume it, and prove nothing was lost.

    Example: recoverkit demo --steps 40 --kill-at 23
    """
    with tempfile.TemporaryDirectory(prefix="recoverkit-demo-") as tmp:
        base = root or tmp
        click.echo(f"recoverkit demo: {steps} steps, checkpoint every {save_every}, SIGKILL at step {kill_at}")
        r = run_demo(base, steps=steps, save_every=save_every, kill_at=kill_at, echo=click.echo)
        stall_ms = sorted(s * 1e3 for s in r.save_stalls_s)
        click.echo("")
        click.echo("timeline")
        click.echo(f"  killed at step         {r.killed_at}")
        click.echo(f"  resumed from step      {r.resumed_from}")
        click.echo(f"  steps lost             {r.steps_lost}")
        click.echo(f"  time to recover        {r.recover_s:.2f} s (kill -> first step after restart)")
        if stall_ms:
            click.echo(f"  save stall (median)    {stall_ms[len(stall_ms) // 2]:.2f} ms over {len(stall_ms)} lazy saves (call + pre-step wait)")
        verdict = "identical to" if r.identical else "DIFFERENT from"
        click.echo(f"  final model            {verdict} the failure-free run (sha256 {r.fingerprint_reference[:16]})")
        if not r.identical:
            raise SystemExit(1)
