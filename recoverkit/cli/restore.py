"""``recoverkit restore``: materialize a step as a torch, safetensors or DCP checkpoint, or
as a recoverkit checkpoint resharded for another world size (see restore/export/)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..restore.export import FORMATS
from .common import (
    EXIT_CODES_EPILOG,
    STEP,
    emit_json,
    handle_errors,
    human_bytes,
    json_option,
    locate,
    pick_step,
    progress,
    stdout_console,
)

if TYPE_CHECKING:
    from ..restore.export import ExportResult

__all__ = ["restore"]

EPILOG = """\b
Examples:
  recoverkit restore ckpt/ --to model.pt --format torch --select model
      python: model.load_state_dict(torch.load("model.pt", weights_only=True))
  recoverkit restore ckpt/ --step 1200 --to model.safetensors --format safetensors --select model
  recoverkit restore ckpt/ --to dcp_ckpt/ --format dcp
      python: dcp.load({"model": model.state_dict()}, checkpoint_id="dcp_ckpt/")
  recoverkit restore ckpt/ --to ckpt8/ --world-size 8     # resharded for 8 ranks

\b
Formats: torch (one torch.save file, loads with weights_only=True),
safetensors (tensors only; tied tensors stored once), dcp (a
torch.distributed.checkpoint directory), recoverkit (default; a checkpoint
root resharded for --world-size ranks). The consolidated formats hold one
rank's view (--rank, default 0) with every tensor at its global shape. Memory
stays bounded by the largest tensor: tensors are read and written one at a time.

""" + EXIT_CODES_EPILOG


@click.command(epilog=EPILOG)
@click.argument("root", metavar="ROOT")
@click.option("--step", type=STEP, default=None, help="Step to restore: a number or 'latest' (default).")
@click.option("--to", "out", required=True, type=click.Path(), help="Output file (torch, safetensors) or directory (dcp, recoverkit).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="recoverkit", show_default=True, help="Output format.")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="Ranks of the resharded checkpoint (--format recoverkit only; default: as saved).")
@click.option("--select", default=None, metavar="ENTRY",
              help="Export only this top-level state entry (e.g. model); names lose the 'ENTRY/' prefix.")
@click.option("--rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="Whose rank-local state (RNG, data position) the consolidated formats hold.")
@click.option("--allow-pickle", is_flag=True, help="Decode pickled objects (runs code from the checkpoint: trusted files only).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@json_option
@handle_errors
def restore(root: str, step: int | str | None, out: str, fmt: str, world_size: int | None, select: str | None,
            rank: int, allow_pickle: bool, force: bool, as_json: bool) -> None:
    """Write a step of ROOT to --to in another format, verifying every byte read."""
    if world_size is not None and fmt != "recoverkit":
        raise click.UsageError("--world-size applies to --format recoverkit only")
    if fmt == "recoverkit" and (select is not None or rank != 0):
        raise click.UsageError("--select and --rank apply to the torch, safetensors and dcp formats only")
    from ..restore.export import Source, export

    loc = locate(root)
    s, manifest = pick_step(loc, step)
    src = Source(loc.tier, s, manifest)
    with progress(manifest.nbytes, f"restoring step {s} as {fmt}") as bar:
        result = export(src, out, fmt, world_size=world_size, rank=rank, select=select,
                        allow_pickle=allow_pickle, force=force, progress=bar)
    if as_json:
        emit_json(result.to_json())
    else:
        _print(result)


def _print(r: ExportResult) -> None:
    console = stdout_console()
    rate = r.nbytes / r.seconds / 1e9 if r.seconds > 0 else 0.0
    console.print(f"wrote step {r.step} as {r.format}: {r.path}")
    console.print(f"  {r.tensors} tensors, {human_bytes(r.nbytes)} in {r.seconds:.2f} s ({rate:.2f} GB/s), every byte verified")
    for note in r.notes:
        console.print(f"  note: {note}")
