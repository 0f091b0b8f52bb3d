"""``--format dcp``: a ``torch.distributed.checkpoint`` directory of the consolidated state
(``dcp.load`` works in one process, without a process group).

Laid out as torch's own ``FileSystemWriter(single_file_per_rank=True)`` lays out one rank:
every item in one ``__0_0.distcp`` beside ``.metadata``. The state handed to ``dcp.save``
holds meta tensors only; a planner whose ``resolve_data`` reads each tensor when DCP asks
for it streams them. The writer (:func:`_streaming_writer`) is torch's, but its
``write_data`` asks for the items strictly one after another and drops each tensor as
soon as torch's own ``_write_item`` has written it: torch's writer keeps every tensor of a
file alive until the file is complete (it needs them for its safetensors variant), which
would hold the whole checkpoint in memory. Memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from ...format.dtypes import dtype_from_name
from ...format.manifest import TensorRecord
from ...state.leaf import TensorLeaf
from .common import ExportResult, Progress, Source, _read_full, _staged_dir, select_tensors


def export_dcp(
    src: Source,
    out: str,
    *,
    rank: int = 0,
    select: str | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """A ``torch.distributed.checkpoint`` directory of the consolidated state.

    Load it with ``dcp.load(state_dict, checkpoint_id=out)``: ``state_dict`` has the saved
    structure (``{"model": model.state_dict(), ...}``, or the entry's own state dict with
    ``select``); no process group is needed.
    """
    import torch.distributed.checkpoint as dcp

    sel = select_tensors(src, out, "dcp", rank=rank, select=select, allow_pickle=allow_pickle, mapping=True)
    metas = {k: torch.empty(rec.shape, dtype=dtype_from_name(rec.dtype), device="meta") for k, rec in sel.stored.items()}
    sources: dict[int, TensorRecord] = {id(metas[k]): rec for k, rec in sel.stored.items()}
    state = _dcp_tree(sel.tree, {k: metas[r.key] for k, r in sel.records.items()})
    result = sel.result
    read_errors: list[BaseException] = []
    planner = _streaming_planner(src, sources, result, progress, read_errors)
    with _staged_dir(out, force) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: assuming a single process"
        writer = _streaming_writer(tmp)
        try:
            dcp.save(state, storage_writer=writer, planner=planner)
        except Exception:
            if read_errors:  # DCP wraps it (with a traceback in the text): say what really failed
                raise read_errors[0] from None
            raise
    result.tensors = len(sources)
    return result


def _dcp_tree(node: Any, leaves: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, TensorLeaf):
        return leaves[node.key]
    if isinstance(node, dict):
        return {k: _dcp_tree(v, leaves) for k, v in node.items()}
    if isinstance(node, list):
        return [_dcp_tree(v, leaves) for v in node]
    if isinstance(node, tuple):
        return tuple(_dcp_tree(v, leaves) for v in node)
    return node


def _streaming_writer(path: str) -> Any:
    """A ``FileSystemWriter`` that writes one file for the rank, one item at a time."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.futures import Future

    class StreamingFileSystemWriter(dcp.FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            results = []
            items = sorted(plan.items, key=lambda item: item.type != WriteItemType.BYTE_IO)  # as torch: bytes first
            with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
                for item in items:
                    data = planner.resolve_data(item)
                    results.append(_write_item(self.transforms, stream, data, item, name, self.serialization_format))
                    del data  # the only reference: its memory is free before the next item is read
                stream.flush()
                os.fsync(stream.fileno())
            done: Future[Any] = Future()
            done.set_result(results)
            return done

    return StreamingFileSystemWriter(path, single_file_per_rank=True, thread_count=1, sync_files=True)


def _streaming_planner(
    src: Source, sources: dict[int, TensorRecord], result: ExportResult, progress: Progress | None,
    errors: list[BaseException],
) -> Any:
    """A DefaultSavePlanner whose ``resolve_data`` reads each tensor when it is written
    (a read's error is also kept in ``errors``: DCP re-raises it wrapped)."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    class StreamingSavePlanner(DefaultSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            obj = self.lookup_object(write_item.index)
            if isinstance(obj, torch.Tensor) and id(obj) in sources:
                try:
                    tensor = _read_full(src, sources[id(obj)])
                except BaseException as e:
                    errors.append(e)
                    raise
                result.nbytes += tensor.numel() * tensor.element_size()
                if progress is not None:
                    progress(tensor.numel() * tensor.element_size())
                return tensor
            return self.transform_object(write_item, obj)

    return StreamingSavePlanner()
