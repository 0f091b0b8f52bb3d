"""Storage faults: a full file system, I/O errors, a read-only root.

For every fault: the previous committed step stays intact (restored bit-exactly), no temporary
bytes are left behind, what the training loop does (blocking ``save`` raises ``CommitError``;
``save_async`` keeps training and puts the error on the handle and in the log), the time until
the error reaches the user, and whether the next save works once the fault is gone.

* **full file system**: a real small tmpfs mounted for the run when this process may mount
  (root); otherwise ``FaultyFS`` raising ``ENOSPC`` on the segment write. Also a root that is
  already full when the job starts.
* **I/O errors** through ``FaultyFS``: ``EIO`` on the segment write (write + fsync in the
  engine), the manifest write, the directory fsync, the commit rename and the ``latest`` update.
* **read-only root**: a tmpfs remounted read-only (or ``FaultyFS`` raising ``EROFS``): at
  start-up ``Checkpointer(...)`` and ``protect(...)`` must fail before step 1; mid-run (the root
  turns read-only after step 2) saves fail and the committed steps stay readable.
* **read-only persistent store** (``file://``): fails at start-up too.

Run: ``python -m bench.bench_storage_faults [--smoke] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

import recoverkit
from recoverkit import Checkpointer, CheckpointOptions, CommitError, RetentionPolicy, TierPolicy
from recoverkit.config import StagingPolicy
from recoverkit.storage.faults import FaultInjector, FaultyFS

from ._workers import leftovers, small_model, train_step, width_for
from .report import fmt_bytes, publish


# --------------------------------------------------------------------------- mounts
@contextlib.contextmanager
def tmpfs(size_bytes: int, parent: str) -> Iterator[str | None]:
    """A fresh tmpfs of ``size_bytes`` (None if this process may not mount)."""
    d = tempfile.mkdtemp(dir=parent)
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", d], capture_output=True)
        mounted = p.returncode == 0
    try:
        yield d if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", d], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def _bind_ro(path: str) -> None:
    """Turn ``path`` read-only while files in it stay open (the run lock): a read-only bind mount."""
    for cmd in (["mount", "--bind", path, path], ["mount", "-o", "remount,bind,ro", path]):
        subprocess.run(cmd, check=True, capture_output=True)


def _unbind(path: str) -> None:
    subprocess.run(["umount", path], check=True, capture_output=True)


def remount(path: str, mode: str) -> bool:
    return subprocess.run(["mount", "-o", f"remount,{mode}", path], capture_output=True).returncode == 0


# --------------------------------------------------------------------------- helpers
class _LogTimes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.times: list[float] = []
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.times.append(time.perf_counter())
        self.messages.append(record.getMessage()[:300])


def _state(width: int) -> tuple[Any, Any, dict[str, Any]]:
    model, opt = small_model(width)
    return model, opt, {"model": model, "optimizer": opt}


def _snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restores(root: str, width: int, want: dict[str, torch.Tensor], step: int) -> bool:
    model, opt, state = _state(width)
    try:
        with Checkpointer(root, options=CheckpointOptions(lock=False)) as c:
            got = c.restore(state)
    except OSError:  # a read-only root cannot be opened by a writer: read it directly
        from recoverkit.restore.apply import apply_restored, target_shards
        from recoverkit.restore.reader import read_state
        from recoverkit.storage.local import LocalTier

        tier = LocalTier(root)
        got = tier.steps()[-1]
        apply_restored(state, read_state(tier, got, tier.manifest(got), rank=0, allow_pickle=False,
                                         sharded=target_shards(state)), restore_rng=True)
    return got == step and all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def _opts(**kw: Any) -> CheckpointOptions:
    return CheckpointOptions(retention=RetentionPolicy(keep_last=2), staging=StagingPolicy(budget_bytes=64 << 20), **kw)


# --------------------------------------------------------------------------- cases
def _mid_run(root: str, width: int, inject: Any, *, use_async: bool, fs: Any = None, faults: Any = None,
             heal: Any = None, expect_commit: bool = False) -> dict[str, Any]:
    """Steps 1, 2 saved; the fault is injected; step 3 saved; then the fault heals and step 4 saved."""
    model, opt, state = _state(width)
    out: dict[str, Any] = {"path": "save_async" if use_async else "save"}
    logs = _LogTimes()
    logging.getLogger("recoverkit").addHandler(logs)
    try:
        with Checkpointer(root, options=_opts(), fs=fs, faults=faults) as ckpt:
            for s in (1, 2):
                train_step(model, opt, s)
                ckpt.save(s, state)
            good = _snapshot(model)
            inject()
            train_step(model, opt, 3)
            t = time.perf_counter()
            err: BaseException | None = None
            if use_async:
                h = ckpt.save_async(3, state)
                out["call_s"] = time.perf_counter() - t
                steps_meanwhile = 0
                while not h.done():  # training keeps going while the save drains
                    train_step(model, opt, 100 + steps_meanwhile)
                    steps_meanwhile += 1
                out["error_known_s"] = time.perf_counter() - t
                out["steps_trained_meanwhile"] = steps_meanwhile
                err = h.error
                ckpt.take_failed_saves()  # seen here through the handle: close() need not raise it
                out["logged_s"] = (logs.times[0] - t) if logs.times else None
            else:
                try:
                    ckpt.save(3, state)
                except CommitError as e:
                    err = e
                out["error_known_s"] = time.perf_counter() - t
            out["error"] = None if err is None else f"{type(err).__name__}: {err}"[:400]
            out["cause"] = None if err is None or err.__cause__ is None else f"{type(err.__cause__).__name__}: {err.__cause__}"[:200]
            out["committed_anyway"] = 3 in ckpt.steps()
            out["steps_after_fault"] = ckpt.steps()
            out["leftovers"] = leftovers(root)
            out["previous_intact"] = (
                _restores(root, width, good, 2) if not out["committed_anyway"] else True
            )
            if heal is not None:
                heal()
            try:
                train_step(model, opt, 4)
                ckpt.save(4, state)
                out["next_save_ok"] = 4 in ckpt.steps()
            except Exception as e:  # noqa: BLE001 - the figure
                out["next_save_ok"] = False
                out["next_save_error"] = f"{type(e).__name__}: {e}"[:200]
    finally:
        logging.getLogger("recoverkit").removeHandler(logs)
    out["ok"] = bool(
        (err is not None or expect_commit)
        and out["previous_intact"]
        and not out["leftovers"]
        and (out["committed_anyway"] == expect_commit)
    )
    return out


def _protect_async_errors(root: str, width: int) -> dict[str, Any]:
    """protect(): three lazy saves hit EIO mid-run; training goes on and the user is told."""
    faults = FaultInjector()
    model, opt, _ = _state(width)
    logs = _LogTimes()
    logging.getLogger("recoverkit").addHandler(logs)
    t_arm = 0.0
    try:
        ckpt = Checkpointer(root, options=_opts(), fs=FaultyFS(faults), faults=faults)
        with recoverkit.protect(root, model=model, optimizer=opt, loader=range(12), save_every=1, checkpointer=ckpt,
                               on_failed_saves="warn") as run:
            for _ in run:
                train_step(model, opt, run.step + 1)
                if run.step + 1 == 4:
                    ckpt.wait()
                    faults.fail_at(op="write_segment", error=OSError(errno.EIO, "Input/output error"), times=3)
                    t_arm = time.perf_counter()
        steps_done = run.step
        failed = [s for s, _ in run.failed_saves]
    finally:
        logging.getLogger("recoverkit").removeHandler(logs)
    with Checkpointer(root, options=CheckpointOptions(lock=False)) as c:
        latest = c.latest()
    return {
        "how": "FaultyFS EIO on the next 3 segment writes from step 4 (saves a newer one superseded are never written)",
        "path": "protect (save_async)",
        "steps_done": steps_done, "failed_saves": failed, "logged": len(logs.messages),
        "error_known_s": (logs.times[0] - t_arm) if logs.times else None, "latest": latest,
        "leftovers": leftovers(root),
        # 3 failed writes fail at least 3 saves; a save superseded by a failing newer one fails with it
        "ok": steps_done == 12 and len(failed) >= 3 and min(failed) >= 4 and len(logs.messages) >= len(failed)
        and latest == 12 and not leftovers(root),
    }


def _startup_fails(root: str, width: int, fs: Any = None, options: CheckpointOptions | None = None) -> dict[str, Any]:
    """Checkpointer(...) and protect(...) on an unwritable root: both fail before step 1."""
    out: dict[str, Any] = {}
    t = time.perf_counter()
    try:
        Checkpointer(root, options=options, fs=fs).close()
        out["checkpointer"] = "constructed (NOT failed)"
    except OSError as e:
        out["checkpointer"] = f"{type(e).__name__}: {e}"[:300]
        out["checkpointer_errno"] = errno.errorcode.get(e.errno or 0, str(e.errno))
    out["checkpointer_error_s"] = time.perf_counter() - t
    model, opt, _ = _state(width)
    steps = 0
    t = time.perf_counter()
    try:
        ckpt = Checkpointer(root, options=options, fs=fs) if fs is not None else None
        with recoverkit.protect(root, model=model, optimizer=opt, loader=range(5), save_every=1, options=options,
                                checkpointer=ckpt) as run:
            for _ in run:
                train_step(model, opt, steps)
                steps += 1
        out["protect"] = "ran (NOT failed)"
    except OSError as e:
        out["protect"] = f"{type(e).__name__}: {e}"[:300]
    out["protect_error_s"] = time.perf_counter() - t
    out["steps_before_error"] = steps
    out["ok"] = "NOT" not in out["checkpointer"] + out["protect"] and steps == 0
    return out


def run(smoke: bool = False, workdir: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    state_bytes = (1 << 20) if smoke else (8 << 20)
    width = width_for(state_bytes)
    base = tempfile.mkdtemp(prefix="rk-bench-storage-", dir=workdir)
    cases: dict[str, dict[str, Any]] = {}
    step_bytes = 0
    try:
        # size of one step on disk, to size the small file system
        probe = os.path.join(base, "probe")
        model, opt, state = _state(width)
        train_step(model, opt, 1)
        with Checkpointer(probe) as c:
            c.save(1, state)
            step_bytes = sum(os.path.getsize(os.path.join(c.tier.step_path(1), f)) for f in os.listdir(c.tier.step_path(1)))
        shutil.rmtree(probe)

        # 1. full file system: room for 2.5 steps (keep_last=2 needs room for 3 while step 3 is written)
        for use_async in (False, True):
            name = f"full_fs/{'save_async' if use_async else 'save'}"
            with tmpfs(int(step_bytes * 2.5) + (64 << 10), base) as mnt:
                if mnt is not None:
                    root = os.path.join(mnt, "ckpt")
                    cases[name] = _mid_run(root, width, lambda: None, use_async=use_async,
                                           heal=lambda r=root: _free(r, 1))
                    cases[name]["how"] = f"tmpfs of {fmt_bytes(int(step_bytes * 2.5) + (64 << 10))}"
                else:
                    faults = FaultInjector()
                    root = os.path.join(base, name.replace("/", "-"))
                    cases[name] = _mid_run(root, width, lambda f=faults: f.fail_at(op="write_segment", error=OSError(errno.ENOSPC, "No space left on device")),
                                           use_async=use_async, fs=FaultyFS(faults), faults=faults)
                    cases[name]["how"] = "FaultyFS ENOSPC (cannot mount here)"
        # a root that is already full when the job starts
        with tmpfs(256 << 10, base) as mnt:
            if mnt is not None:
                _fill(os.path.join(mnt, "ballast"))
                cases["full_fs/at_start"] = _startup_fails(os.path.join(mnt, "ckpt"), width)
                cases["full_fs/at_start"]["how"] = "tmpfs filled to the last byte"

        # 2. I/O errors
        io = [
            ("eio/segment_write", "write_segment", None, False),
            ("eio/manifest_write", "write_file", "manifest.json", False),
            ("eio/dir_fsync", "fsync_dir", None, False),
            ("eio/commit_rename", "rename", "step-", False),
            ("eio/latest_update", "replace", "latest", True),
        ]
        for name, op, path, commits in io:
            for use_async in ((False, True) if name == "eio/segment_write" else (False,)):
                faults = FaultInjector()
                root = os.path.join(base, f"{name.replace('/', '-')}-{use_async}")
                key = name + ("/save_async" if use_async else "")
                cases[key] = _mid_run(
                    root, width, lambda f=faults, o=op, p=path: f.fail_at(op=o, path_contains=p, error=OSError(errno.EIO, "Input/output error")),
                    use_async=use_async, fs=FaultyFS(faults), faults=faults, expect_commit=commits,
                )
                cases[key]["how"] = f"FaultyFS EIO on {op}" + (f" ({path})" if path else "")

        cases["eio/protect_loop"] = _protect_async_errors(os.path.join(base, "protect"), width)

        # 3. read-only root
        with tmpfs(64 << 20, base) as mnt:
            if mnt is not None:
                root = os.path.join(mnt, "ckpt")
                for use_async in (False, True):
                    key = "read_only/mid_run" + ("/save_async" if use_async else "")
                    r_root = root + ("-async" if use_async else "")
                    cases[key] = _mid_run(r_root, width, lambda r=r_root: _bind_ro(r), use_async=use_async,
                                          heal=lambda r=r_root: _unbind(r))
                    cases[key]["how"] = "root bind-mounted read-only over itself after step 2"
                if not remount(mnt, "ro"):
                    raise RuntimeError(f"could not remount {mnt} read-only")
                cases["read_only/at_start"] = _startup_fails(root, width)
                cases["read_only/at_start"]["how"] = "tmpfs mounted read-only (holding committed steps)"
                cases["read_only/persistent_at_start"] = _startup_fails(
                    os.path.join(base, "local-ok"), width,
                    options=CheckpointOptions(tiers=TierPolicy(persistent_url=f"file://{mnt}/zarr", persistent_every=1)),
                )
                cases["read_only/persistent_at_start"]["how"] = "persistent file:// store on a read-only tmpfs"
                remount(mnt, "rw")
            else:
                faults = FaultInjector().fail_at(op="write_file", error=OSError(errno.EROFS, "Read-only file system"), times=100)
                cases["read_only/at_start"] = _startup_fails(os.path.join(base, "ro"), width, fs=FaultyFS(faults))
                cases["read_only/at_start"]["how"] = "FaultyFS EROFS on every file write (cannot mount here)"
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {
        "scenario": "storage_faults",
        "smoke": smoke,
        "state_bytes": state_bytes,
        "step_bytes_on_disk": step_bytes,
        "cases": cases,
        "all_ok": all(c["ok"] for c in cases.values()),
        "runtime_s": time.perf_counter() - t0,
    }


def _fill(path: str) -> None:
    """Fill the file system holding ``path`` to the last byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (1 << 16, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError:
                    break
    finally:
        os.close(fd)


def _free(root: str, step: int) -> None:
    """Make room the way an operator would: delete an old step."""
    shutil.rmtree(os.path.join(root, f"step-{step:09d}"), ignore_errors=True)


def table(r: dict[str, Any]) -> str:
    lines = [
        f"state {fmt_bytes(r['state_bytes'])}, {fmt_bytes(r['step_bytes_on_disk'])} per step on disk"
        + (" [smoke]" if r["smoke"] else "") + f"; runtime {r['runtime_s']:.1f} s",
        "",
        "| fault | how | path | error reaches the user after | previous step intact | temporaries left | training | next save after the fault is gone | ok |",
        "|---|---|---|---:|---|---:|---|---|---|",
    ]
    for name, c in r["cases"].items():
        if "checkpointer" in c:  # start-up cases
            lines.append(
                f"| {name} | {c['how']} | Checkpointer / protect | {c['checkpointer_error_s'] * 1e3:.1f} ms / "
                f"{c['protect_error_s'] * 1e3:.1f} ms | - | - | stops before step 1 ({c['steps_before_error']} steps ran): "
                f"{c.get('checkpointer_errno', '?')} | - | {'yes' if c['ok'] else 'NO'} |"
            )
            continue
        if "steps_done" in c:  # protect()
            when = f"{c['error_known_s'] * 1e3:.1f} ms (logged at the next step boundary; run.failed_saves)" if c["error_known_s"] else "never"
            lines.append(
                f"| {name} | {c['how']} | {c['path']} | {when} | yes (latest {c['latest']}) | {len(c['leftovers'])} | "
                f"keeps going ({c['steps_done']} of 12 steps; failed saves {c['failed_saves']}) | works | {'yes' if c['ok'] else 'NO'} |"
            )
            continue
        if c["path"] == "save_async":
            when = f"{c['error_known_s'] * 1e3:.1f} ms (on the handle: Checkpointer API)"
            training = f"keeps going ({c['steps_trained_meanwhile']} steps meanwhile)"
        else:
            when = f"{c['error_known_s'] * 1e3:.1f} ms (CommitError raised)" if c["error"] else f"{c['error_known_s'] * 1e3:.1f} ms (committed; warning)"
            training = "stops unless the caller catches CommitError" if c["error"] else "keeps going"
        lines.append(
            f"| {name} | {c['how']} | {c['path']} | {when} | {'yes' if c['previous_intact'] else 'NO'} | "
            f"{len(c['leftovers'])} | {training} | {'works' if c.get('next_save_ok') else 'fails: ' + c.get('next_save_error', '')[:60]} | "
            f"{'yes' if c['ok'] else 'NO'} |"
        )
    lines += ["", f"- every case as required: {'yes' if r['all_ok'] else 'NO'}"]
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        names, vals = [], []
        for n, c in r["cases"].items():
            names.append(n)
            vals.append(1e3 * (c.get("error_known_s") or c.get("checkpointer_error_s") or 0))
        ax.barh(names, vals)
        ax.set_xlabel("ms until the error reaches the user")
        ax.set_title("storage faults: time to error")

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    r = run(a.smoke, a.workdir)
    text = table(r)
    print(text)
    publish("storage_faults", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
