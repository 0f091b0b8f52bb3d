"""Corruption: every kind of damage to a committed step is detected, and restore falls back.

Two steps are saved; the newest is then damaged on disk, one way per trial, and a fresh
``Checkpointer`` restores. A trial *detects* the damage when the damaged step is skipped (a
``CheckpointSkippedWarning`` names it) or, for damage outside any step, when it is ignored; it
*falls back* when the restore returns step 1 with exactly step 1's tensors. Damage kinds:

* bit flips at random offsets inside the bytes a segment file stores (object blob and tensor
  pieces; flips in alignment padding, which no reader ever uses, are counted apart and the restore
  must then return step 2 intact);
* truncation to a random length; zero-filled random ranges (only ranges whose bytes were not
  already zero); a missing segment file; a corrupt manifest (bit flip, truncation, garbage, empty,
  a foreign JSON document); foreign files in the root (a stray file, a directory named like a step
  with a garbage manifest, a step directory without a manifest).

Then the cost of the full checksum pass: on a larger checkpoint (default 512 MiB) the time to read
every stored byte through the engine with its CRC-32C check (``verify``), a whole restore into live
tensors, next to a plain ``read`` of the same files into a buffer (page cache warm for every
method, and cold too where the cache can be dropped).

Run: ``python -m bench.bench_corruption [--smoke] [--size-mib 512] [--trials 20] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
import warnings
from typing import Any

import torch

from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy
from recoverkit.storage.discovery import CheckpointSkippedWarning

from ._workers import small_model
from .bench_limits import drop_caches, timed
from .report import fmt_bytes, publish

WIDTH = 128


def _paths(root: str, step: int = 2) -> tuple[str, str]:
    d = os.path.join(root, f"step-{step:09d}")
    return os.path.join(d, "rank-00000.seg"), os.path.join(d, "manifest.json")


def _make(root: str) -> dict[int, dict[str, torch.Tensor]]:
    """Two committed steps of a model + AdamW; returns each step's tensors."""
    from ._workers import train_step

    model, opt = small_model(WIDTH)
    saved = {}
    opts = CheckpointOptions(retention=RetentionPolicy(keep_last=5))
    with Checkpointer(root, options=opts) as ckpt:
        for step in (1, 2):
            train_step(model, opt, step)
            ckpt.save(step, {"model": model, "optimizer": opt})
            saved[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return saved


def _covered(manifest_path: str) -> list[tuple[int, int]]:
    """(offset, nbytes) of every region of rank 0's segment that a reader uses."""
    m = json.load(open(manifest_path))
    regions = [(b["offset"], b["nbytes"]) for b in m["blobs"]]
    for t in m["tensors"].values():
        regions += [(s["offset"], s["nbytes"]) for s in t.get("shards", ()) if s["nbytes"]]
    return sorted(regions)


def _restore(root: str) -> tuple[int | None, dict[str, torch.Tensor], list[str], str | None]:
    model, opt = small_model(WIDTH, seed=9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Checkpointer(root) as ckpt:
                step = ckpt.restore({"model": model, "optimizer": opt})
            err = None
        except Exception as e:  # noqa: BLE001 - a trial outcome
            step, err = None, f"{type(e).__name__}: {e}"
    skipped = [str(c.message) for c in caught if issubclass(c.category, CheckpointSkippedWarning)]
    return step, dict(model.state_dict()), skipped, err


def _damage(kind: str, root: str, rng: random.Random) -> dict[str, Any]:
    seg, man = _paths(root)
    info: dict[str, Any] = {}
    if kind in ("bit_flip", "padding_flip"):
        regions = _covered(man)
        size = os.path.getsize(seg)
        if kind == "bit_flip":
            off, n = rng.choice(regions)
            pos = off + rng.randrange(n)
        else:
            covered = set()
            for off, n in regions:
                covered.update(range(off, off + n))
            gaps = [i for i in range(size) if i not in covered]
            if not gaps:
                return {"skip": True}
            pos = rng.choice(gaps)
        bit = rng.randrange(8)
        with open(seg, "r+b") as f:
            f.seek(pos)
            b = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([b ^ (1 << bit)]))
        info.update(offset=pos, bit=bit)
    elif kind == "truncate":
        size = os.path.getsize(seg)
        n = rng.randrange(size)
        os.truncate(seg, n)
        info.update(to=n, of=size)
    elif kind == "zero_range":
        off, n = rng.choice(_covered(man))
        data = open(seg, "rb").read()
        for _ in range(100):
            a = off + rng.randrange(n)
            ln = rng.randint(1, min(4096, off + n - a))
            if any(data[a : a + ln]):
                break
        with open(seg, "r+b") as f:
            f.seek(a)
            f.write(bytes(ln))
        info.update(offset=a, nbytes=ln)
    elif kind == "missing_shard":
        os.unlink(seg)
    elif kind.startswith("manifest_"):
        data = open(man, "rb").read()
        how = kind[len("manifest_") :]
        if how == "flip":
            pos = rng.randrange(len(data))
            data = data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1 :]
            info.update(offset=pos)
        elif how == "truncate":
            data = data[: rng.randrange(len(data))]
        elif how == "garbage":
            data = os.urandom(len(data))
        elif how == "empty":
            data = b""
        elif how == "foreign":
            data = json.dumps({"format": "something-else", "version": 1}).encode()
        open(man, "wb").write(data)
    elif kind == "foreign_file":
        open(os.path.join(root, "notes.txt"), "w").write("not a checkpoint")
        d = os.path.join(root, "step-000000099")
        os.makedirs(d)
        open(os.path.join(d, "manifest.json"), "wb").write(os.urandom(200))
        os.makedirs(os.path.join(root, "step-000000050"))  # a step directory without a manifest
        open(os.path.join(root, "step-000000077"), "w").write("a file named like a step")
    else:
        raise ValueError(kind)
    return info


KINDS = (
    "bit_flip", "truncate", "zero_range", "missing_shard", "manifest_flip", "manifest_truncate",
    "manifest_garbage", "manifest_empty", "manifest_foreign", "foreign_file", "padding_flip",
)
RANDOM_KINDS = {"bit_flip", "truncate", "zero_range", "manifest_flip", "manifest_truncate", "padding_flip"}


def _trials(base: str, trials: int, rng: random.Random) -> list[dict[str, Any]]:
    pristine = os.path.join(base, "pristine")
    saved = _make(pristine)
    out = []
    for kind in KINDS:
        for i in range(trials if kind in RANDOM_KINDS else 1):
            root = os.path.join(base, f"{kind}-{i}")
            shutil.copytree(pristine, root)
            info = _damage(kind, root, rng)
            if info.get("skip"):
                shutil.rmtree(root)
                continue
            t = time.perf_counter()
            step, got, skipped, err = _restore(root)
            dt = time.perf_counter() - t
            harmless = kind in ("padding_flip", "foreign_file")  # the newest step is intact
            want = 2 if harmless else 1
            exact = step == want and all(torch.equal(got[k], saved[want][k]) for k in saved[want])
            if harmless:
                detected = exact and not any("step-000000002" in s for s in skipped)
            else:
                detected = any("step-000000002" in s for s in skipped) and step != 2
            out.append({
                "kind": kind, "info": info, "restored": step, "error": err, "detected": detected,
                "fell_back": exact, "restore_s": dt, "warning": skipped[0][:300] if skipped else None,
            })
            shutil.rmtree(root, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- verify throughput
def _plain_read(files: list[str], buf: bytearray) -> int:
    n = 0
    mv = memoryview(buf)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                k = f.readinto(mv[: len(buf)])
                if not k:
                    break
                n += k
    return n


def _verify(ckpt: Checkpointer, step: int, scratch: torch.Tensor) -> int:
    """Read every stored byte of ``step`` through the engine, each piece checked against its CRC."""
    m = ckpt.tier.manifest(step)
    recs: list[Any] = list(m.blobs)
    for t in m.tensors.values():
        recs += [s for s in t.shards if s.nbytes]
    for rec in recs:  # one piece at a time into the same scratch (bounded memory)
        ckpt.tier.read(step, [(rec, scratch[: rec.nbytes])])
    return sum(r.nbytes for r in recs)


def _throughput(base: str, size_mib: int, reps: int) -> dict[str, Any]:
    from ._workers import width_for

    root = os.path.join(base, "big")
    model, opt = small_model(width_for(size_mib << 20), layers=3)
    for p in model.parameters():  # materialise AdamW's moments without a full step
        p.grad = torch.zeros_like(p)
    opt.step()
    state = {"model": model, "optimizer": opt}
    with Checkpointer(root) as ckpt:
        ckpt.save(1, state)
        m = ckpt.manifest(1)
        files = [os.path.join(ckpt.tier.step_path(1), f) for f in m.files]
        nbytes = sum(os.path.getsize(f) for f in files)
        largest = max([s.nbytes for t in m.tensors.values() for s in t.shards] + [b.nbytes for b in m.blobs])
        scratch = torch.empty(largest, dtype=torch.uint8)
        buf = bytearray(8 << 20)
        res: dict[str, Any] = {"bytes": nbytes, "warm": {}, "cold": {}}
        methods = {
            "plain_read": lambda: _plain_read(files, buf),
            "verify_crc32c": lambda: _verify(ckpt, 1, scratch),
            "restore": lambda: ckpt.restore(state, step=1),
        }
        for name, fn in methods.items():
            res["warm"][name] = min(timed(fn, reps))  # one untimed call first warms the page cache
        cold_ok = True
        for name, fn in methods.items():
            if not drop_caches():
                cold_ok = False
                break
            t = time.perf_counter()
            fn()
            res["cold"][name] = time.perf_counter() - t
        res["cold_measured"] = cold_ok
        from recoverkit._native import engine

        buf_t = torch.empty(min(nbytes, 256 << 20), dtype=torch.uint8).random_()
        t = time.perf_counter()
        engine.crc32c_ptr(int(buf_t.data_ptr()), buf_t.numel()) if hasattr(engine, "crc32c_ptr") else None
        res["crc_only_gb_s"] = buf_t.numel() / (time.perf_counter() - t) / 1e9 if hasattr(engine, "crc32c_ptr") else None
    res["gb_per_s"] = {w: {k: nbytes / v / 1e9 for k, v in res[w].items()} for w in ("warm", "cold")}
    return res


def run(smoke: bool = False, size_mib: int | None = None, trials: int | None = None, seed: int = 0,
        workdir: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    size_mib = size_mib or (16 if smoke else 512)
    trials = trials or (2 if smoke else 20)
    rng = random.Random(seed)
    base = tempfile.mkdtemp(prefix="rk-bench-corruption-", dir=workdir)
    try:
        detail = _trials(base, trials, rng)
        tp = _throughput(base, size_mib, 1 if smoke else 3)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    kinds: dict[str, dict[str, int]] = {}
    for t in detail:
        k = kinds.setdefault(t["kind"], {"trials": 0, "detected": 0, "fell_back": 0})
        k["trials"] += 1
        k["detected"] += int(t["detected"])
        k["fell_back"] += int(t["fell_back"])
    n = len(detail)
    return {
        "scenario": "corruption",
        "smoke": smoke,
        "seed": seed,
        "trials": n,
        "detected": sum(t["detected"] for t in detail),
        "detection_rate": sum(t["detected"] for t in detail) / n,
        "fallback_rate": sum(t["fell_back"] for t in detail) / n,
        "by_kind": kinds,
        "throughput": tp,
        "runtime_s": time.perf_counter() - t0,
        "detail": detail,
    }


def table(r: dict[str, Any]) -> str:
    tp = r["throughput"]
    lines = [
        f"{r['trials']} damaged checkpoints" + (" [smoke]" if r["smoke"] else "") + f"; runtime {r['runtime_s']:.0f} s",
        "",
        "| damage | trials | detected | restore fell back to step 1 (bit-exact) |",
        "|---|---:|---:|---:|",
    ]
    for k, v in r["by_kind"].items():
        note = " (padding: step 2 intact, must restore step 2)" if k == "padding_flip" else (
            " (ignored: step 2 restored)" if k == "foreign_file" else "")
        lines.append(f"| {k}{note} | {v['trials']} | {v['detected']} | {v['fell_back']} |")
    lines += [
        "",
        f"- detection rate {100 * r['detection_rate']:.1f} % (required 100 %), fallback {100 * r['fallback_rate']:.1f} %",
        "",
        f"| full read of a {fmt_bytes(tp['bytes'])} step | warm s | warm GB/s | cold s | cold GB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in tp["warm"].items():
        c = tp["cold"].get(k)
        cs = f"{c:.3f} | {tp['bytes'] / c / 1e9:.2f}" if c else "n/a | n/a"
        lines.append(f"| {k} | {v:.3f} | {tp['bytes'] / v / 1e9:.2f} | {cs} |")
    lines.append("")
    lines.append("- verify_crc32c: every piece read by the engine and checked against the manifest's CRC-32C; "
                 "restore: the same plus decode and copy into live tensors; plain_read: read() into one 8 MiB buffer"
                 + ("" if tp["cold_measured"] else "; page cache could not be dropped here (cold n/a)"))
    if tp.get("crc_only_gb_s"):
        lines.append(f"- CRC-32C alone over memory: {tp['crc_only_gb_s']:.2f} GB/s")
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        kinds = list(r["by_kind"])
        ax1.barh(kinds, [100 * r["by_kind"][k]["detected"] / r["by_kind"][k]["trials"] for k in kinds])
        ax1.set_xlabel("detected %")
        ax1.set_xlim(0, 105)
        g = r["throughput"]["gb_per_s"]
        names = list(g["warm"])
        xs = range(len(names))
        ax2.bar([x - 0.2 for x in xs], [g["warm"][n] for n in names], 0.4, label="warm cache")
        if g["cold"]:
            ax2.bar([x + 0.2 for x in xs], [g["cold"].get(n, 0) for n in names], 0.4, label="cold cache")
        ax2.set_xticks(list(xs), names)
        ax2.set_ylabel("GB/s")
        ax2.legend()

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--size-mib", type=int, default=None, help="checkpoint for the verify throughput (default 512)")
    ap.add_argument("--trials", type=int, default=None, help="trials per random damage kind (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    r = run(a.smoke, a.size_mib, a.trials, a.seed, a.workdir)
    text = table(r)
    print(text)
    publish("corruption", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
