"""The ``recoverkit`` command."""

from __future__ import annotations

import click

from .demo import demo

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recoverkit")
def main() -> None:
    """recoverkit: checkpointing and fault recovery for PyTorch training."""


main.add_command(demo)

if __name__ == "__main__":  # python -m recoverkit.cli
    main()
