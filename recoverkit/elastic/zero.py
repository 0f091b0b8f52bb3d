"""A ZeRO-1 style Adam: a replicated model, its optimizer state partitioned over the ranks.

Where it sits: the optimizer of a replicated (plain, not DDP-wrapped) model under
:class:`~recoverkit.elastic.trainer.ElasticTrainer` (mode "global" or "shrink": the
trainer sums the full gradients over the ranks), and the Checkpointer's view of that
state as explicitly sharded :class:`~recoverkit.state.sharded.ShardedTensor` entries, so
that :class:`~recoverkit.elastic.reshard.Reshard` restores it into any other partitioning
after a lost rank (in process, from the in-memory snapshots and peer replicas).

Each parameter group's parameters are flattened, in order, into one space of ``N``
elements; rank ``r`` of ``W`` owns the contiguous slice ``[r*N//W, (r+1)*N//W)`` and holds
Adam's two moments (and, with ``master_dtype``, a master copy of the weights) for that slice
only. The flow of :meth:`ZeroOptimizer.step` on every rank::

    the gradients are already summed over the ranks (the trainer's all-reduce)
    g = this rank's slice of the flattened gradients (a parameter without one: zeros)
    Adam on the slice  (torch.optim.Adam's single-tensor arithmetic, step by step)
    all-gather the updated slices (padded to ceil(N/W); one all-gather for all the groups
    of a dtype), every rank copies them into its parameters: the model stays replicated,
    bit for bit

The all-gather is bounded (``timeout_s``) and, with ``abort=`` (the trainer's heartbeat
verdict), cut short when a member stopped beating (:func:`~recoverkit.distributed.global_grad.wait_collective`):
it raises ``PeerLostError``, ``PeerTimeoutError`` or the collective's own error, which the
trainer counts as a lost collective (``collective_step``) and recovers from.

Its ``state_dict()`` is that of a torch optimizer (``state`` and ``param_groups``, the
options restored with it), with one state entry per group under the id of the group's
first parameter: ``step`` (an int) and ``exp_avg``, ``exp_avg_sq`` (and ``master``) as
ShardedTensors of global shape ``(N,)`` at this rank's offset, their local tensors the live
buffers. The Checkpointer saves each rank's slice under one global key and a restore at
another world size fetches the pieces overlapping the new slice (the lost rank's from its
replica); ``load_state_dict`` accepts only a state that fits this partition
(``validate_state_dict``, every check before the first change).

Example::

    def build(membership):
        model = make_model()                       # replicated: the same on every rank
        opt = ZeroOptimizer(model.parameters(), lr=1e-3, abort=verdict, timeout_s=30)
        return Rebuilt(model, opt, Checkpointer(root, options=opts))

    first = build(membership)
    reshard = Reshard(build, first)
    trainer = ElasticTrainer(first.model, first.optimizer, sampler, loss_fn, store=store,
                             membership=membership, seed=0, heartbeat=hb, rebuild=reshard,
                             options=ElasticOptions(mode="global"))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..distributed.global_grad import POLL_S, Abort, wait_collective
from ..errors import IncompatibleCheckpointError
from ..state.sharded import ShardedTensor

__all__ = ["ZeroOptimizer", "partition"]

_OPTIONS = ("lr", "betas", "eps", "weight_decay")
_MAX_STEP = 1 << 62


def partition(numel: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s slice ``[lo, hi)`` of ``numel`` elements over ``world`` ranks.

    Example:
        >>> [partition(10, r, 4) for r in range(4)]
        [(0, 2), (2, 5), (5, 7), (7, 10)]
    """
    return rank * numel // world, (rank + 1) * numel // world


class _Part:
    """One parameter group's flat space and this rank's slice of it."""

    def __init__(
        self, params: list[torch.Tensor], rank: int, world: int, master_dtype: torch.dtype | None
    ) -> None:
        if not params:
            raise ValueError("ZeroOptimizer: a parameter group without parameters")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1 or len({p.device for p in params}) != 1:
            raise ValueError(
                f"ZeroOptimizer: a parameter group needs one dtype and one device, got {sorted(map(str, dtypes))} "
                f"on {sorted({str(p.device) for p in params})}"
            )
        self.params = params
        self.dtype, self.device = params[0].dtype, params[0].device
        self.sizes = [p.numel() for p in params]
        self.numel = sum(self.sizes)
        if self.numel < world:
            raise ValueError(
                f"ZeroOptimizer: a parameter group of {self.numel} element(s) cannot be split over {world} ranks"
            )
        self.lo, self.hi = partition(self.numel, rank, world)
        self.chunk = -(-self.numel // world)  # the all-gather's padded size
        self.world = world
        state_dtype = master_dtype or self.dtype
        n = self.hi - self.lo
        self.exp_avg = torch.zeros(n, dtype=state_dtype, device=self.device)
        self.exp_avg_sq = torch.zeros(n, dtype=state_dtype, device=self.device)
        self.master: torch.Tensor | None = None
        if master_dtype is not None:
            self.master = self.slice_of([p.detach() for p in params]).to(master_dtype)
        self.step = 0

    def slice_of(self, tensors: list[torch.Tensor | None]) -> torch.Tensor:
        """This rank's slice of the flattened ``tensors`` (``None``: zeros), a new tensor."""
        out = torch.zeros(self.hi - self.lo, dtype=self.dtype, device=self.device)
        start = 0
        for t, n in zip(tensors, self.sizes):
            a, b = max(start, self.lo), min(start + n, self.hi)
            if a < b and t is not None:
                out[a - self.lo : b - self.lo].copy_(t.detach().reshape(-1)[a - start : b - start])
            start += n
        return out

    def scatter(self, gathered: torch.Tensor) -> None:
        """Copy the gathered slices (``world`` rows of ``chunk``) into the parameters."""
        flat = torch.cat(
            [
                gathered[r, : hi - lo]
                for r, (lo, hi) in enumerate(
                    partition(self.numel, r, self.world) for r in range(self.world)
                )
            ]
        )
        start = 0
        with torch.no_grad():
            for p, n in zip(self.params, self.sizes):
                p.copy_(flat[start : start + n].view_as(p))
                start += n

    def buffers(self) -> dict[str, torch.Tensor]:
        out = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        if self.master is not None:
            out["master"] = self.master
        return out


class ZeroOptimizer(torch.optim.Optimizer):
    """Adam (torch.optim.Adam's arithmetic, L2 ``weight_decay``) with its state partitioned
    over the ranks of ``group``, ZeRO-1 style (module doc).

    Args:
        params: the model's parameters, or parameter groups (dicts with ``params`` and any
            of ``lr``, ``betas``, ``eps``, ``weight_decay``). Every group needs one dtype
            and at least as many elements as ranks. Built collectively: every rank the same.
        lr, betas, eps, weight_decay: Adam's options (the defaults of the groups).
        group: the process group the state is partitioned over (default: the default group
            when the optimizer is built; after a re-forming build a new one, as
            :class:`~recoverkit.elastic.reshard.Reshard` does).
        master_dtype: keep a master copy of this rank's slice of the weights in this dtype
            (e.g. ``torch.float64`` for float32 or bfloat16 parameters); the moments are
            kept in it too. ``None``: the parameters' dtype, no master copy.
        timeout_s: bound on the all-gather's wait (``None``: the group's timeout).
        abort: asked every ``poll_s`` while the all-gather is pending; a reason gives it up
            (``PeerLostError``): the trainer's heartbeat verdict.

    A parameter without a gradient in a step is updated as with a zero gradient (every
    rank takes part in the all-gather whatever its slice holds), unlike torch's Adam,
    which skips it. Parameters are not to be added after construction.

    Attributes:
        collective_step: True: :meth:`step` runs a collective (the trainer watches it as one).
    """

    collective_step = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        group: Any = None,
        master_dtype: torch.dtype | None = None,
        timeout_s: float | None = None,
        abort: Abort | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "ZeroOptimizer: call init_process_group first (the state is partitioned over a group)"
            )
        if master_dtype is not None and not master_dtype.is_floating_point:
            raise ValueError(
                f"ZeroOptimizer: master_dtype must be a floating dtype, got {master_dtype}"
            )
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        _check_options("ZeroOptimizer", defaults)
        self._parts: list[
            _Part
        ] = []  # before the base class adds the groups (add_param_group refuses after)
        super().__init__(params, defaults)
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.master_dtype = master_dtype
        self.timeout_s, self.abort, self.poll_s = timeout_s, abort, poll_s
        for g in self.param_groups:
            _check_options("ZeroOptimizer", g)
            g["betas"] = tuple(g["betas"])
        self._parts = [
            _Part(list(g["params"]), self.rank, self.world_size, master_dtype)
            for g in self.param_groups
        ]
        # the live buffers, also under torch's ``state`` (keyed by each group's first parameter):
        # what a step mutates, so a lazy save's pre-step guard waits for their copies first
        for part in self._parts:
            self.state[part.params[0]] = part.buffers()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only while the optimizer is being built (the partition is fixed afterwards)."""
        if self._parts:
            raise RuntimeError(
                "ZeroOptimizer: parameter groups cannot be added after construction (the partition is fixed)"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Adam on this rank's slices, then the all-gather of the updated slices into every
        rank's parameters (a collective: every rank of the group, together)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sends = []
        for g, part in zip(self.param_groups, self._parts):
            grad = part.slice_of([p.grad for p in part.params])
            updated = self._adam(g, part, grad)
            send = torch.zeros(part.chunk, dtype=part.dtype, device=part.device)
            send[: updated.numel()].copy_(updated)
            sends.append(send)
        # one all-gather per dtype and device: each rank's padded slices of those groups, concatenated
        buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, part in enumerate(self._parts):
            buckets.setdefault((part.dtype, part.device), []).append(i)
        for members in buckets.values():
            mine = torch.cat([sends[i] for i in members])
            rows = [torch.empty_like(mine) for _ in range(self.world_size)]
            work = dist.all_gather(rows, mine, group=self.group, async_op=True)
            wait_collective(
                work,
                "ZeroOptimizer: the parameter all-gather",
                timeout_s=self.timeout_s,
                abort=self.abort,
                poll_s=self.poll_s,
            )
            gathered = torch.stack(rows)
            start = 0
            for i in members:
                part = self._parts[i]
                part.scatter(gathered[:, start : start + part.chunk])
                start += part.chunk
        return loss

    def _adam(self, g: Mapping[str, Any], part: _Part, grad: torch.Tensor) -> torch.Tensor:
        """torch.optim.Adam's single-tensor update (no amsgrad) on this rank's slice; the
        updated slice of the parameters, in their dtype."""
        beta1, beta2 = g["betas"]
        lr, eps, wd = g["lr"], g["eps"], g["weight_decay"]
        param = part.master if part.master is not None else part.slice_of(list(part.params))
        grad = grad.to(param.dtype)
        part.step += 1
        if wd != 0:
            grad = grad.add(param, alpha=wd)
        part.exp_avg.lerp_(grad, 1 - beta1)
        part.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**part.step
        bias_correction2 = 1 - beta2**part.step
        step_size = lr / bias_correction1
        denom = (part.exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        param.addcdiv_(part.exp_avg, denom, value=-step_size)
        return param.to(part.dtype)

    def full_state(self) -> list[dict[str, torch.Tensor]]:
        """Every group's state as full flat tensors (``exp_avg``, ``exp_avg_sq``, ``master``):
        an all-gather (every rank, together), bounded as :meth:`step`'s. For checks and export."""
        out = []
        for part in self._parts:
            full = {}
            for name, buf in part.buffers().items():
                send = torch.zeros(part.chunk, dtype=buf.dtype, device=buf.device)
                send[: buf.numel()].copy_(buf)
                rows = [torch.empty_like(send) for _ in range(self.world_size)]
                work = dist.all_gather(rows, send, group=self.group, async_op=True)
                wait_collective(
                    work,
                    f"ZeroOptimizer: the {name} all-gather",
                    timeout_s=self.timeout_s,
                    abort=self.abort,
                    poll_s=self.poll_s,
                )
                full[name] = torch.cat(
                    [
                        rows[r][: hi - lo]
                        for r, (lo, hi) in enumerate(
                            partition(part.numel, r, self.world_size)
                            for r in range(self.world_size)
                        )
                    ]
                )
            out.append(full)
        return out

    # ------------------------------------------------------------------ Stateful

    def state_dict(self) -> dict[str, Any]:
        """``state`` (per group, under its first parameter's id: ``step`` and the sharded
        buffers) and ``param_groups`` (options, parameter ids), as torch numbers them."""
        groups, state, next_id = [], {}, 0
        for g, part in zip(self.param_groups, self._parts):
            ids = list(range(next_id, next_id + len(part.params)))
            next_id += len(ids)
            groups.append(
                {
                    **{k: (list(v) if k == "betas" else v) for k, v in g.items() if k != "params"},
                    "params": ids,
                }
            )
            entry: dict[str, Any] = {"step": part.step}
            for name, buf in part.buffers().items():
                entry[name] = ShardedTensor(buf, (part.numel,), (part.lo,))
            state[ids[0]] = entry
        return {"state": state, "param_groups": groups}

    def validate_state_dict(self, state_dict: Any) -> None:
        """Raise :class:`IncompatibleCheckpointError` unless ``state_dict`` fits this
        optimizer and its partition (hostile input: structure, types, shapes, offsets)."""
        if (
            not isinstance(state_dict, Mapping)
            or not isinstance(state_dict.get("param_groups"), list)
            or not isinstance(state_dict.get("state"), Mapping)
        ):
            raise IncompatibleCheckpointError(
                "ZeroOptimizer: a state dict needs 'state' (a dict) and 'param_groups' (a list)"
            )
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self._parts):
            raise IncompatibleCheckpointError(
                f"ZeroOptimizer: saved {len(groups)} parameter group(s), the optimizer has {len(self._parts)}"
            )
        expected_keys = set()
        for i, (saved, part) in enumerate(zip(groups, self._parts)):
            if (
                not isinstance(saved, Mapping)
                or not isinstance(saved.get("params"), list)
                or len(saved["params"]) != len(part.params)
            ):
                raise IncompatibleCheckpointError(
                    f"ZeroOptimizer: saved group {i} does not list {len(part.params)} parameter id(s)"
                )
            ids = saved["params"]
            if not ids or any(type(p) is not int for p in ids):
                raise IncompatibleCheckpointError(
                    f"ZeroOptimizer: saved group {i}'s parameter ids are not ints"
                )
            _check_options(
                f"ZeroOptimizer: saved group {i}", saved, error=IncompatibleCheckpointError
            )
            entry = state.get(ids[0])
            if not isinstance(entry, Mapping):
                raise IncompatibleCheckpointError(
                    f"ZeroOptimizer: no state for group {i} (under parameter id {ids[0]})"
                )
            expected_keys.add(ids[0])
            names = set(part.buffers()) | {"step"}
            if set(entry) != names:
                raise IncompatibleCheckpointError(
                    f"ZeroOptimizer: group {i}'s state holds {sorted(map(str, entry))}, expected {sorted(names)}"
                )
            step = entry["step"]
            if type(step) is not int or not 0 <= step < _MAX_STEP:
                raise IncompatibleCheckpointError(
                    f"ZeroOptimizer: group {i}'s step must be an int in [0, 2**62), got {str(step)[:40]}"
                )
            for name, buf in part.buffers().items():
                v = entry[name]
                if not isinstance(v, ShardedTensor):
                    raise IncompatibleCheckpointError(
                        f"ZeroOptimizer: group {i}'s {name!r} is {type(v).__name__}, not a ShardedTensor"
                    )
                if (
                    v.global_shape != (part.numel,)
                    or v.offsets != (part.lo,)
                    or v.local.shape != buf.shape
                    or v.local.dtype != buf.dtype
                ):
                    raise IncompatibleCheckpointError(
                        f"ZeroOptimizer: group {i}'s {name!r} is a shard {list(v.local.shape)} {v.local.dtype} at {list(v.offsets)} "
                        f"of {list(v.global_shape)}; this rank holds {list(buf.shape)} {buf.dtype} at [{part.lo}] of [{part.numel}]"
                    )
        extra = [k for k in state if k not in expected_keys]
        if extra:
            raise IncompatibleCheckpointError(
                f"ZeroOptimizer: state under unexpected key(s) {[str(k)[:20] for k in extra[:5]]}"
            )

    def load_state_dict(self, state_dict: Any) -> None:
        """Take a state :meth:`validate_state_dict` accepts (checked first; nothing changes
        otherwise): options, steps, and each buffer unless it is this rank's own live one
        (a Checkpointer restore copies the bytes into it itself)."""
        self.validate_state_dict(state_dict)
        for g, saved, part in zip(self.param_groups, state_dict["param_groups"], self._parts):
            for k in _OPTIONS:
                if k in saved:
                    g[k] = tuple(saved[k]) if k == "betas" else saved[k]
            entry = state_dict["state"][saved["params"][0]]
            part.step = entry["step"]
            for name, buf in part.buffers().items():
                src = entry[name].local
                if src is not buf:
                    buf.copy_(src)


def _check_options(where: str, g: Mapping[str, Any], error: type[Exception] = ValueError) -> None:
    """Adam's options, where present: finite non-negative numbers, betas two numbers in [0, 1)."""
    for k in ("lr", "eps", "weight_decay"):
        if k in g:
            v = g[k]
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v < 0
            ):
                raise error(f"{where}: {k} must be a finite number >= 0, got {str(v)[:40]}")
    if "betas" in g:
        b = g["betas"]
        if (
            not isinstance(b, (list, tuple))
            or len(b) != 2
            or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < 1 for x in b
            )
        ):
            raise error(f"{where}: betas must be two numbers in [0, 1), got {str(b)[:60]}")
