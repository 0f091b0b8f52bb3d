"""`recoverkit demo`: a real SIGKILL mid-run, a restart, and a bit-identical final model."""

from __future__ import annotations

import subprocess
import sys

from recoverkit.cli.demo import run_demo


def test_demo_recovers_bit_identically(tmp_path):
    lines: list[str] = []
    report = run_demo(str(tmp_path), steps=24, save_every=4, kill_at=15, echo=lines.append)
    assert report.identical, report
    assert report.killed_at == 15 and report.resumed_from in (8, 12)
    assert report.steps_lost == 15 - report.resumed_from
    assert report.save_stalls_s and report.recover_s > 0
    assert any("SIGKILL" in line for line in lines)


def test_demo_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "recoverkit.cli", "demo", "--steps", "12", "--save-every", "3", "--kill-at", "7",
         "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "identical to the failure-free run" in proc.stdout
    assert "steps lost" in proc.stdout
