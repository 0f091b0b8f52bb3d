"""What every ``recoverkit`` subcommand shares: exit codes, error reporting, locating a
checkpoint, step selection, progress bars and JSON output.

Exit codes (the one place they are defined; ``--help`` epilogs and the README list them):

====  ======================================================================================
0     success
1     verification failed: a corrupt, truncated or missing piece, blob or manifest
2     usage error: bad option or argument (click), or the output exists (use ``--force``)
3     not found: no such path, step or checkpoint; a directory that is not a checkpoint
      root; the benchmarks are not in this installation
4     incompatible: a foreign or newer format version, pickled state without
      ``--allow-pickle``, or state the target format cannot hold
5     locked: a live trainer holds the run lock of the root
6     other I/O error (permission denied, disk full, ...)
7     internal error: a bug in recoverkit (one line; ``RECOVERKIT_DEBUG=1`` shows the traceback)
====  ======================================================================================
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..errors import (
    CheckpointLockedError,
    CheckpointNotFoundError,
    ConfigError,
    IncompatibleCheckpointError,
    IntegrityError,
    PickleNotAllowedError,
    RecoverkitError,
)
from ..storage.layout import parse_step_dirname

if TYPE_CHECKING:  # imported where used: every command's --help starts without them
    from ..format.manifest import Manifest
    from ..reading import CheckpointReader
    from ..storage.base import ReadableTier

__all__ = [
    "EXIT_OK", "EXIT_FAULT", "EXIT_USAGE", "EXIT_NOT_FOUND", "EXIT_INCOMPATIBLE", "EXIT_LOCKED", "EXIT_IO", "EXIT_INTERNAL",
    "EXIT_CODES_EPILOG", "CliError", "handle_errors", "STEP", "json_option", "Location", "locate",
    "open_tier", "committed_steps", "pick_step", "progress", "emit_json", "human_bytes", "human_age",
    "stderr_console", "stdout_console", "lock_holder",
]

EXIT_OK = 0
EXIT_FAULT = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INCOMPATIBLE = 4
EXIT_LOCKED = 5
EXIT_IO = 6
EXIT_INTERNAL = 7

EXIT_CODES_EPILOG = (
    "\b\nExit codes:\n"
    "  0  success\n"
    "  1  verification failed (corrupt, truncated or missing data)\n"
    "  2  usage error (bad option; output exists without --force)\n"
    "  3  not found (no such path or step; not a checkpoint root)\n"
    "  4  incompatible (foreign or newer format; pickled state; unsupported dtype)\n"
    "  5  locked (a live trainer holds the run lock)\n"
    "  6  other I/O error\n"
    "  7  internal error (a bug; RECOVERKIT_DEBUG=1 shows the traceback)"
)

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A user error: one line on stderr, a documented exit code, no traceback."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance

    def show(self, file: Any = None) -> None:
        click.echo(f"recoverkit: error: {self.format_message()}", err=True)


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of a user-facing error, or None for a bug (exit 7, one line)."""
    table: list[tuple[type[BaseException] | tuple[type[BaseException], ...], int]] = [
        (CheckpointLockedError, EXIT_LOCKED),
        (IntegrityError, EXIT_FAULT),
        ((IncompatibleCheckpointError, PickleNotAllowedError), EXIT_INCOMPATIBLE),
        ((CheckpointNotFoundError, FileNotFoundError, NotADirectoryError), EXIT_NOT_FOUND),
        ((FileExistsError, IsADirectoryError, ConfigError), EXIT_USAGE),
        ((OSError, RecoverkitError), EXIT_IO),
    ]
    for kinds, code in table:
        if isinstance(exc, kinds):
            return code
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, PickleNotAllowedError):
        return f"{exc} (pass --allow-pickle only for a checkpoint you trust: unpickling runs code)"
    if isinstance(exc, OSError) and not isinstance(exc, RecoverkitError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def handle_errors(fn: F) -> F:
    """Turn recoverkit and OS errors raised by a command into :class:`CliError`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_warnings()
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
            code = exit_code_for(e)
            if code is None:
                if os.environ.get("RECOVERKIT_DEBUG"):
                    raise
                code, e = EXIT_INTERNAL, RuntimeError(
                    f"internal error, please report it: {type(e).__name__}: {str(e)[:500]} "
                    "(RECOVERKIT_DEBUG=1 shows the traceback)"
                )
            raise CliError(_message(e), code) from None

    return wrapper  # type: ignore[return-value]


def _quiet_warnings() -> None:
    """Warnings as one ``recoverkit: warning: ...`` line each, without source lines."""

    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        click.echo(f"recoverkit: warning: {message}", err=True)

    warnings.showwarning = show  # type: ignore[assignment]


class StepParam(click.ParamType):
    """A step number or ``latest``."""

    name = "N|latest"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if isinstance(value, int) or value == "latest":
            return value
        try:
            step = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a step number nor 'latest'", param, ctx)
        if step < 0:
            self.fail(f"step must be >= 0, got {step}", param, ctx)
        return step


STEP = StepParam()


def json_option(fn: F) -> F:
    """The ``--json`` flag every command takes."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of tables.")(fn)  # type: ignore[return-value]


@dataclass(frozen=True)
class Location:
    """Where a command looks: a tier, and the step when the path named one.

    ``reader`` is the read-only :class:`~recoverkit.CheckpointReader` of that place: the
    commands that only read (ls, inspect, verify, restore) discover and pick steps through
    it, so the CLI finds the same steps a restore from Python would, and never writes.
    ``tier`` is the same storage as a tier (``gc``, the one writer, deletes through it
    under the run lock).
    """

    tier: ReadableTier
    step: int | None
    label: str
    reader: CheckpointReader


def open_tier(url: str) -> ReadableTier:
    """The persistent (zarr) tier at a kvstore URL such as ``file:///shared/ckpt``."""
    from ..storage.zarr_tier import ZarrTier

    return ZarrTier(url)


def locate(path: str) -> Location:
    """A checkpoint root, a step directory (or its manifest.json), or a persistent-store URL.

    Nothing is created, written or locked (a trainer may be writing the root right now).
    """
    from ..format.manifest import MANIFEST_NAME
    from ..reading import CheckpointReader
    from ..storage.local import LocalTier

    if "://" in path:
        tier = open_tier(path)
        return Location(tier, None, path, CheckpointReader(persistent_url=path, tiers=[tier]))
    full = os.path.abspath(path)
    if not os.path.exists(full):
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    if os.path.isfile(full):
        if os.path.basename(full) != MANIFEST_NAME:
            raise CheckpointNotFoundError(f"{path}: a file, not a checkpoint root or step directory")
        full = os.path.dirname(full)
    step = parse_step_dirname(os.path.basename(full))
    if step is not None:
        if not os.path.exists(os.path.join(full, MANIFEST_NAME)):
            raise CheckpointNotFoundError(f"{path}: step directory without {MANIFEST_NAME} (not committed)")
        root = os.path.dirname(full)
        return Location(LocalTier(root), step, full, CheckpointReader(root))
    if os.path.exists(os.path.join(full, MANIFEST_NAME)):
        raise IncompatibleCheckpointError(
            f"{path}: holds a {MANIFEST_NAME} but is not named step-NNNNNNNNN; pass its parent root or rename it"
        )
    return Location(LocalTier(full), None, full, CheckpointReader(full))


def committed_steps(loc: Location) -> list[int]:
    """The steps at ``loc``, ascending; raises if there is none (not a checkpoint)."""
    if loc.step is not None:
        return [loc.step]
    steps = loc.reader.steps()
    if not steps:
        raise CheckpointNotFoundError(f"{loc.label}: not a checkpoint root (no committed step-* directory)")
    return steps


def pick_step(loc: Location, spec: int | str | None) -> tuple[int, Manifest]:
    """The step ``spec`` names (a number, ``latest`` or None = latest) and its manifest.

    ``latest`` is the newest step whose manifest verifies (skipped steps are warned about,
    as a restore would); when none does, the newest step's fault is raised.
    """
    if loc.step is not None:
        if spec not in (None, "latest", loc.step):
            raise click.UsageError(f"{loc.label} is step {loc.step}; --step {spec} names another one")
        return loc.step, loc.reader.manifest(loc.step)
    steps = committed_steps(loc)
    if isinstance(spec, int):
        if spec not in steps:
            raise CheckpointNotFoundError(f"{loc.label}: no committed step {spec} (have {_ranges(steps)})")
        return spec, loc.reader.manifest(spec)
    try:
        return loc.reader.find()
    except CheckpointNotFoundError:
        return steps[-1], loc.reader.manifest(steps[-1])  # raises the newest step's fault


def _ranges(steps: list[int]) -> str:
    return ", ".join(str(s) for s in steps[:10]) + (" ..." if len(steps) > 10 else "")


def stdout_console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@contextmanager
def progress(total: int, description: str, *, enabled: bool = True, delay_s: float = 1.0) -> Iterator[Callable[[int], None]]:
    """A byte-counting callback that shows a rich progress bar on stderr once the work has
    taken longer than ``delay_s`` (and only when stderr is a terminal)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    show = enabled and sys.stderr.isatty()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=stderr_console(), transient=True)
    task = bar.add_task(description, total=max(total, 1))
    t0 = time.perf_counter()
    started = False

    def advance(n: int) -> None:
        nonlocal started
        bar.advance(task, n)
        if show and not started and time.perf_counter() - t0 > delay_s:
            bar.start()
            started = True

    try:
        yield advance
    finally:
        if started:
            bar.stop()


def emit_json(obj: Any) -> None:
    """One JSON document on stdout."""
    click.echo(json.dumps(obj, indent=1, sort_keys=False, default=str))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_age(seconds: float) -> str:
    if seconds < 0:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def lock_holder(root: str) -> str | None:
    """Who holds the run lock of ``root`` (``"pid N on HOST"``), or None if nobody does
    (probed without creating, changing, following or blocking on ``.lock``)."""
    from ..storage.lock import probe_holder

    return probe_holder(root)
