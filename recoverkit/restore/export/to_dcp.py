"""``--format dcp``: a ``torch.distributed.checkpoint`` directory of the consolidated state
(``dcp.load`` works in one process, without a process group).

``FileSystemWriter(single_file_per_rank=False)`` (one file per item, so the writer never
holds more than one tensor) with a planner whose ``resolve_data`` reads each tensor when
DCP asks for it; the state handed to ``dcp.save`` holds meta tensors only.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ...errors import IncompatibleCheckpointError
from ...format.manifest import TensorRecord
from ...state import TensorLeaf, dtype_from_name
from .common import (
    ExportResult,
    Progress,
    Source,
    _leaf_records,
    _read_full,
    _staged_dir,
    consolidated_tree,
)


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

    tree, _ = consolidated_tree(src, rank=rank, select=select, allow_pickle=allow_pickle)
    if not isinstance(tree, dict):
        raise IncompatibleCheckpointError(
            f"--format dcp needs a mapping at the top; {select or 'the state'} is a {type(tree).__name__}"
        )
    records = _leaf_records(src, tree, rank)
    metas: dict[str, torch.Tensor] = {}
    sources: dict[int, TensorRecord] = {}
    for rec in records.values():
        if rec.key not in metas:
            metas[rec.key] = torch.empty(rec.shape, dtype=dtype_from_name(rec.dtype), device="meta")
            sources[id(metas[rec.key])] = rec
    state = _dcp_tree(tree, {k: metas[r.key] for k, r in records.items()})
    result = ExportResult(out, "dcp", src.step)
    read_errors: list[BaseException] = []
    planner = _streaming_planner(src, sources, result, progress, read_errors)
    with _staged_dir(out, force) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: assuming a single process"
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=False, thread_count=1, sync_files=True)
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
