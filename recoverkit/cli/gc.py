"""``recoverkit gc``: delete old steps of a checkpoint root by a keep-last / keep-every rule.

A dry run by default. ``--yes`` deletes, and only while holding the root's run lock: if a
live trainer holds it, gc refuses (exit 5) and there is deliberately no override. A running
trainer commits, cleans up and applies its own ``RetentionPolicy`` under that lock; a second
deleter racing it could remove the step it is about to restore from or collide with its own
retention. Prune a live run through its ``RetentionPolicy``, or stop it first. Dry runs never
take the lock and work while a trainer runs.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import click

from ..config import RetentionPolicy
from ..errors import CheckpointLockedError
from ..storage.discovery import newest_valid
from ..storage.local import LocalTier
from ..storage.lock import RunLock
from .common import (
    EXIT_CODES_EPILOG,
    committed_steps,
    emit_json,
    handle_errors,
    human_bytes,
    json_option,
    locate,
    lock_holder,
    stdout_console,
)

__all__ = ["gc", "plan_gc", "Decision"]


@dataclass(frozen=True)
class Decision:
    """What gc does with one step, and why."""

    step: int
    keep: bool
    reason: str
    nbytes: int


def plan_gc(tier: LocalTier, keep_last: int, keep_every: int | None) -> list[Decision]:
    """Decide every committed step, newest first, with the trainer's retention rule: the
    newest committed step and the newest step that verifies are always kept."""
    policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
    steps = tier.steps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # damaged steps are simply not "the newest valid"
        protected = newest_valid(tier)
    out = []
    for i, s in enumerate(reversed(steps)):
        if i == 0:
            keep, why = True, "newest committed step (never deleted)"
        elif s == protected:
            keep, why = True, "newest step that verifies (never deleted)"
        elif policy.keeps(step=s, rank_from_newest=i):
            keep, why = True, f"among the last {keep_last}" if i < keep_last else f"a multiple of {keep_every}"
        else:
            keep, why = False, f"older than the last {keep_last}" + (f", not a multiple of {keep_every}" if keep_every else "")
        out.append(Decision(s, keep, why, _step_bytes(tier, s)))
    return out


def _step_bytes(tier: LocalTier, step: int) -> int:
    where = tier.step_path(step)
    try:
        return sum(os.path.getsize(os.path.join(where, f)) for f in os.listdir(where))
    except OSError:
        return 0


EPILOG = """\b
Examples:
  recoverkit gc ckpt/ --keep-last 3                     # dry run: what would go
  recoverkit gc ckpt/ --keep-last 3 --keep-every 1000 --yes

\b
The newest committed step, and the newest step whose manifest verifies, are
never deleted. --yes takes the root's run lock; while a live trainer holds it,
gc refuses with exit code 5 (no override: let the trainer's RetentionPolicy
prune a running job, or stop it first). Dry runs work while a trainer runs.
With --yes, leftovers of interrupted saves/deletes (.tmp-*, .trash-*) go too.

""" + EXIT_CODES_EPILOG


@click.command(epilog=EPILOG)
@click.argument("root", metavar="ROOT")
@click.option("--keep-last", type=click.IntRange(min=1), required=True, help="Keep the newest N committed steps.")
@click.option("--keep-every", type=click.IntRange(min=1), default=None, help="Also keep every step that is a multiple of K.")
@click.option("--yes", is_flag=True, help="Delete (default: a dry run that deletes nothing).")
@json_option
@handle_errors
def gc(root: str, keep_last: int, keep_every: int | None, yes: bool, as_json: bool) -> None:
    """Delete the steps of ROOT that --keep-last/--keep-every do not keep (dry run unless --yes)."""
    loc = locate(root)
    if loc.step is not None or not isinstance(loc.tier, LocalTier):
        raise click.UsageError(f"{root}: gc works on a node-local checkpoint root, not a step or URL")
    tier = loc.tier
    committed_steps(loc)
    if not yes:
        _report(tier.root, plan_gc(tier, keep_last, keep_every), deleted=[], removed=[], dry_run=True,
                holder=lock_holder(tier.root), as_json=as_json)
        return
    try:
        lock = RunLock(tier.root).acquire()
    except CheckpointLockedError as e:
        raise CheckpointLockedError(
            f"{e}; gc --yes refuses while a trainer runs (it would race the trainer's own saves and "
            "retention). Stop the trainer, or prune through its RetentionPolicy; a dry run works now."
        ) from None
    try:
        plan = plan_gc(tier, keep_last, keep_every)  # decided under the lock
        deleted = []
        for d in plan:
            if not d.keep:
                tier.delete(d.step)
                deleted.append(d.step)
        removed = tier.cleanup()
    finally:
        lock.release()
    _report(tier.root, plan, deleted=deleted, removed=removed, dry_run=False, holder=None, as_json=as_json)


def _report(root: str, plan: list[Decision], *, deleted: list[int], removed: list[str], dry_run: bool,
            holder: str | None, as_json: bool) -> None:
    doomed = [d for d in plan if not d.keep]
    freed = sum(d.nbytes for d in doomed)
    if as_json:
        emit_json({"root": root, "dry_run": dry_run, "lock": holder,
                   "keep": [{"step": d.step, "reason": d.reason} for d in plan if d.keep],
                   "delete": [{"step": d.step, "reason": d.reason, "nbytes": d.nbytes} for d in doomed],
                   "deleted": deleted, "leftovers_removed": removed, "nbytes": freed})
        return
    console = stdout_console()
    verb = "would delete" if dry_run else "deleted"
    for d in plan:
        action = "[green]keep        [/]" if d.keep else ("[yellow]would delete[/]" if dry_run else "[red]deleted     [/]")
        console.print(f"{action}  step {d.step:>10}  {human_bytes(d.nbytes):>10}  {d.reason}")
    for name in removed:
        console.print(f"[red]removed[/] leftover {name}")
    console.print(f"{verb} {len(doomed)} of {len(plan)} step(s), {human_bytes(freed)}")
    if dry_run:
        note = f" (a live trainer holds the run lock: {holder}; --yes would refuse)" if holder else ""
        console.print(f"dry run: nothing deleted; pass --yes to delete{note}")
