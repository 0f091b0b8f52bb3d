"""The ``recoverkit`` command: a click group; each subcommand lives in its own module and
stays thin (the work is in ``recoverkit.restore`` and ``recoverkit.storage``). Exit codes
are defined in :mod:`recoverkit.cli.common`."""

from __future__ import annotations

import click

from .bench import bench
from .common import EXIT_CODES_EPILOG
from .demo import demo
from .gc import gc
from .inspect import inspect
from .ls import ls
from .restore import restore
from .verify import verify

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_EPILOG)
@click.version_option(package_name="recoverkit")
def main() -> None:
    """recoverkit: checkpointing and fault recovery for PyTorch training.

    Every command takes --help (with examples) and --json where it prints results.
    """


for _command in (ls, inspect, verify, restore, gc, bench, demo):
    main.add_command(_command)

if __name__ == "__main__":  # python -m recoverkit.cli
    main()
