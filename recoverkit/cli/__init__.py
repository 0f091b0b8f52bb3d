"""The ``recoverkit`` command: a click group; each subcommand lives in its own module and
stays thin (the work is in ``recoverkit.restore`` and ``recoverkit.storage``). Exit codes
are defined in :mod:`recoverkit.cli.common`.

Start-up is kept short: a subcommand's module is imported only when that subcommand runs
(or ``--help`` lists it), and the modules import torch, numpy and the storage stack inside
their command functions, so ``recoverkit --help`` and the commands that only read bytes
(``ls``, ``verify``, a small ``restore --format torch``) never pay for ``import torch``.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from .common import EXIT_CODES_EPILOG

__all__ = ["main", "COMMANDS"]

#: subcommand -> (module under recoverkit.cli, attribute), in the order ``--help`` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "ls": ("ls", "ls"),
    "inspect": ("inspect", "inspect"),
    "verify": ("verify", "verify"),
    "restore": ("restore", "restore"),
    "gc": ("gc", "gc"),
    "bench": ("bench", "bench"),
    "demo": ("demo", "demo"),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported from :data:`COMMANDS` on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *(n for n in super().list_commands(ctx) if n not in COMMANDS)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, attr = COMMANDS[cmd_name]
        command: Any = getattr(importlib.import_module(f".{module}", __name__), attr)
        if not isinstance(command, click.Command):  # pragma: no cover - a wiring bug
            raise TypeError(f"recoverkit.cli.{module}.{attr} is not a click command")
        self.add_command(command, cmd_name)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_EPILOG)
@click.version_option(package_name="recoverkit")
def main() -> None:
    """recoverkit: checkpointing and fault recovery for PyTorch training.

    Every command takes --help (with examples) and --json where it prints results.
    """


if __name__ == "__main__":  # python -m recoverkit.cli
    main()
