"""Restore from memory at memory speed: an in-place restore from a host or shared-memory snapshot
next to a plain memcpy of the same bytes.

On one state per size (default 64, 256 and 1024 MiB: an 8-layer MLP's float32 parameters plus
AdamW's two moments, every tensor materialised), in one run:

* **memcpy**: torch ``copy_`` between two preallocated, pre-faulted tensors of the state's bytes
  (torch's own threads): the limit a restore into existing tensors is measured against;
* **CRC pass**: the CRC-32C check of every staged region, alone (``restore.in_place.verify``,
  the pass an in-place restore makes before it writes a byte);
* **host, in place**: ``Checkpointer.restore`` inside ``in_place_reads()`` from the host
  snapshot (``TierSpec.host``): manifest, object tree, CRC pass, checks, copy into the live
  parameters and optimizer state, random streams: the whole call;
* **host, copy path**: the same restore without ``in_place_reads()`` (new tensors read from the
  snapshot, then ``load_state_dict``), as restores ran before issue 12;
* **host, fresh optimizer**: the in-place restore into the live model and a new optimizer
  without state, in this process (the moments land in new tensors built from the record:
  allocated and page-faulted as the bytes land; memory this process freed before may be
  reused, so the restarted-process row below is the faithful one);
* **shm, in place**: the same in-place restore from the shared-memory tier (``TierSpec.shm``,
  slots under a temporary directory in ``/dev/shm``), when this recoverkit has that tier kind
  (else reported as not run);
* **shm, restarted process**: what a process restarted on the node does: a new Python process
  per round builds a fresh model (initialised anew) and a fresh AdamW without state, opens a
  Checkpointer on the same root and restores the snapshot the first process left in shared
  memory (the whole ``restore`` call, the first in that process: the optimizer's moments are
  new memory, page-faulted as the bytes land). The same process then times a memcpy of the
  state's bytes into newly allocated memory (``torch.empty`` + ``copy_``: the fair hardware
  figure here, it faults its pages too) and into the same, now pre-faulted, memory; the row
  gives the ratio to both, and checks the restore bit-exact (parameters, moments, step
  counts, parameter groups). Two thirds of the bytes (AdamW's moments) land in new memory
  there, so the kernel's page faults bound it as they bound the memcpy into new memory; the
  CRC pass comes on top.

Every figure is GB/s of the state's bytes (median of ``--reps``) and its ratio to memcpy
(target: in place >= 0.5x memcpy; for the restarted process, >= 0.5x a memcpy into new
memory). The memcpy, the CRC pass and the in-place restore are timed
round by round, one after the other in each round, so that a busy machine weighs on all three
alike; each tier's ratio is against the memcpy of its own rounds. Each in-place run also checks that it was in place: the
same parameter and optimizer-state tensor objects before and after, bit-exact values.

Run: ``python -m bench.bench_restore_memory [--smoke] [--sizes-mib 64,256,1024] [--reps 5]
[--no-shm] [--out-dir DIR]`` (publishes ``restore_memory.json``, ``.md`` and ``.png`` to ``bench/results``
by default; smoke runs write nowhere unless ``--out-dir`` is given).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from recoverkit import Checkpointer, CheckpointOptions, TierSpec
from recoverkit.config import StagingPolicy
from recoverkit.restore.in_place import Unit, collect, verify, worker_threads
from recoverkit.restore.reader import in_place_reads
from recoverkit.staging.registry import tier_kinds

from .machine import describe, median
from .report import publish

NAME = "restore_memory"
TARGETS = {
    "host_in_place_vs_memcpy": 0.5,
    "shm_in_place_vs_memcpy": 0.5,
    "shm_restarted_vs_memcpy_fresh": 0.5,
}
METHODS = (
    "memcpy", "crc_pass", "host_in_place", "host_copy_path", "host_fresh_optimizer", "shm_in_place",
    "shm_restarted",
)
LAYERS = 8
#: a restarted-process round (a new Python process) may take this long at most
CHILD_TIMEOUT_S = 600


def _model(total_mib: int, seed: int) -> torch.nn.Module:
    side = max(16, int((total_mib * 2**20 / 3 / LAYERS / 4) ** 0.5) // 16 * 16)
    torch.manual_seed(seed)
    return torch.nn.Sequential(*(torch.nn.Linear(side, side, bias=False) for _ in range(LAYERS)))


def make_state(total_mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP of LAYERS square layers whose parameters + AdamW's two moments are ~total_mib."""
    model = _model(total_mib, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():  # materialise AdamW's state
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    for p in model.parameters():
        p.grad = None
    return model, opt


def _live(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [*model.parameters(), *(t for s in opt.state.values() for t in s.values())]


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in _live(model, opt))


def _timed(fn: Callable[[], Any], reps: int) -> list[float]:
    fn()  # warm-up: first touches, thread pools, caches
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


@contextlib.contextmanager
def _checkpointer(root: str, tiers: list[TierSpec], nbytes: int) -> Iterator[Checkpointer]:
    opts = CheckpointOptions(tiers=tiers, staging=StagingPolicy(budget_bytes=nbytes + nbytes // 8 + (64 << 20)))
    with Checkpointer(root, options=opts) as ckpt:
        yield ckpt


def _restore_case(
    ckpt: Checkpointer, tier_name: str, state: dict[str, Any], reps: int, *, copy_path: bool = False
) -> dict[str, Any]:
    """Save step 1 into ``tier_name`` (lazy save, settled), then time, round by round (so that
    each round's figures see the same load on the machine): a memcpy of the state's bytes,
    the CRC pass alone, and the in-place restore (checked to be in place and bit-exact);
    with ``copy_path`` also the copy restore, after them (it replaces the optimizer state)."""
    model, opt = state["model"], state["optim"]
    ckpt.save_async(1, state).wait()
    ckpt.wait()
    tier = ckpt.tiers[tier_name]
    assert tier.steps() == [1], f"{tier_name} holds {tier.steps()}"
    found: dict[tuple[str, int, int], Unit] = {}  # the regions an in-place read verifies
    for rec in tier.manifest(1).tensors.values():
        if rec.alias_of is None:
            collect(tier, 1, rec, found)
    units = list(found.values())
    before = [(t, t.detach().clone()) for t in _live(model, opt)]
    with torch.no_grad():
        for t in _live(model, opt):
            t.add_(1.0)

    def in_place() -> None:
        with in_place_reads():
            assert ckpt.restore(state) == 1

    out: dict[str, Any] = {**_rounds(_state_bytes(model, opt), units, in_place, reps), "regions": len(units)}
    del units, found
    now = _live(model, opt)
    out["in_place_checked"] = len(now) == len(before) and all(
        a is b and torch.equal(a, v) for a, (b, v) in zip(now, before)
    )
    del before, now
    if copy_path:
        out["copy_path_s"] = _timed(lambda: ckpt.restore(state), max(1, reps // 2))
        out["fresh_optimizer_s"] = _timed(lambda: _fresh_optimizer_restore(ckpt, model), max(1, reps // 2))
    gc.collect()
    return out


def _fresh_optimizer_restore(ckpt: Checkpointer, model: torch.nn.Module) -> None:
    """An in-place restore into the live model and a new optimizer without state, as a
    restarted process restores: the parameters take their bytes in place, the optimizer's
    moments are new tensors (allocated and first touched here)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with in_place_reads():
        assert ckpt.restore({"model": model, "optim": opt}) == 1
    assert opt.state, "the optimizer state was not restored"


def _restart_case(root: str, shm_dir: str, mib: int, nbytes: int, reps: int) -> dict[str, Any]:
    """Save step 1 into the shared-memory tier and leave it there (as a crash would), then
    ``reps`` rounds (one untimed first) of a new process restoring it (:func:`_restart_child`)."""
    spec = TierSpec.shm(shm_dir=shm_dir, budget_bytes=3 * nbytes + (64 << 20))  # type: ignore[attr-defined]
    model, opt = make_state(mib)
    with _checkpointer(root, [spec, TierSpec.local(every_steps=None)], nbytes) as ckpt:
        ckpt.save_async(1, {"model": model, "optim": opt}).wait()
        ckpt.wait()
        ckpt.close(keep_snapshots=True)
    del model, opt
    gc.collect()
    job = json.dumps({"root": root, "shm_dir": shm_dir, "mib": mib, "nbytes": nbytes})
    rounds: list[dict[str, Any]] = []
    try:
        for i in range(reps + 1):
            done = subprocess.run(
                [sys.executable, "-m", "bench.bench_restore_memory", "--restart-child", job],
                capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            if done.returncode != 0:
                raise RuntimeError(f"the restarted process failed ({done.returncode}): {done.stderr[-2000:]}")
            if i:
                rounds.append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:  # the job's shared memory: a normal close removes it
        with _checkpointer(root, [spec, TierSpec.local(every_steps=None)], nbytes):
            pass
    out: dict[str, Any] = {k: [r[k] for r in rounds] for k in ("restore_s", "memcpy_fresh_s", "memcpy_prefaulted_s")}
    out["checked"] = all(r["checked"] for r in rounds)
    return out


def _restart_child(job: dict[str, Any]) -> dict[str, Any]:
    """One restarted process: a fresh model and AdamW restore step 1 from shared memory
    (timed, the whole call), checked bit-exact against the state that was saved; then a
    memcpy of the same bytes into new memory and into the same memory again."""
    mib, nbytes = int(job["mib"]), int(job["nbytes"])
    model = _model(mib, 1)  # initialised anew, as a restarted script builds it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # no state, another lr: restored
    spec = TierSpec.shm(shm_dir=job["shm_dir"], budget_bytes=3 * nbytes + (64 << 20))  # type: ignore[attr-defined]
    with _checkpointer(job["root"], [spec, TierSpec.local(every_steps=None)], nbytes) as ckpt:
        t = time.perf_counter()
        step = ckpt.restore({"model": model, "optim": opt})
        restore_s = time.perf_counter() - t
        ckpt.close(keep_snapshots=True)  # the next round restores it again
    ref_model, ref_opt = make_state(mib)
    checked = (
        step == 1
        and _state_bytes(model, opt) == nbytes
        and all(torch.equal(a, b) for a, b in zip(_live(model, opt), _live(ref_model, ref_opt)))
        and [
            {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
        ] == [{k: v for k, v in g.items() if k != "params"} for g in ref_opt.param_groups]
        and all(
            torch.equal(opt.state[p]["step"], ref_opt.state[q]["step"])
            for p, q in zip(model.parameters(), ref_model.parameters())
        )
    )
    del ref_model, ref_opt
    gc.collect()
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
    t = time.perf_counter()
    dst = torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    fresh_s = time.perf_counter() - t
    t = time.perf_counter()
    dst.copy_(src)
    prefaulted_s = time.perf_counter() - t
    return {"restore_s": restore_s, "memcpy_fresh_s": fresh_s, "memcpy_prefaulted_s": prefaulted_s, "checked": checked}


def _rounds(nbytes: int, units: list[Unit], in_place: Callable[[], None], reps: int) -> dict[str, list[float]]:
    """``reps`` rounds of: torch ``copy_`` between two preallocated, pre-faulted tensors of
    ``nbytes``, the CRC pass over ``units``, the in-place restore (after one untimed round
    that warms up first touches, thread pools and caches)."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
    dst = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    steps: dict[str, Callable[[], Any]] = {
        "memcpy_s": lambda: dst.copy_(src),
        "crc_pass_s": lambda: verify(units),
        "in_place_s": in_place,
    }
    rounds: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(reps + 1):
        for key, fn in steps.items():
            t = time.perf_counter()
            fn()
            if i:
                rounds[key].append(time.perf_counter() - t)
    return rounds


def run(
    sizes_mib: list[int], reps: int, workdir: str | None = None, *, shm: bool = True
) -> dict[str, Any]:
    base = tempfile.mkdtemp(prefix="rk-bench-restore-memory-", dir=workdir)
    shm_base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else base
    shm_dir = tempfile.mkdtemp(prefix="rk-bench-restore-memory-", dir=shm_base)
    has_shm = shm and "shm" in tier_kinds() and hasattr(TierSpec, "shm")
    sizes: list[dict[str, Any]] = []
    try:
        for mib in sizes_mib:
            model, opt = make_state(mib)
            state: dict[str, Any] = {"model": model, "optim": opt}
            nbytes = _state_bytes(model, opt)
            entry: dict[str, Any] = {"size_mib": mib, "state_bytes": nbytes, "tensors": len(_live(model, opt))}
            host = [TierSpec.host(keep=1), TierSpec.local(every_steps=None)]
            with _checkpointer(os.path.join(base, f"host-{mib}"), host, nbytes) as ckpt:
                entry["host"] = _restore_case(ckpt, "host", state, reps, copy_path=True)
            if has_shm:
                spec = TierSpec.shm(shm_dir=shm_dir, budget_bytes=3 * nbytes + (64 << 20))  # type: ignore[attr-defined]
                with _checkpointer(os.path.join(base, f"shm-{mib}"), [spec, TierSpec.local(every_steps=None)], nbytes) as ckpt:
                    entry["shm"] = _restore_case(ckpt, spec.name, state, reps)
                entry["restart"] = _restart_case(os.path.join(base, f"restart-{mib}"), shm_dir, mib, nbytes, reps)
            sizes.append(entry)
            del model, opt, state
            gc.collect()
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shm_left = sum(len(files) for _, _, files in os.walk(shm_dir))
        shutil.rmtree(shm_dir, ignore_errors=True)
    why = "this recoverkit has no 'shm' tier kind yet" if shm else "left out (--no-shm)"
    not_run = {} if has_shm else {"shm_in_place": why, "shm_restarted": why}
    return _summary(sizes, reps, not_run, shm_left)


def _summary(sizes: list[dict[str, Any]], reps: int, not_run: dict[str, str], shm_left: int) -> dict[str, Any]:
    rows = []
    for e in sizes:
        n = e["state_bytes"]
        host = e["host"]
        secs = {
            "memcpy": median(host["memcpy_s"]),
            "crc_pass": median(host["crc_pass_s"]),
            "host_in_place": median(host["in_place_s"]),
            "host_copy_path": median(host["copy_path_s"]),
            "host_fresh_optimizer": median(host["fresh_optimizer_s"]),
        }
        ratio = {k: secs["memcpy"] / v for k, v in secs.items() if k != "memcpy"}
        if "shm" in e:  # against the memcpy of its own rounds
            secs["shm_in_place"] = median(e["shm"]["in_place_s"])
            ratio["shm_in_place"] = median(e["shm"]["memcpy_s"]) / secs["shm_in_place"]
        restart: dict[str, Any] = {}
        if "restart" in e:  # against the memcpy of its own processes: into new memory, and pre-faulted
            r = e["restart"]
            secs["shm_restarted"] = median(r["restore_s"])
            restart = {
                "memcpy_fresh_s": median(r["memcpy_fresh_s"]),
                "memcpy_prefaulted_s": median(r["memcpy_prefaulted_s"]),
            }
            # per process (its memcpy right after its restore, under the same load), then the median
            ratio["shm_restarted"] = median([m / t for m, t in zip(r["memcpy_fresh_s"], r["restore_s"])])
            restart["vs_memcpy_fresh"] = ratio["shm_restarted"]
            restart["vs_memcpy_prefaulted"] = median(
                [m / t for m, t in zip(r["memcpy_prefaulted_s"], r["restore_s"])]
            )
            restart["memcpy_fresh_gb_per_s"] = n / restart["memcpy_fresh_s"] / 1e9
            restart["memcpy_prefaulted_gb_per_s"] = n / restart["memcpy_prefaulted_s"] / 1e9
        gbps = {k: n / v / 1e9 for k, v in secs.items()}
        # best of the rounds: what each reaches when the machine lets it (a busy machine
        # stretches torch's memcpy, whose threads wait for each other, more than the restore)
        best = {"host_in_place": min(host["memcpy_s"]) / min(host["in_place_s"])}
        if "shm" in e:
            best["shm_in_place"] = min(e["shm"]["memcpy_s"]) / min(e["shm"]["in_place_s"])
        if "restart" in e:
            best["shm_restarted"] = min(e["restart"]["memcpy_fresh_s"]) / min(e["restart"]["restore_s"])
        rows.append(
            {
                "size_mib": e["size_mib"],
                "state_bytes": n,
                "tensors": e["tensors"],
                "seconds_median": secs,
                "gb_per_s": gbps,
                "vs_memcpy": ratio,
                "vs_memcpy_best": best,
                "in_place_checked": {k: e[k]["in_place_checked"] for k in ("host", "shm") if k in e},
                "restarted": restart,
                "restarted_checked": e["restart"]["checked"] if "restart" in e else None,
            }
        )
    largest = rows[-1] if rows else None
    ratios = {}
    if largest is not None:
        ratios["host_in_place_vs_memcpy"] = largest["vs_memcpy"]["host_in_place"]
        if "shm_in_place" in largest["vs_memcpy"]:
            ratios["shm_in_place_vs_memcpy"] = largest["vs_memcpy"]["shm_in_place"]
        if largest["restarted"]:
            ratios["shm_restarted_vs_memcpy_fresh"] = largest["restarted"]["vs_memcpy_fresh"]
            ratios["shm_restarted_vs_memcpy_prefaulted"] = largest["restarted"]["vs_memcpy_prefaulted"]
        ratios["host_in_place_vs_copy_path"] = (
            largest["seconds_median"]["host_copy_path"] / largest["seconds_median"]["host_in_place"]
        )
    return {
        "scenario": NAME,
        "reps": reps,
        "torch_threads": torch.get_num_threads(),
        "crc_threads": worker_threads(),
        "sizes": rows,
        "ratios": ratios,
        "targets": TARGETS,
        "not_run": not_run,
        "shm_files_left": shm_left,
        "raw": sizes,
        "machine": describe(),
    }


def table(r: dict[str, Any]) -> str:
    head = (
        "| state | memcpy | CRC pass | host, in place | host, copy path | host, fresh optimizer | shm, in place "
        "| shm, restarted process |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for row in r["sizes"]:
        cells = " | ".join(_cell(row, k) for k in METHODS)
        lines.append(f"| {row['size_mib']} MiB ({row['tensors']} tensors) | {cells} |")
    lines.append("")
    lines.append(
        f"GB/s of the state's bytes, median of {r['reps']}; (Nx) = the ratio to memcpy (torch `copy_` between two "
        f"preallocated tensors, {r['torch_threads']} torch thread(s), timed in the same rounds as each tier's restores: "
        f"the memcpy column is the host tier's rounds); the CRC pass runs on {r['crc_threads']} thread(s). "
        "In place: `Checkpointer.restore` inside `in_place_reads()`, the whole call; copy path: the same restore "
        "without it (new tensors, then `load_state_dict`); fresh optimizer: in place into the model and a new "
        "optimizer without state (its moments new tensors), as after a restart. Restarted process: a new process "
        "per round, fresh model and AdamW, restoring from the shared memory the first process left; (Nx) against a "
        "memcpy into new memory in the same process (the median of the per-process ratios)."
    )
    for row in r["sizes"]:
        rs = row.get("restarted")
        if rs:
            lines.append(
                f"- restarted process, {row['size_mib']} MiB: restore {row['gb_per_s']['shm_restarted']:.2f} GB/s; memcpy "
                f"into new memory {rs['memcpy_fresh_gb_per_s']:.2f} GB/s ({rs['vs_memcpy_fresh']:.2f}x), into pre-faulted "
                f"memory {rs['memcpy_prefaulted_gb_per_s']:.2f} GB/s ({rs['vs_memcpy_prefaulted']:.2f}x)"
                + ("" if row["restarted_checked"] else "; NOT bit-exact")
            )
    t = r["ratios"]
    best = r["sizes"][-1]["vs_memcpy_best"] if r["sizes"] else {}
    for key, goal in TARGETS.items():
        if key in t:
            tier = key.split("_vs_memcpy")[0]
            lines.append(
                f"- {key}: {t[key]:.2f}x (target >= {goal}: {'met' if t[key] >= goal else 'MISSED'}; "
                f"best round against best round: {best.get(tier, float('nan')):.2f}x)"
            )
    if "host_in_place_vs_copy_path" in t:
        lines.append(f"- in place is {t['host_in_place_vs_copy_path']:.1f}x faster than the copy path (largest state)")
    for k, why in r["not_run"].items():
        lines.append(f"- {k}: not run ({why})")
    bad = [f"{row['size_mib']} MiB {k}" for row in r["sizes"] for k, ok in row["in_place_checked"].items() if not ok]
    if bad:
        lines.append(f"- NOT in place or not bit-exact: {', '.join(bad)}")
    if r["shm_files_left"]:
        lines.append(f"- {r['shm_files_left']} file(s) were left in the shared-memory directory")
    return "\n".join(lines)


def _cell(row: dict[str, Any], k: str) -> str:
    g, x = row["gb_per_s"], row["vs_memcpy"]
    if k not in g:
        return "not run"
    ratio = f" ({x[k]:.2f}x)" if k in x else ""
    return f"{g[k]:.1f} GB/s{ratio}"


def _plot(r: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        rows = r["sizes"]
        width = 0.8 / len(METHODS)
        for i, k in enumerate(METHODS):
            xs = [j + i * width for j, row in enumerate(rows) if k in row["gb_per_s"]]
            ys = [row["gb_per_s"][k] for row in rows if k in row["gb_per_s"]]
            ax.bar(xs, ys, width, label=k.replace("_", " "))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
        ax.set_xticklabels([f"{row['size_mib']} MiB" for row in rows])
        ax.set_ylabel("GB/s of the state")
        ax.set_title("Restore from memory vs memcpy")
        ax.legend(fontsize=8)

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one 8 MiB state, one repetition")
    ap.add_argument("--sizes-mib", default="64,256,1024", help="comma-separated state sizes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-shm", action="store_true", help="leave out the shared-memory tier")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None, help="default bench/results; smoke runs write nowhere unless given")
    ap.add_argument("--restart-child", default=None, help=argparse.SUPPRESS)  # one restarted-process round
    a = ap.parse_args(argv)
    if a.restart_child is not None:
        out = _restart_child(json.loads(a.restart_child))
        print(json.dumps(out))
        return out
    sizes = [8] if a.smoke else [int(s) for s in a.sizes_mib.split(",") if s.strip()]
    r = run(sizes, 1 if a.smoke else a.reps, a.workdir, shm=not a.no_shm)
    r["smoke"] = a.smoke
    text = table(r)
    print(text)
    if a.out_dir or not a.smoke:
        publish(NAME, r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
