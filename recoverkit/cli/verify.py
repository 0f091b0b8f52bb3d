"""``recoverkit verify``: a full checksum pass over one step or every step of a root."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..errors import CheckpointNotFoundError
from .common import (
    EXIT_CODES_EPILOG,
    EXIT_FAULT,
    STEP,
    committed_steps,
    emit_json,
    handle_errors,
    human_bytes,
    json_option,
    locate,
    pick_step,
    progress,
    stderr_console,
    stdout_console,
)

if TYPE_CHECKING:
    from ..restore.verify import VerifyReport

__all__ = ["verify"]

EPILOG = """\b
Examples:
  recoverkit verify checkpoints/                 # every committed step
  recoverkit verify checkpoints/step-000001200   # one step
  recoverkit verify checkpoints/ --step latest --json
  recoverkit verify file:///shared/ckpt --step 1200

""" + EXIT_CODES_EPILOG


@click.command(epilog=EPILOG)
@click.argument("ckpt", metavar="CKPT|ROOT")
@click.option("--step", type=STEP, default=None, help="Only this step of ROOT (a number or 'latest'); default: every step.")
@json_option
@handle_errors
def verify(ckpt: str, step: int | str | None, as_json: bool) -> None:
    """Read every piece and blob of CKPT (a step directory) or of every step under ROOT and
    check its CRC-32C; check every manifest and file size.

    Every fault is reported with the file, the tensor or blob, and the expected versus
    found value. Exits 1 if anything fails.
    """
    from ..restore.verify import step_bytes, verify_steps

    loc = locate(ckpt)
    steps = committed_steps(loc)
    if step == "latest":
        steps = [pick_step(loc, step)[0]]
    elif step is not None:
        if step not in steps:
            raise CheckpointNotFoundError(f"{loc.label}: no committed step {step}")
        steps = [step]
    total = 0
    for s in steps:
        try:
            total += step_bytes(loc.tier.manifest(s))
        except Exception:  # noqa: BLE001 - a damaged step is reported by the pass itself
            pass
    with progress(total, "verifying") as bar:
        report = verify_steps(loc.tier, steps, progress=bar)
    if as_json:
        emit_json(report.to_json())
    else:
        _print(report)
    if not report.ok:
        raise SystemExit(EXIT_FAULT)


def _print(report: VerifyReport) -> None:
    out, err = stdout_console(), stderr_console()
    for s in report.steps:
        if s.ok:
            out.print(f"[green]ok[/]      step {s.step}: {s.pieces} pieces, {human_bytes(s.nbytes)}  {s.where}")
        else:
            out.print(f"[bold red]FAILED[/]  step {s.step}: {len(s.faults)} fault(s)  {s.where}")
            for f in s.faults:
                err.print(f"  {f.message}", markup=False, highlight=False)
    verdict = "all steps verify" if report.ok else f"{sum(not s.ok for s in report.steps)} of {len(report.steps)} step(s) FAILED"
    out.print(f"{verdict}: {human_bytes(report.nbytes)} checked in {report.seconds:.2f} s ({report.gb_per_s:.2f} GB/s)")
