"""How every benchmark scenario publishes what it measured: JSON, a markdown table, a PNG plot.

One call per scenario::

    from bench.report import publish
    publish("overhead", result, table_md, plot=draw, out_dir=args.out_dir)

writes ``<out_dir>/<name>.json`` (the result with the machine it ran on under ``"machine"``),
``<out_dir>/<name>.md`` (the table, headed by the machine) and, when ``plot`` is given,
``<out_dir>/<name>.png`` drawn by ``plot(ax_or_fig)`` with matplotlib's non-interactive backend.
``out_dir`` defaults to ``bench/results``; smoke runs pass a temporary directory so the committed
results only ever hold full runs. Files are written to a temporary name and renamed, so a
benchmark killed half way never leaves a torn result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from .machine import describe

__all__ = ["RESULTS_DIR", "publish", "machine_line", "fmt_bytes"]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_line(m: dict[str, Any]) -> str:
    """One line naming the machine, for the head of a table."""
    return (
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, "
        f"torch {m['torch']}, engine {m['engine']}, cuda {m['cuda']}, {m['when']}"
    )


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def publish(
    name: str,
    result: dict[str, Any],
    table_md: str,
    *,
    plot: Callable[[Any], None] | None = None,
    out_dir: str | None = None,
) -> dict[str, str]:
    """Writes the JSON, markdown and (optionally) PNG of one scenario; returns their paths.

    Args:
        name: the scenario's file stem, e.g. ``"overhead"``.
        result: JSON-serialisable figures; ``"machine"`` is added when missing.
        table_md: the markdown table(s) a reader sees in ``bench/README.md``.
        plot: draws into a matplotlib ``Figure`` it is given (create axes with
            ``fig.subplots()``); None for no plot.
        out_dir: where to write; default ``bench/results``.
    """
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    result.setdefault("machine", describe(out_dir))
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "md": os.path.join(out_dir, f"{name}.md")}
    _atomic_write(paths["json"], json.dumps(result, indent=2, default=str).encode())
    md = f"### {name}\n\n{machine_line(result['machine'])}\n\n{table_md.rstrip()}\n"
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(8, 4.5), dpi=100)
        try:
            plot(fig)
            fig.tight_layout()
            paths["png"] = os.path.join(out_dir, f"{name}.png")
            tmp = f"{paths['png']}.tmp.{os.getpid()}.png"
            fig.savefig(tmp)
            os.replace(tmp, paths["png"])
        finally:
            plt.close(fig)
        md += f"\n![{name}]({name}.png)\n"
    _atomic_write(paths["md"], md.encode())
    return paths
