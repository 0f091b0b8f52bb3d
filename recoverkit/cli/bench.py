"""``recoverkit bench``: run a benchmark of the source tree (``python -m bench.NAME ARGS``).

The benchmarks are not part of the installed package; they ship with the source tree. The
``bench`` package is looked for in ``--source`` if given, else in the current directory,
then in the checkout recoverkit was installed from (an editable install).
"""

from __future__ import annotations

import os
import subprocess
import sys

import click

from ..errors import CheckpointNotFoundError
from .common import EXIT_CODES_EPILOG, handle_errors

__all__ = ["bench", "find_bench_root", "available"]


def find_bench_root(source: str | None) -> str:
    """The directory holding the ``bench`` package; raises CheckpointNotFoundError (exit 3)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = [source] if source else [os.getcwd(), package_parent]
    for c in candidates:
        if os.path.isfile(os.path.join(c, "bench", "__init__.py")):
            return os.path.abspath(c)
    where = " or ".join(os.path.abspath(c) for c in candidates)
    raise CheckpointNotFoundError(
        f"the benchmarks are not importable: no bench/ package in {where}. They ship with the "
        "recoverkit source tree, not the installed package: run from a checkout, or pass --source DIR"
    )


def available(root: str) -> list[str]:
    """Benchmark module names under ``root/bench``."""
    names = []
    for f in sorted(os.listdir(os.path.join(root, "bench"))):
        if f.endswith(".py") and f.startswith("bench_"):
            names.append(f[:-3])
    return names


def _module(root: str, name: str) -> str:
    for candidate in (name, f"bench_{name}"):
        if os.path.isfile(os.path.join(root, "bench", f"{candidate}.py")):
            return candidate
    have = ", ".join(available(root)) or "none"
    raise CheckpointNotFoundError(f"no benchmark {name!r} in {os.path.join(root, 'bench')} (have: {have})")


EPILOG = """\b
Examples:
  recoverkit bench --list
  recoverkit bench bench_save --smoke
  recoverkit bench save --size-mib 4096 --reps 5     # 'save' finds bench_save
  recoverkit bench bench_lazy -- --help             # the benchmark's own options

\b
The benchmark's exit code is passed through; otherwise:
""" + EXIT_CODES_EPILOG


@click.command(epilog=EPILOG, context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--list", "list_", is_flag=True, help="List the benchmarks and exit.")
@click.option("--source", type=click.Path(file_okay=False), default=None,
              help="The source tree holding bench/ (default: current directory, then the install's checkout).")
@handle_errors
def bench(name: str | None, args: tuple[str, ...], list_: bool, source: str | None) -> None:
    """Run benchmark NAME of the source tree with ARGS: python -m bench.NAME ARGS."""
    root = find_bench_root(source)
    if list_ or not name:
        if not name and not list_:
            raise click.UsageError("name a benchmark (see --list)")
        for n in available(root):
            click.echo(n)
        return
    module = _module(root, name)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    rc = subprocess.call([sys.executable, "-m", f"bench.{module}", *args], env=env)
    raise SystemExit(rc)
