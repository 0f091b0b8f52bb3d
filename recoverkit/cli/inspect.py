"""``recoverkit inspect``: what one step holds: tensors, shards, world layout, object state."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import TYPE_CHECKING, Any

import click

from ..errors import PickleNotAllowedError
from .common import (
    EXIT_CODES_EPILOG,
    STEP,
    emit_json,
    handle_errors,
    human_age,
    human_bytes,
    json_option,
    locate,
    pick_step,
    stdout_console,
)

if TYPE_CHECKING:
    from ..format.manifest import Manifest
    from ..restore.export import Source

__all__ = ["inspect"]

EPILOG = """\b
Examples:
  recoverkit inspect checkpoints/step-000001200
  recoverkit inspect checkpoints/ --step latest --shards
  recoverkit inspect checkpoints/ --step 1200 --rank 1 --json | jq '.objects.tree'

""" + EXIT_CODES_EPILOG


@click.command(epilog=EPILOG)
@click.argument("ckpt", metavar="CKPT")
@click.option("--step", type=STEP, default=None, help="Step to inspect when CKPT is a root: a number or 'latest' (default).")
@click.option("--shards", is_flag=True, help="List every shard: rank, offsets, shape, file, offset, CRC.")
@click.option("--rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="Whose object state (non-tensor keys) to show.")
@click.option("--allow-pickle", is_flag=True, help="Decode pickled objects (runs code from the checkpoint: trusted files only).")
@json_option
@handle_errors
def inspect(ckpt: str, step: int | str | None, shards: bool, rank: int, allow_pickle: bool, as_json: bool) -> None:
    """Show what CKPT (a step directory, or a ROOT with --step) holds.

    Tensors with dtype and global shape, their shards, the world layout, and the
    non-tensor state decoded with the pickle-free codec (no code runs).
    """
    from ..restore.export import Source, read_blob
    from ..restore.reader import check_blob

    loc = locate(ckpt)
    s, manifest = pick_step(loc, step)
    src = Source(loc.tier, s, manifest)
    raw = read_blob(src, rank)
    check_blob(manifest, rank, raw)  # a tree that does not decode, or names a missing tensor, is damage
    if as_json:
        emit_json(_as_json(src, raw, rank))
        return
    _print(src, raw, rank, shards, allow_pickle)


def _world(manifest: Manifest) -> list[dict[str, Any]]:
    """Per rank: its blob, and the shards and bytes it wrote."""
    out = []
    for b in sorted(manifest.blobs, key=lambda b: b.rank):
        mine = [sh for t in manifest.tensors.values() for sh in t.shards if sh.rank == b.rank]
        out.append({"rank": b.rank, "file": b.file, "blob_nbytes": b.nbytes, "shards": len(mine),
                    "tensor_nbytes": sum(sh.nbytes for sh in mine)})
    return out


def _as_json(src: Source, raw: bytes, rank: int) -> dict[str, Any]:
    from ..state.codec import document

    m = src.manifest
    body = m.body()
    return {
        "step": src.step,
        "where": src.tier.describe(src.step),
        "run_id": m.run_id,
        "world_size": m.world_size,
        "created_unix": m.created_unix,
        "pickled": m.pickled,
        "nbytes": m.nbytes,
        "files": body["files"],
        "user_meta": body["user_meta"],
        "world": _world(m),
        "tensors": {k: t.to_json() for k, t in sorted(m.tensors.items())},  # packed ones name their pack
        "objects": {"rank": rank, "codec": "recoverkit-json", "tree": json.loads(document(raw))["root"]},
    }


def _print(src: Source, raw: bytes, rank: int, shards: bool, allow_pickle: bool) -> None:
    from rich.pretty import Pretty
    from rich.table import Table

    from ..state import decode
    from ..state.codec import document

    m = src.manifest
    console = stdout_console()
    created = dt.datetime.fromtimestamp(m.created_unix).isoformat(timespec="seconds")
    console.print(f"[bold]step {src.step}[/]  {src.tier.describe(src.step)}")
    console.print(f"run {m.run_id}, {m.world_size} rank(s), created {created} ({human_age(time.time() - m.created_unix)}), "
                  f"{human_bytes(m.nbytes)}, pickled objects: {'yes' if m.pickled else 'no'}")
    if m.user_meta:
        console.print(f"user_meta: {json.dumps(dict(m.user_meta), default=str)}")
    world = Table(title="world layout", title_justify="left")
    for col in ("rank", "file", "object state", "shards", "tensor bytes"):
        world.add_column(col)
    for w in _world(m):
        world.add_row(str(w["rank"]), w["file"], human_bytes(w["blob_nbytes"]), str(w["shards"]), human_bytes(w["tensor_nbytes"]))
    console.print(world)
    console.print(_tensor_table(m, shards))
    console.print(f"[bold]object state of rank {rank}[/] (non-tensor keys; tensors shown as <dtype[shape] key>)")
    try:
        tree = decode(raw, allow_pickle=allow_pickle)
        console.print(Pretty(_displayable(tree, m), max_length=12, max_string=200))
    except PickleNotAllowedError:
        console.print("[yellow]holds pickled objects, not decoded (pass --allow-pickle for a trusted file); raw typed JSON:[/]")
        console.print(Pretty(json.loads(document(raw))["root"], max_length=12, max_string=200))


def _tensor_table(m: Manifest, shards: bool) -> Any:
    from rich.table import Table

    from ..format.checksum import hexcrc

    table = Table(title=f"{len(m.tensors)} tensors", title_justify="left")
    cols = ["key", "dtype", "global shape", "bytes", "shards"]
    if shards:
        cols = ["key", "dtype", "global shape", "rank", "offsets", "shape", "file", "file offset", "bytes", "crc32c"]
    for col in cols:
        table.add_column(col, overflow="fold")
    for key in sorted(m.tensors):
        t = m.tensors[key]
        if t.alias_of is not None:
            table.add_row(key, t.dtype, str(list(t.shape)), "", f"alias of {t.alias_of}", *([""] * (len(cols) - 5)))
        elif not shards:
            table.add_row(key, t.dtype, str(list(t.shape)), human_bytes(t.nbytes), str(len(t.shards)))
        else:
            for i, sh in enumerate(t.shards):
                head = (key, t.dtype, str(list(t.shape))) if i == 0 else ("", "", "")
                table.add_row(*head, str(sh.rank), str(list(sh.offsets)), str(list(sh.shape)), sh.file,
                              str(sh.offset), str(sh.nbytes), hexcrc(sh.crc32c))
    return table


class _Placeholder:
    """How a tensor or an array appears in the printed object tree."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _displayable(node: Any, m: Manifest) -> Any:
    import numpy as np

    from ..state import TensorLeaf

    if isinstance(node, TensorLeaf):
        rec = m.tensors.get(node.key)
        desc = f"{rec.dtype}{list(rec.shape)} " if rec is not None else ""
        return _Placeholder(f"<tensor {desc}{node.key}>")
    if isinstance(node, np.ndarray):
        return _Placeholder(f"<ndarray {node.dtype}{list(node.shape)}>")
    if isinstance(node, dict):
        return {k: _displayable(v, m) for k, v in node.items()}
    if isinstance(node, list):
        return [_displayable(v, m) for v in node]
    if isinstance(node, tuple):
        return tuple(_displayable(v, m) for v in node)
    return node
