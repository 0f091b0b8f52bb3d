"""``recoverkit ls``: the steps under a checkpoint root, on which tiers, how big, how old,
and whether each is committed and intact."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from ..errors import IncompatibleCheckpointError
from ..storage.layout import TMP_PREFIX, TRASH_PREFIX
from .common import (
    EXIT_CODES_EPILOG,
    EXIT_FAULT,
    committed_steps,
    emit_json,
    handle_errors,
    human_age,
    human_bytes,
    json_option,
    locate,
    lock_holder,
    open_tier,
    progress,
    stdout_console,
)

if TYPE_CHECKING:
    from ..format.manifest import Manifest
    from ..storage.base import ReadableTier

__all__ = ["ls", "list_steps"]


@dataclass
class TierEntry:
    """One step as one tier holds it."""

    tier: str
    where: str
    state: str  # committed | verified | damaged | corrupt | foreign
    nbytes: int = 0
    created_unix: float | None = None
    world_size: int | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "state": self.state, "nbytes": self.nbytes, "created_unix": self.created_unix,
                "world_size": self.world_size, "detail": self.detail}


@dataclass
class StepRow:
    step: int
    tiers: list[TierEntry] = field(default_factory=list)

    @property
    def created_unix(self) -> float | None:
        return next((t.created_unix for t in self.tiers if t.created_unix is not None), None)


def _entry(tier: ReadableTier, step: int, verify: bool, bar: Any) -> TierEntry:
    """How ``tier`` holds ``step``: its manifest checked, and every byte if ``verify``."""
    from ..restore.verify import verify_step
    from ..storage.local import LocalTier

    name = tier.name
    try:
        manifest: Manifest = tier.manifest(step)
    except Exception as e:  # noqa: BLE001 - any fault is the step's state, not the listing's
        state = "foreign" if isinstance(e, IncompatibleCheckpointError) else "damaged"
        return TierEntry(name, tier.describe(step), state, _dir_bytes(tier, step), _mtime(tier, step), None, str(e))
    size = sum(manifest.files.values()) if isinstance(tier, LocalTier) else manifest.nbytes
    entry = TierEntry(name, tier.describe(step), "committed", size, manifest.created_unix, manifest.world_size)
    if verify:
        report = verify_step(tier, step, progress=bar)
        entry.state = "verified" if report.ok else "corrupt"
        entry.detail = "; ".join(f.message for f in report.faults)
    return entry


def _dir_bytes(tier: ReadableTier, step: int) -> int:
    from ..storage.local import LocalTier

    if not isinstance(tier, LocalTier):
        return 0
    where = tier.step_path(step)
    try:
        return sum(os.path.getsize(os.path.join(where, f)) for f in os.listdir(where))
    except OSError:
        return 0


def _mtime(tier: ReadableTier, step: int) -> float | None:
    from ..storage.local import LocalTier

    if isinstance(tier, LocalTier):
        try:
            return os.path.getmtime(tier.step_path(step))
        except OSError:
            return None
    return None


def list_steps(tiers: list[ReadableTier], *, verify: bool = False) -> list[StepRow]:
    """One row per step any tier holds, newest first."""
    from ..restore.verify import step_bytes

    held = {t.name: set(t.steps()) for t in tiers}
    steps = sorted(set().union(*held.values()), reverse=True) if held else []
    total = 0
    if verify:
        for t in tiers:
            for s in held[t.name]:
                try:
                    total += step_bytes(t.manifest(s))
                except Exception:  # noqa: BLE001 - a damaged step has no size to count
                    pass
    rows = []
    with progress(total, "verifying", enabled=verify) as bar:
        for s in steps:
            rows.append(StepRow(s, [_entry(t, s, verify, bar) for t in tiers if s in held[t.name]]))
    return rows


def _incomplete(root: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(root) if n.startswith((TMP_PREFIX, TRASH_PREFIX)))
    except OSError:
        return []


EPILOG = """\b
Examples:
  recoverkit ls checkpoints/
  recoverkit ls checkpoints/ --persistent file:///shared/ckpt
  recoverkit ls checkpoints/ --verify --json | jq '.steps[0]'

\b
States: committed (manifest and file sizes check out), verified (every byte
checked, with --verify), damaged (manifest or files fail), corrupt (a checksum
fails, with --verify), foreign (not a recoverkit checkpoint of this version).

""" + EXIT_CODES_EPILOG


@click.command(epilog=EPILOG)
@click.argument("root", metavar="ROOT")
@click.option("--persistent", "persistent", metavar="URL", default=None,
              help="Also list the persistent tier at this kvstore URL (e.g. file:///shared/ckpt).")
@click.option("--verify", is_flag=True, help="Checksum every byte of every step (slow on big checkpoints).")
@json_option
@handle_errors
def ls(root: str, persistent: str | None, verify: bool, as_json: bool) -> None:
    """List the steps under ROOT: tiers holding each, size, state, age.

    Exits 1 with --verify if any step fails; a damaged step is listed, not an error.
    """
    from ..storage.local import LocalTier

    loc = locate(root)
    tiers: list[ReadableTier] = [loc.tier]
    if persistent:
        tiers.append(open_tier(persistent))
    if loc.step is not None or not persistent:
        committed_steps(loc)  # not a checkpoint root -> exit 3
    rows = list_steps(tiers, verify=verify)
    if loc.step is not None:
        rows = [r for r in rows if r.step == loc.step]
    local = loc.tier if isinstance(loc.tier, LocalTier) else None
    info = {
        "root": loc.label,
        "persistent": persistent,
        "lock": lock_holder(local.root) if local else None,
        "latest": local.latest_hint() if local else None,
        "incomplete": _incomplete(local.root) if local else [],
    }
    if as_json:
        _print_json(info, rows)
    else:
        _print_table(info, rows)
    if verify and any(t.state != "verified" for r in rows for t in r.tiers):
        raise SystemExit(EXIT_FAULT)


def _print_json(info: dict[str, Any], rows: list[StepRow]) -> None:
    now = time.time()
    steps = []
    for r in rows:
        created = r.created_unix
        steps.append({"step": r.step, "latest": r.step == info["latest"], "created_unix": created,
                      "age_s": None if created is None else now - created,
                      "tiers": {t.tier: t.to_json() for t in r.tiers}})
    emit_json({**info, "steps": steps})


def _print_table(info: dict[str, Any], rows: list[StepRow]) -> None:
    from rich.table import Table

    console = stdout_console()
    now = time.time()
    table = Table(title=f"{info['root']}", title_justify="left")
    for col, justify in (("step", "right"), ("tier", "left"), ("size", "right"), ("state", "left"),
                         ("ranks", "right"), ("age", "right"), ("detail", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    styles = {"committed": "green", "verified": "bold green", "damaged": "red", "corrupt": "bold red", "foreign": "yellow"}
    for r in rows:
        for i, t in enumerate(r.tiers):
            mark = " (latest)" if r.step == info["latest"] and t.tier == "local" else ""
            table.add_row(str(r.step) + mark if i == 0 else "", t.tier, human_bytes(t.nbytes),
                          f"[{styles.get(t.state, '')}]{t.state}[/]", "" if t.world_size is None else str(t.world_size),
                          "" if t.created_unix is None else human_age(now - t.created_unix), t.detail)
    console.print(table)
    console.print(f"run lock: {'held by ' + info['lock'] if info['lock'] else 'free'}")
    for name in info["incomplete"]:
        console.print(f"leftover: {name} (an interrupted save or delete; the next writer removes it)")
