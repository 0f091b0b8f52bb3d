"""Runs every benchmark scenario in order, each in its own process, then rebuilds bench/README.md.

    python -m bench.run_all                  # full run: results in bench/results, README rebuilt
    python -m bench.run_all --smoke          # tiny sizes into a temporary directory (< a few min)
    python -m bench.run_all --only engine,overhead
    python -m bench.run_all --readme-only    # README from what bench/results holds now

Every scenario is ``bench/bench_<name>.py`` with ``main(argv)``, ``--smoke`` and ``--out-dir``;
each runs as ``python -m bench.bench_<name>`` in a subprocess (gloo's threads can abort an
interpreter at exit, and one scenario's memory never inflates the next one's figures). A
scenario whose module does not exist yet is skipped with a line saying so; one that fails is
reported and the others still run (the exit status is 1 if any failed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import posixpath
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

from .report import RESULTS_DIR, machine_line

SCENARIOS = [
    "engine",
    "limits",
    "save",
    "lazy",
    "zarr",
    "overhead",
    "mttr",
    "effective",
    "torture",
    "corruption",
    "storage_faults",
    "rank_failure",
    "small_tensors",
    "restore_memory",
    "elastic",
    "checkfree",
]
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
README = os.path.join(BENCH_DIR, "README.md")

INTRO = """# recoverkit benchmarks

Every figure below was measured by a script in this directory, next to the baselines it is
compared with in the same run: `torch.save`, `torch.distributed.checkpoint` (`save` and
`async_save`), torchft (live recovery and per-step cost in `mttr` and `overhead`; the optional
extra `pip install -e '.[bench]'`, without it those rows say "not run") and the hardware's own
limits (plain memcpy, plain write+fsync, plain read, gloo point-to-point).
Each scenario writes `results/<name>.json` (every raw number and the machine), `<name>.md`
(the table below) and `<name>.png`. No figure here is asserted by a test; the test suite only
runs each scenario in smoke mode so the scripts never rot.

How to run:

* `make bench` (or `python -m bench.run_all`): every scenario in order, then this README;
  `python -m bench.run_all --only engine,overhead` for some; `--smoke` for a quick check
  into a temporary directory; `--readme-only` to rebuild this page from `results/`.
* `python -m bench.bench_NAME [--smoke] [--out-dir DIR]` (or `recoverkit bench NAME`): one
  scenario; `--help` lists its sizes and step counts.
* `make bench-micro`: the pytest-benchmark micro-benchmarks in `micro/` (copy engine,
  CRC-32C, segment I/O, manifest, codec) compared with the saved baselines in `baselines/`.
* `python -m bench.bench_peer_restore [--tier host|shm] [--lose-node] [--size-mib N]`: a
  memory restore's peer transfer next to gloo point-to-point (one way and both ways) in the
  same two processes, with where each restore's time goes (`--json`); not part of the run
  above. `--lose-node`: one world saves to shared memory with a replica of each rank on the
  other simulated node and crashes, node 1's shared memory is deleted, and a new world
  restores, so rank 1 fetches its whole state one way (the node-loss case).
* `overhead` records which path each shared-memory save took (`staged_in_shm`,
  `staged_in_pool`, `shm_in_place`, `shm_copied` in its JSON); `--methods recoverkit_host`
  adds the host tier alone as the in-memory reference. `restore_memory`'s restarted-process
  row compares with a memcpy into new memory (the fair figure: a fresh optimizer's moments are
  new memory) and into pre-faulted memory.
* `elastic` (`python -m bench.bench_elastic [--smoke] [--modes ...]`): a node of a 4-agent
  torchrun job SIGKILLed at step k; the convergence deviation from the failure-free run, the
  MTTR split (detection, re-forming, reconcile, redo) and the throughput after the shrink vs
  (N-1)/N, for `ElasticTrainer` in modes ordered and global (global batch kept), shrink
  (TorchFT's behaviour: the batch shrinks) and checkpoint-restart (resubmitted at world 3 from
  the last Checkpointer save); `mttr`'s same-world restart and torchft rows beside it.
* `checkfree` (`python -m bench.bench_checkfree [--rates 5,10,16] [--modes ...]`): convergence
  in wall-clock time of an 8-stage LLaMa-style decoder trained on the Python standard library's
  own sources, simulated in one process under the same seeded stage failures (the paper's
  per-step probabilities): no failure, CheckFree, CheckFree+, and checkpoint-restart at its
  Young/Daly interval and every 50 steps (real saves and restores). The clock is charged from
  `checkfree_pipeline.json` (detection, spare, fetch: the real `torch.distributed.pipelining`
  job of the tests; checkpoint-restart's restart: torchrun restarting every worker of that
  job, measured there, the in-process restart shown beside it) and this run's own step, save
  and restore medians; `--retime` re-charges
  a published result, `--merge` adds rates, and `--name checkfree_extra --modes
  no-failure,uniform,copy,checkfree+-no-failure` writes the other modes beside it;
  `checkfree-fallback` is CheckFree as recoverkit's chain deploys it (interior stages rebuilt,
  an edge stage by checkpoint-restart from saves at the edges' own Young/Daly interval), and
  `--failure-seed N` draws another failure schedule (`checkfree_seed1` to `checkfree_seed4`:
  10 %/h, no-failure, checkfree, checkfree-fallback, checkpoint-restart); `--lr-scale X` sets a
  rebuilt stage's learning-rate factor (default the paper's 1.1; `checkfree_lr15` and
  `checkfree_lr15_seed1` to `_seed4`: 1.5, the same five schedules at 10 %/h);
  `--distill-steps N` fits a rebuilt interior stage in N steps to the lost stage's last-step
  input -> output pairs its neighbours hold, each step charged as one stage's forward and
  backward over the step's micro-batches (`checkfree_distill64` and `_seed1` to `_seed4`: 64,
  the same five schedules at 10 %/h; `checkfree_distill32*`: 32); `--stages N` trains a
  deeper pipeline of the same one-block stages (`checkfree_s12` and `_seed1` to `_seed4`: 12
  stages, the same five schedule seeds at 10 %/h, judged against `checkfree_s12_noise.json`;
  `checkfree_s12_distill64_seed1`, `_seed3`: with a 64-step fit). Mode
  `snapshot` is exact recovery from a per-step in-memory copy of each stage's model and AdamW
  (the real pipeline's replica mode), its loss curve checked bit for bit against no failure,
  charged the replica/plain step ratio and the replica recovery time from
  `checkfree_pipeline.json` (measured on that pipeline's small test model), with the per-step
  overhead at which it breaks even with checkpoint-restart; `--merge` adds modes as well as
  rates to a published result of the same run, e.g. `python -m bench.bench_checkfree --rates 10
  --modes no-failure,snapshot,random,checkpoint-restart --name checkfree_extra --merge`.

Scenarios, in order: {order}.
"""


def module_exists(name: str) -> bool:
    """True when ``bench/bench_<name>.py`` can be imported (it is not imported here)."""
    try:
        return importlib.util.find_spec(f"bench.bench_{name}") is not None
    except (ImportError, ValueError):
        return False


def run_one(name: str, out_dir: str, smoke: bool, timeout_s: float | None, extra: list[str] | None = None) -> dict[str, Any]:
    """Runs one scenario in a subprocess; returns its status, seconds and output tail."""
    if not module_exists(name):
        return {"name": name, "status": "missing", "seconds": 0.0, "detail": f"bench/bench_{name}.py does not exist"}
    cmd = [sys.executable, "-m", f"bench.bench_{name}", "--out-dir", out_dir] + (["--smoke"] if smoke else []) + (extra or [])
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"name": name, "status": "timeout", "seconds": time.perf_counter() - t, "detail": f"killed after {timeout_s:.0f} s\n{out[-2000:]}"}
    dt = time.perf_counter() - t
    ok = proc.returncode == 0 and os.path.exists(os.path.join(out_dir, f"{name}.md"))
    detail = (proc.stdout[-1500:] + "\n" + proc.stderr[-3000:]).strip()
    if proc.returncode == 0 and not ok:
        detail = f"exited 0 but wrote no {name}.md into {out_dir}\n{detail}"
    return {"name": name, "status": "ok" if ok else f"failed (exit {proc.returncode})", "seconds": dt, "detail": detail}


def _machine(results_dir: str, names: list[str]) -> dict[str, Any] | None:
    for name in names:
        p = os.path.join(results_dir, f"{name}.json")
        try:
            with open(p) as f:
                m = json.load(f).get("machine")
        except (OSError, ValueError):
            continue
        if m:
            return m
    return None


def build_readme(results_dir: str = RESULTS_DIR, readme_path: str = README, names: list[str] | None = None) -> str:
    """Assembles the README from ``<results_dir>/<name>.md`` in scenario order; returns its text.

    Image links in the tables (``name.png``) are rewritten relative to the README's folder.
    A scenario without results gets one line saying so.
    """
    names = list(names or SCENARIOS)
    rel = os.path.relpath(os.path.abspath(results_dir), os.path.dirname(os.path.abspath(readme_path)))
    parts = [INTRO.format(order=", ".join(f"`{n}`" for n in names)).rstrip(), ""]
    m = _machine(results_dir, names)
    parts += ["## Machine", ""]
    if m:
        parts += [
            machine_line(m),
            "",
            f"Python {m.get('python', '?')}, disk free {m.get('disk_free_gib', '?')} GiB, "
            f"hardware CRC-32C {m.get('hardware_crc32c', '?')}. Each table repeats the machine and "
            "the time it was measured.",
        ]
    else:
        parts.append("No results yet: run `make bench`.")
    parts += ["", "## Results", ""]
    for name in names:
        p = os.path.join(results_dir, f"{name}.md")
        if not os.path.exists(p):
            why = "script not written yet" if not module_exists(name) else "not run yet"
            parts += [f"### {name}", "", f"_No results ({why}): `python -m bench.bench_{name}`._", ""]
            continue
        with open(p) as f:
            md = f.read().rstrip()
        md = re.sub(r"\]\(([A-Za-z0-9_.-]+\.png)\)", lambda mt: f"]({posixpath.normpath(posixpath.join(rel, mt.group(1)))})", md)
        parts += [md, ""]
    text = "\n".join(parts).rstrip() + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(readme_path)), exist_ok=True)
    tmp = f"{readme_path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, readme_path)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="every scenario in smoke mode, into a temporary directory")
    ap.add_argument("--only", default=None, help="comma-separated scenario names, e.g. engine,overhead")
    ap.add_argument("--out-dir", default=None, help="default bench/results (smoke: a new temporary directory)")
    ap.add_argument("--readme", default=None, help="README to write (default bench/README.md; smoke: <out-dir>/README.md)")
    ap.add_argument("--readme-only", action="store_true", help="only rebuild the README from --out-dir")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per scenario (default 3600; smoke 300)")
    a = ap.parse_args(argv)

    names = SCENARIOS
    if a.only:
        want = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in want if n not in SCENARIOS]
        if unknown:
            ap.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
        names = [n for n in SCENARIOS if n in want]
    out_dir = a.out_dir or (tempfile.mkdtemp(prefix="rk-bench-smoke-") if a.smoke and not a.readme_only else RESULTS_DIR)
    readme = a.readme or (os.path.join(out_dir, "README.md") if a.smoke else README)

    if a.readme_only:
        build_readme(out_dir, readme)
        print(f"[run_all] wrote {readme} from {out_dir}")
        return 0

    os.makedirs(out_dir, exist_ok=True)
    timeout = a.timeout or (300.0 if a.smoke else 3600.0)
    print(f"[run_all] {len(names)} scenario(s) into {out_dir}" + (" [smoke]" if a.smoke else ""), flush=True)
    t0 = time.perf_counter()
    summary = []
    for name in names:
        print(f"[run_all] {name} ...", flush=True)
        r = run_one(name, out_dir, a.smoke, timeout)
        summary.append(r)
        if r["status"] == "missing":
            print(f"[run_all] {name}: SKIPPED, {r['detail']}", flush=True)
        elif r["status"] == "ok":
            print(f"[run_all] {name}: ok in {r['seconds']:.0f} s", flush=True)
        else:
            print(f"[run_all] {name}: {r['status'].upper()} after {r['seconds']:.0f} s\n{r['detail']}", flush=True)
    # the README always covers every scenario, whatever --only ran
    build_readme(out_dir, readme)
    total = time.perf_counter() - t0
    print(f"[run_all] wrote {readme}; total {total:.0f} s", flush=True)
    for r in summary:
        print(f"  {r['name']:<15} {r['status']:<18} {r['seconds']:7.0f} s")
    failed = [r for r in summary if r["status"] not in ("ok", "missing")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
