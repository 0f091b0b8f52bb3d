"""``recoverkit gc``: delete old steps of a checkpoint root by a keep-last / keep-every rule.

A dry run by default. ``--yes`` deletes, and only while holding the root's run lock: if a
live trainer holds it, gc refuses (exit 5) and there is deliberately no override. A running
trainer commits, cleans up and applies its own ``RetentionPolicy`` under that lock; a second
deleter racing it could remove the step it is about to restore from or collide with its own
retention. Prune a live run through its ``RetentionPolicy``, or stop it first. Dry runs never
take the lock and work while a trainer runs.

A manifest that verifies says nothing of the data behind it (bit rot leaves it intact), so
gc first runs a full CRC pass (:func:`recoverkit.restore.verify.verify_step`) over the steps
newest first until one passes. That step is the newest known good one and is never deleted.
The steps that failed are known bad: they are not counted among the last N (a rotten step
must not push a good one out), they are reported, and they are *kept* (a damaged step is
evidence of what went wrong) unless ``--delete-damaged`` is given. Older steps are decided by
the same rule as the trainer's retention (:func:`recoverkit.storage.discovery.decide_retention`).

Shared memory: the per-step snapshots a ``shm`` tier keeps (``storage.shm``) outlive a
crashed trainer on purpose, for its restart. When the job is gone for good, gc finds the
root's regions (every node's job directory of this root under the shared-memory directory,
``--shm-dir`` or ``RECOVERKIT_SHM_DIR``, default /dev/shm), reports them, and with ``--yes``
removes them, under the same run lock: never while a live trainer holds it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from ..errors import CheckpointLockedError
from ..storage.discovery import RetentionDecision, decide_retention, delete_decided
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

if TYPE_CHECKING:
    from ..storage.local import LocalTier

__all__ = ["gc", "plan_gc", "known_by_crc_pass", "Decision"]


def shm_regions(root: str, shm_dir: str | None = None) -> list[tuple[str, str, int]]:
    """``(node, path, bytes)`` of every shared-memory job directory of ``root`` (any node
    under ``shm_dir``): what a ``shm`` tier of a trainer on this root left there."""
    from ..storage.shm import ShmStore, job_key

    key, full = job_key(root), os.path.abspath(root)
    out = []
    for job in ShmStore.jobs(shm_dir):
        if job.job_key == key and job.root in (None, full):
            out.append((job.node, job.path, _tree_bytes(job.path)))
    return out


def remove_shm_regions(root: str, shm_dir: str | None = None) -> list[tuple[str, str, int]]:
    """Remove every shared-memory job directory of ``root``; returns what was removed.
    The caller holds the root's run lock (no live trainer uses them)."""
    from ..storage.shm import ShmStore, job_key

    key, full = job_key(root), os.path.abspath(root)
    removed = []
    for job in ShmStore.jobs(shm_dir):
        if job.job_key == key and job.root in (None, full):
            size = _tree_bytes(job.path)
            ShmStore.remove(job)
            removed.append((job.node, job.path, size))
    return removed


def _tree_bytes(path: str) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(base, f)).st_size
            except OSError:
                pass
    return total


@dataclass(frozen=True)
class Decision(RetentionDecision):
    """What gc does with one step, and why: retention's decision plus the step's size."""

    nbytes: int = 0


#: how gc learned that its newest good step is good (the reason printed for it)
PASSED = "newest step that passes a full CRC pass"


def known_by_crc_pass(tier: LocalTier) -> tuple[dict[int, str], dict[int, str]]:
    """gc's CRC pass: verify the steps newest first until one passes.

    Returns ``(good, bad)`` as :func:`~recoverkit.storage.discovery.decide_retention` takes
    them: the step that passed (at most one), and each step that failed with its first fault.
    """
    from ..restore.verify import verify_step

    bad: dict[int, str] = {}
    for s in reversed(tier.steps()):
        report = verify_step(tier, s)
        if report.ok:
            return {s: PASSED}, bad
        more = f" (+{len(report.faults) - 1} more)" if len(report.faults) > 1 else ""
        bad[s] = report.faults[0].message + more
    return {}, bad


def plan_gc(
    tier: LocalTier, keep_last: int | None, keep_every: int | None, *, delete_damaged: bool = False
) -> list[Decision]:
    """Decide every committed step, newest first (see the module docstring for the rule).

    What is known comes from :func:`known_by_crc_pass`; every decision is
    :func:`~recoverkit.storage.discovery.decide_retention`'s, the trainer's own rule.
    """
    from ..config import RetentionPolicy

    good, bad = known_by_crc_pass(tier)
    policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
    decisions = decide_retention(
        tier.steps(), policy, good=good, bad=bad, delete_bad=delete_damaged
    )
    return [
        Decision(d.step, d.keep, d.reason, d.damaged, nbytes=_step_bytes(tier, d.step))
        for d in decisions
    ]


def _step_bytes(tier: LocalTier, step: int) -> int:
    where = tier.step_path(step)
    try:
        return sum(os.path.getsize(os.path.join(where, f)) for f in os.listdir(where))
    except OSError:
        return 0


EPILOG = (
    """\b
Examples:
  recoverkit gc ckpt/ --keep-last 3                     # dry run: what would go
  recoverkit gc ckpt/ --keep-last 3 --keep-every 1000 --yes
  recoverkit gc ckpt/ --shm-only --yes                  # a dead job's shared memory only

\b
gc first CRC-checks the steps newest first until one passes: that step (the
newest whose data is known good) is never deleted. Steps that fail are
DAMAGED: reported, not counted among the --keep-last N, and kept as evidence
of what went wrong; --delete-damaged deletes them too. --yes takes the root's
run lock; while a live trainer holds it,
gc refuses with exit code 5 (no override: let the trainer's RetentionPolicy
prune a running job, or stop it first). Dry runs work while a trainer runs.
With --yes, leftovers of interrupted saves/deletes (.tmp-*, .trash-*) go too,
and so does the shared memory a trainer of ROOT kept per-step snapshots in
(a shm tier keeps it after a crash, for the restart); --shm-only removes
that alone and deletes no step.

"""
    + EXIT_CODES_EPILOG
)


@click.command(epilog=EPILOG)
@click.argument("root", metavar="ROOT")
@click.option(
    "--keep-last",
    type=click.IntRange(min=1),
    default=None,
    help="Keep the newest N committed steps (required unless --shm-only).",
)
@click.option(
    "--keep-every",
    type=click.IntRange(min=1),
    default=None,
    help="Also keep every step that is a multiple of K.",
)
@click.option("--yes", is_flag=True, help="Delete (default: a dry run that deletes nothing).")
@click.option(
    "--delete-damaged",
    is_flag=True,
    help="Also delete steps that fail the CRC pass (default: keep them as evidence).",
)
@click.option(
    "--shm-only",
    is_flag=True,
    help="Only the shared memory a trainer of ROOT left: delete no step.",
)
@click.option(
    "--shm-dir",
    default=None,
    metavar="DIR",
    help="Where shared memory lives (default: $RECOVERKIT_SHM_DIR, else /dev/shm).",
)
@json_option
@handle_errors
def gc(
    root: str,
    keep_last: int | None,
    keep_every: int | None,
    yes: bool,
    delete_damaged: bool,
    shm_only: bool,
    shm_dir: str | None,
    as_json: bool,
) -> None:
    """Delete the steps of ROOT that --keep-last/--keep-every do not keep, and the shared
    memory a trainer of ROOT left (dry run unless --yes)."""
    from ..storage.local import LocalTier
    from ..storage.lock import RunLock

    if keep_last is None and not shm_only:
        raise click.UsageError("Missing option '--keep-last' (or --shm-only: shared memory only, no step deleted).")
    if shm_only and (keep_last is not None or keep_every is not None or delete_damaged):
        raise click.UsageError("--shm-only deletes no step: it takes no --keep-last, --keep-every or --delete-damaged")
    loc = locate(root)
    if loc.step is not None or not isinstance(loc.tier, LocalTier):
        raise click.UsageError(
            f"{root}: gc works on a node-local checkpoint root, not a step or URL"
        )
    tier = loc.tier
    regions = shm_regions(tier.root, shm_dir)
    if not regions:
        committed_steps(loc)  # not a checkpoint root (nor one with shared memory): an error
    if not yes:
        plan = [] if shm_only else plan_gc(tier, keep_last, keep_every, delete_damaged=delete_damaged)
        _report(
            tier.root,
            plan,
            deleted=[],
            removed=[],
            dry_run=True,
            holder=lock_holder(tier.root),
            as_json=as_json,
            shm=regions,
        )
        return
    try:
        lock = RunLock(tier.root).acquire()
    except CheckpointLockedError as e:
        raise CheckpointLockedError(
            f"{e}; gc --yes refuses while a trainer runs (it would race the trainer's own saves and "
            "retention). Stop the trainer, or prune through its RetentionPolicy; a dry run works now."
        ) from None
    plan, deleted, removed = [], [], []
    try:
        if not shm_only:
            plan = plan_gc(
                tier, keep_last, keep_every, delete_damaged=delete_damaged
            )  # decided under the lock
            deleted = sorted(
                delete_decided(tier, plan), reverse=True
            )  # reported newest first, as planned
            removed = tier.cleanup()
        regions = remove_shm_regions(tier.root, shm_dir)
    finally:
        lock.release()
    _report(
        tier.root,
        plan,
        deleted=deleted,
        removed=removed,
        dry_run=False,
        holder=None,
        as_json=as_json,
        shm=regions,
    )


def _report(
    root: str,
    plan: list[Decision],
    *,
    deleted: list[int],
    removed: list[str],
    dry_run: bool,
    holder: str | None,
    as_json: bool,
    shm: Sequence[tuple[str, str, int]] = (),
) -> None:
    doomed = [d for d in plan if not d.keep]
    shm_json = [{"node": n, "path": p, "nbytes": b} for n, p, b in shm]
    freed = sum(d.nbytes for d in doomed)
    if as_json:
        emit_json(
            {
                "root": root,
                "dry_run": dry_run,
                "lock": holder,
                "keep": [{"step": d.step, "reason": d.reason} for d in plan if d.keep],
                "delete": [
                    {"step": d.step, "reason": d.reason, "nbytes": d.nbytes} for d in doomed
                ],
                "damaged": [
                    {"step": d.step, "reason": d.reason, "delete": not d.keep}
                    for d in plan
                    if d.damaged
                ],
                "deleted": deleted,
                "leftovers_removed": removed,
                "shm": shm_json if dry_run else [],
                "shm_removed": [] if dry_run else shm_json,
                "nbytes": freed,
            }
        )
        return
    from rich.markup import escape

    console = stdout_console()
    verb = "would delete" if dry_run else "deleted"
    for d in plan:
        action = (
            "[green]keep        [/]"
            if d.keep
            else ("[yellow]would delete[/]" if dry_run else "[red]deleted     [/]")
        )
        console.print(
            f"{action}  step {d.step:>10}  {human_bytes(d.nbytes):>10}  {escape(d.reason)}"
        )
    for name in removed:
        console.print(f"[red]removed[/] leftover {name}")
    for node, path, nbytes in shm:
        what = "would remove" if dry_run else "[red]removed[/]"
        console.print(f"{what} shared memory of node {escape(node)}: {escape(path)} ({human_bytes(nbytes)})")
    console.print(f"{verb} {len(doomed)} of {len(plan)} step(s), {human_bytes(freed)}")
    bad = [d for d in plan if d.damaged]
    if bad:
        kept = sum(d.keep for d in bad)
        hint = "; --delete-damaged removes them" if kept else ""
        console.print(
            f"[red]{len(bad)} damaged step(s)[/] failed the CRC pass ({kept} kept as evidence{hint}); "
            "`recoverkit verify` lists every fault"
        )
    if dry_run:
        note = (
            f" (a live trainer holds the run lock: {holder}; --yes would refuse)" if holder else ""
        )
        console.print(f"dry run: nothing deleted; pass --yes to delete{note}")
