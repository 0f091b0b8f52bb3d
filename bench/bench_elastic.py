"""A node lost at step k: convergence deviation, MTTR split and throughput, per recovery path.

Every mode trains the same float64 MLP with dropout on the same fixed synthetic data with a
:class:`~recoverkit.state.global_batch.GlobalBatchSampler`, as 4 torchrun agents of one rank
each on localhost (``RECOVERKIT_NODE`` a..d, a c10d rendezvous, no restarts;
``python -m bench._elastic_worker``). Launch rank 2 (never rank 0, whose worker hosts the
job's store) stops inside step ``kill_step``; the harness SIGKILLs its node (agent and worker).
Modes (rows):

* **failure-free**: the reference, 4 ranks all the way;
* **ordered** / **global**: :class:`~recoverkit.elastic.ElasticTrainer` keeps the global
  batch: the survivors re-form a world of 3, take the lost rank's micro-batches and redo the
  step (per-micro-batch gradients summed in index order / one SUM all-reduce);
* **shrink**: TorchFT's behaviour: the lost rank's share of the step is dropped, the mean over
  the live ranks;
* **checkpoint-restart**: launch rank 0 saves model, optimizer and trainer position with a
  :class:`~recoverkit.Checkpointer` (blocking, local disk) every ``ckpt_every`` steps; at the
  failure the whole job is torn down (SIGKILL of all 4 nodes, which is what a static torchrun
  job does on a lost node, less its detection) and resubmitted as 3 agents: every rank restores
  the newest checkpoint and trains on, redoing the steps after it. It runs at world 3, not at
  world 4 under torchrun's restart, because the node is gone: a world of 4 needs a replacement
  node, which is not the case measured here. bench_mttr measures the restart at the same
  world (torchrun restart, restore from memory or disk); its last published figures are shown
  beside these, and torchft's recovery from the same file when it was run there.

Figures:

* **convergence deviation**: per step ``|loss - reference loss|`` (mean and max over the run)
  and the final parameters' relative distance ``||p - p_ref|| / ||p_ref||``; target 0 within
  fp tolerance for the modes that keep the global batch;
* **MTTR split** (in-process modes, from the trainer's ``Recovery`` records): detection (the
  SIGKILL -> the survivor's error; the slowest survivor), group re-forming, reconcile, redo of
  the step; and "kill -> failed step done" (the SIGKILL -> the step that failed is complete on
  every survivor), which is also measured for checkpoint-restart (relaunch + rendezvous + gloo,
  restore, the lost steps redone, the failed step);
* **throughput after the shrink**: steps/s and samples/s before and after the failure (median
  step time, the first step and the two around the failure left out) against the ideal
  (N-1)/N of the failure-free samples/s: the same mode's rate at world 4 before the failure
  (the reference job trains in ordered mode, whose step costs more than global's), and the
  reference job's rate over the same steps.

Timings on a shared 2-core machine are noisy (4 ranks share 2 cores, so the world of 3 does
not get less hardware than the world of 4 had): the correctness figures are the point of
``--smoke``.

Run: ``python -m bench.bench_elastic [--smoke] [--modes failure-free,ordered,...] [--out-dir DIR]
[--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from ._common import free_port
from .machine import median
from .report import RESULTS_DIR, publish

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES = "abcd"
VICTIM = 2
MODES = ("failure-free", "ordered", "global", "shrink", "checkpoint-restart")
KEPT = ("ordered", "global", "checkpoint-restart")
#: sizes and schedule: smoke (seconds on 2 loaded cores) and full
SIZES = {
    True: {"num_samples": 96, "features": 6, "hidden": 16, "global_batch": 24, "micro_batch": 2, "steps": 6,
           "kill_step": 3, "ckpt_every": 2},
    False: {"num_samples": 8192, "features": 32, "hidden": 256, "global_batch": 512, "micro_batch": 32,
            "steps": 40, "kill_step": 20, "ckpt_every": 8},
}
PG_TIMEOUT_S = 20.0
JOB_LIMIT_S = 300.0


def torchrun_env() -> dict[str, str]:
    """Every torchrun here: the agent's store not shared with the workers (see bench_mttr)."""
    return dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


# --------------------------------------------------------------------------- one job
class _Job:
    """One torchrun job: one agent per node, each in its own session (killed as a group)."""

    def __init__(self, base: str, out: str, nodes: str, cfg: dict[str, Any], tag: str) -> None:
        self.base, self.out, self.nodes, self.procs = base, out, nodes, []
        port = free_port()
        n = len(nodes)
        nnodes = f"--nnodes={n - 1}:{n}" if n > 3 else f"--nnodes={n}"
        for node in nodes:
            cmd = _torchrun() + [nnodes, "--nproc-per-node=1", "--rdzv-backend=c10d",
                                 f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=elastic-{tag}",
                                 "--max-restarts=0", "--monitor-interval=0.1",
                                 "-m", "bench._elastic_worker", json.dumps(cfg)]
            env = dict(torchrun_env(), RECOVERKIT_NODE=node, RECOVERKIT_SHM_DIR=os.path.join(base, "shm"))
            with open(os.path.join(base, f"agent-{tag}-{node}.log"), "w") as log:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True))
            if node == nodes[0]:
                time.sleep(1.0)  # its agent binds the rendezvous port first
        self.tag = tag

    def logs(self) -> str:
        parts = []
        for node in self.nodes:
            path = os.path.join(self.base, f"agent-{self.tag}-{node}.log")
            with open(path, errors="replace") as f:
                parts.append(f"--- agent {node}:\n" + f.read()[-2500:])
        return "\n".join(parts)

    def wait_files(self, names: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(os.path.exists(os.path.join(self.out, n)) for n in names):
            if time.monotonic() > deadline:
                missing = [n for n in names if not os.path.exists(os.path.join(self.out, n))]
                raise RuntimeError(f"job {self.tag}: missing {missing} after {timeout_s:.0f} s\n{self.logs()}")
            if all(p.poll() is not None for p in self.procs):
                time.sleep(0.5)  # the last files are written just before the exit
                if not all(os.path.exists(os.path.join(self.out, n)) for n in names):
                    raise RuntimeError(f"job {self.tag}: every agent ended without {names}\n{self.logs()}")
            time.sleep(0.05)

    def pids(self, phase: str) -> dict[int, tuple[str, int]]:
        """launch rank -> (node, worker pid), from the workers' pid files (validated)."""
        found: dict[int, tuple[str, int]] = {}
        prefix = f"pid-{phase}-"
        for name in os.listdir(self.out):
            if not name.startswith(prefix) or name.endswith(".tmp"):
                continue
            node, _, rank = name[len(prefix):].partition("-")
            with open(os.path.join(self.out, name)) as f:
                pid = json.load(f)
            if node not in self.nodes or not rank.isdigit() or type(pid) is not int or pid <= 1:
                raise RuntimeError(f"job {self.tag}: malformed pid file {name!r}: {str(pid)[:40]}")
            found[int(rank)] = (node, pid)
        return found

    def kill_nodes(self, nodes: str, pids: list[int]) -> float:
        """SIGKILL the agents of ``nodes`` (their process groups) and the workers ``pids``; the time."""
        t = time.time()
        for node in nodes:
            try:
                os.killpg(self.procs[self.nodes.index(node)].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return t

    def end(self, phase: str, grace_s: float = 3.0) -> None:
        """Every agent ended: given ``grace_s`` (the results are in by now), then SIGKILLed.
        After a node loss the surviving agents wait in torchrun's exit barrier for the lost
        one (minutes): the workers have written their results and are ending by then."""
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)
        self.kill_nodes("", [pid for _, pid in self.pids(phase).values()])


def _write_killed(out: str, t: float) -> None:
    with open(os.path.join(out, "killed.tmp"), "w") as f:
        f.write(repr(t))
    os.replace(os.path.join(out, "killed.tmp"), os.path.join(out, "killed"))


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _steps(out: str, phase: str, rank: int) -> list[dict[str, Any]]:
    path = os.path.join(out, f"steps-{phase}-{rank}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def config(sizes: dict[str, Any], out: str, mode: str, victim: int, phase: str = "train",
           ckpt_every: int = 0) -> dict[str, Any]:
    """The worker's configuration (one JSON argument)."""
    return {**sizes, "out": out, "mode": mode, "victim": victim, "phase": phase, "ckpt_every": ckpt_every,
            "seed": 11, "pg_timeout_s": PG_TIMEOUT_S}


def _run_mode(base: str, mode: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """One job of ``mode``; the per-rank results and step logs, the kill time."""
    d = os.path.join(base, mode)
    out = os.path.join(d, "out")
    os.makedirs(out)
    free = mode == "failure-free"
    restart = mode == "checkpoint-restart"
    trainer_mode = "ordered" if free or restart else mode
    victim = -1 if free else VICTIM
    cfg = config(sizes, out, trainer_mode, victim, "train", sizes["ckpt_every"] if restart else 0)
    t0 = time.time()
    job = _Job(d, out, NODES, cfg, "train")
    killed: float | None = None
    resumed: dict[int, dict[str, Any]] = {}
    try:
        if free:
            job.wait_files([f"result-train-{r}.json" for r in range(4)], JOB_LIMIT_S)
            survivors = list(range(4))
        else:
            job.wait_files(["paused"], JOB_LIMIT_S)
            deadline = time.monotonic() + 30
            while len(job.pids("train")) < len(NODES) and time.monotonic() < deadline:
                time.sleep(0.05)
            pids = job.pids("train")
            if restart:  # the whole job is torn down; resubmitted at world 3
                killed = job.kill_nodes(NODES, [pid for _, pid in pids.values()])
            else:
                node, pid = pids[VICTIM]
                killed = job.kill_nodes(node, [pid])
            _write_killed(out, killed)
            survivors = [r for r in range(4) if r != VICTIM]
            if not restart:
                job.wait_files([f"result-train-{r}.json" for r in survivors], PG_TIMEOUT_S + 120)
    finally:
        job.end("train")
    results = {} if restart else {r: _read_json(os.path.join(out, f"result-train-{r}.json")) for r in survivors}
    logs = {r: _steps(out, "train", r) for r in range(4)}
    if restart:
        cfg_b = config(sizes, out, "ordered", -1, "resume")
        launched = time.time()
        job_b = _Job(d, out, "abd", cfg_b, "resume")
        try:
            job_b.wait_files([f"result-resume-{r}.json" for r in range(3)], JOB_LIMIT_S)
        finally:
            job_b.end("resume")
        resumed = {r: _read_json(os.path.join(out, f"result-resume-{r}.json")) for r in range(3)}
        results = resumed
        logs_b = {r: _steps(out, "resume", r) for r in range(3)}
        return {"mode": mode, "t0": t0, "killed": killed, "launched": launched, "results": results,
                "logs_a": logs, "logs": logs_b}
    return {"mode": mode, "t0": t0, "killed": killed, "results": results, "logs": logs}


# --------------------------------------------------------------------------- figures
def _params(hexes: dict[str, str]) -> Any:
    import numpy as np

    return np.concatenate([np.frombuffer(bytes.fromhex(hexes[k]), dtype=np.float64) for k in sorted(hexes)])


def _curve(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Rank 0's steps in order (checkpoint-restart: the first job's up to the checkpoint, then
    the resumed job's), each with the samples trained by all ranks at that step."""
    if run["mode"] == "checkpoint-restart":
        start = min(int(res["resumed_from"]) for res in run["results"].values())
        first = [s for s in run["logs_a"][0] if s["step"] < start]
        rows = first + list(run["logs"][0])
        n_a = {s["step"]: sum(x["n"] for r in run["logs_a"] for x in run["logs_a"][r] if x["step"] == s["step"])
               for s in first}
        n_b = {s["step"]: sum(x["n"] for r in run["logs"] for x in run["logs"][r] if x["step"] == s["step"])
               for s in run["logs"][0]}
        n = {**n_a, **n_b}
    else:
        rows = list(run["logs"][0])
        n = {s["step"]: sum(x["n"] for r in run["logs"] for x in run["logs"][r] if x["step"] == s["step"])
             for s in rows}
    return [{**s, "loss": float.fromhex(s["loss"]), "samples": n[s["step"]]} for s in rows]


def _deviation(curve: list[dict[str, Any]], ref: list[dict[str, Any]], params: dict[str, str],
               ref_params: dict[str, str]) -> dict[str, Any]:
    import numpy as np

    if [s["step"] for s in curve] != [s["step"] for s in ref]:
        raise RuntimeError(f"steps differ from the reference: {[s['step'] for s in curve]}")
    d = [abs(a["loss"] - b["loss"]) for a, b in zip(curve, ref)]
    p, q = _params(params), _params(ref_params)
    return {"loss_abs_mean": sum(d) / len(d), "loss_abs_max": max(d),
            "loss_rel_max": max(x / abs(b["loss"]) for x, b in zip(d, ref) if b["loss"]),
            "final_param_rel": float(np.linalg.norm(p - q) / np.linalg.norm(q)),
            "bit_identical": params == ref_params and all(x == 0.0 for x in d)}


def _rate(curve: list[dict[str, Any]], lo: int, hi: int) -> dict[str, float] | None:
    rows = [s for s in curve if lo <= s["step"] < hi]
    if not rows:
        return None
    sec = median([s["seconds"] for s in rows])
    samples = median([s["samples"] for s in rows])
    return {"steps": len(rows), "step_s": sec, "steps_per_s": 1.0 / sec, "samples_per_step": samples,
            "samples_per_s": samples / sec}


def _mttr(run: dict[str, Any], kill_step: int) -> dict[str, Any]:
    killed = run["killed"]
    if run["mode"] == "checkpoint-restart":
        res = run["results"]
        done = max(s["ended"] for r in run["logs"] for s in run["logs"][r] if s["step"] == kill_step)
        resumed_from = min(int(x["resumed_from"]) for x in res.values())
        restored = max(x["restored"] for x in res.values())
        redo_end = max((s["ended"] for r in run["logs"] for s in run["logs"][r] if s["step"] == kill_step - 1),
                       default=restored)
        return {
            "detection": None,
            "relaunch": max(x["grouped"] for x in res.values()) - killed,
            "restore": max(x["restore_s"] for x in res.values()),
            "steps_lost": kill_step - resumed_from,
            "redo_lost_steps": redo_end - restored,
            "failed_step": done - redo_end,
            "kill_to_failed_step_done": done - killed,
        }
    recs = [(r, res["recoveries"][0]) for r, res in run["results"].items() if res.get("recoveries")]
    if len(recs) != len(run["results"]):
        raise RuntimeError(f"{run['mode']}: a survivor has no recovery record: {run['results']}")
    detect = {r: rec["detected_at"] - killed for r, rec in recs}
    done = max(s["ended"] for r in run["results"] for s in run["logs"][r] if s["step"] == kill_step)
    return {
        "detection": max(detect.values()),
        "detection_min": min(detect.values()),
        "regroup": max(rec["regroup_s"] for _, rec in recs),
        "regroup_phases": max((rec["regroup_phases_s"] for _, rec in recs), key=lambda p: sum(p.values())),
        "reconcile": max(rec["reconcile_s"] for _, rec in recs),
        "redo": max(rec["redo_s"] or 0.0 for _, rec in recs),
        "steps_lost": 0,
        "kill_to_failed_step_done": done - killed,
        "detected_by": sorted({rec["detected_by"][:80] for _, rec in recs}),
    }


def _published_restart(results_dir: str) -> dict[str, Any]:
    """bench_mttr's rows in ``results_dir`` (the restart path at the same world), validated; {} if none."""
    path = os.path.join(results_dir, "mttr.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    summary = doc.get("summary") if isinstance(doc, dict) else None
    if not isinstance(summary, dict):
        return {}
    rows = {}
    for case in ("shm", "replica", "local-2node", "torchft"):
        s = summary.get(case)
        keys = ("detection", "relaunch", "import", "transfer", "first_step", "mttr", "steps_lost")
        if isinstance(s, dict) and all(isinstance(s.get(k), (int, float)) and math.isfinite(s[k]) for k in keys):
            rows[case] = {k: float(s[k]) for k in keys}
    return {"smoke": bool(doc.get("smoke")), "rows": rows} if rows else {}


def run(smoke: bool = False, modes: tuple[str, ...] = MODES, workdir: str | None = None,
        results_dirs: tuple[str, ...] = (RESULTS_DIR,)) -> dict[str, Any]:
    t_start = time.perf_counter()
    sizes = dict(SIZES[smoke])
    if "failure-free" not in modes:
        raise ValueError("the failure-free reference is needed by every other mode")
    base = tempfile.mkdtemp(prefix="rk-bench-elastic-", dir=workdir)
    runs: dict[str, dict[str, Any]] = {}
    not_run: dict[str, str] = {}
    try:
        for mode in modes:
            try:
                runs[mode] = _run_mode(base, mode, sizes)
            except Exception as e:  # noqa: BLE001 - one mode failing leaves the others' rows
                if mode == "failure-free":
                    raise
                text = str(e)
                not_run[mode] = f"failed: {text if len(text) < 1800 else text[:300] + ' ... ' + text[-1500:]}"
                print(f"[elastic] {mode} failed:\n{e}", file=sys.stderr, flush=True)
        shm_left = sum(len(fs) for _, _, fs in os.walk(os.path.join(base, "shm")))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    k, steps = sizes["kill_step"], sizes["steps"]
    ref_curve = _curve(runs["failure-free"])
    ref_params = runs["failure-free"]["results"][0]["params"]
    ref_before, ref_after = _rate(ref_curve, 1, k), _rate(ref_curve, k + 2, steps)
    summary: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for mode, rn in runs.items():
        curve = _curve(rn)
        t_first = curve[0]["ended"] - curve[0]["seconds"]  # the first step's start (after the start-up)
        curves[mode] = [{"step": s["step"], "loss": s["loss"], "t": s["ended"] - t_first} for s in curve]
        finals = [res["params"] for res in rn["results"].values()]
        replicas_agree = all(p == finals[0] for p in finals)
        row: dict[str, Any] = {"deviation": _deviation(curve, ref_curve, finals[0], ref_params),
                               "replicas_agree": replicas_agree,
                               "worlds": sorted({s["world"] for s in curve})}
        before, after = _rate(curve, 1, k), _rate(curve, k + 2, steps)
        row["before"], row["after"] = before, after
        if mode != "failure-free":
            row["mttr"] = _mttr(rn, k)
            if rn.get("killed"):
                curves[mode + ":killed"] = [{"t": rn["killed"] - t_first}]
            if after and before:
                # the same mode's world-4 rate before the failure is its failure-free throughput (the
                # reference job trains in ordered mode, whose step costs more than global's)
                row["after_vs_before_samples"] = after["samples_per_s"] / before["samples_per_s"]
                row["after_vs_ideal"] = row["after_vs_before_samples"] / (3 / 4)
            if after and ref_after:
                row["after_vs_reference_after_samples"] = after["samples_per_s"] / ref_after["samples_per_s"]
        summary[mode] = row
    return {
        "scenario": "elastic", "smoke": smoke, "sizes": sizes, "modes": list(modes), "world": 4, "victim": VICTIM,
        "summary": summary, "reference_rates": {"before": ref_before, "after": ref_after},
        "curves": curves, "restart_published": next((p for p in map(_published_restart, results_dirs) if p), {}),
        "not_run": not_run,
        "shm_files_left": shm_left, "runtime_s": time.perf_counter() - t_start,
    }


def _f(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def table(r: dict[str, Any]) -> str:
    z = r["sizes"]
    lines = [
        f"float64 MLP ({z['features']}-{z['hidden']}-{z['hidden']}-1, dropout 0.3), {z['num_samples']} samples, "
        f"global batch {z['global_batch']} in micro-batches of {z['micro_batch']}, Adam; 4 torchrun agents x 1 rank "
        f"(gloo, localhost); node of launch rank {r['victim']} SIGKILLed in step {z['kill_step']} of {z['steps']}; "
        f"checkpoint-restart saves every {z['ckpt_every']} steps" + (" [smoke]" if r["smoke"] else "")
        + f"; runtime {r['runtime_s']:.0f} s",
        "",
        "**Convergence deviation** from the failure-free run",
        "",
        "| mode | worlds | mean abs loss dev | max abs loss dev | max rel loss dev | final params rel dist | bit-identical |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for mode in MODES:
        s = r["summary"].get(mode)
        if s is None:
            if mode in r["not_run"]:
                lines.append(f"| {mode} | not run: {r['not_run'][mode].splitlines()[0][:160]} ||||||")
            continue
        d = s["deviation"]
        lines.append(f"| {mode} | {s['worlds']} | {d['loss_abs_mean']:.3e} | {d['loss_abs_max']:.3e} | "
                     f"{d['loss_rel_max']:.3e} | {d['final_param_rel']:.3e} | {'yes' if d['bit_identical'] else 'no'} |")
    lines += [
        "",
        "**MTTR split** (s; the SIGKILL -> ...; detection: the slowest survivor's error, its fastest in brackets)",
        "",
        "| mode | detection | re-forming / relaunch | reconcile / restore | redo | steps lost | kill -> failed step done |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES[1:]:
        s = r["summary"].get(mode)
        if s is None:
            continue
        m = s["mttr"]
        if mode == "checkpoint-restart":
            lines.append(f"| {mode} (job resubmitted at world 3) | not measured (torn down at the kill) | "
                         f"{_f(m['relaunch'])} | {_f(m['restore'])} | {_f(m['redo_lost_steps'])} + "
                         f"{_f(m['failed_step'])} | {m['steps_lost']} | {_f(m['kill_to_failed_step_done'])} |")
        else:
            lines.append(f"| {mode} (in process) | {_f(m['detection'])} ({_f(m['detection_min'])}) | "
                         f"{_f(m['regroup'])} | {_f(m['reconcile'], '.4f')} | {_f(m['redo'])} | 0 | "
                         f"{_f(m['kill_to_failed_step_done'])} |")
    pub = r.get("restart_published") or {}
    names = {"shm": "torchrun restart, own shared memory (1 process)", "replica": "torchrun restart, peer replica (2 nodes)",
             "local-2node": "torchrun restart, local disk (2 nodes)", "torchft": "torchft, from the healthy replica group"}
    if pub:
        lines += ["", f"From bench_mttr's figures (this output directory's when it ran first, else bench/results; {'smoke' if pub['smoke'] else 'full'} size, its own "
                  "model and state size; detection, relaunch, import, transfer, first step, MTTR, steps lost):", ""]
        for case, row in pub["rows"].items():
            lines.append(f"- {names[case]}: {row['detection']:.2f} / {row['relaunch']:.2f} / {row['import']:.2f} / "
                         f"{row['transfer']:.3f} / {row['first_step']:.3f} -> MTTR {row['mttr']:.2f} s, "
                         f"{row['steps_lost']:.0f} steps lost")
        if "torchft" not in pub["rows"]:
            lines.append("- torchft: not run (not in bench_mttr's published figures)")
    else:
        lines += ["", "- torchrun restart and torchft: not run (no bench_mttr figures published)"]
    lines += [
        "",
        "**Throughput** (median step time; before: steps 1..k-1 at world 4, the mode's failure-free rate; after: "
        "steps k+2..end at world 3; ideal after = (N-1)/N = 3/4 of before, in samples/s)",
        "",
        "| mode | steps/s before | steps/s after | samples/step after | samples/s after | after / before | "
        "after / ideal (N-1)/N | after / failure-free run, same steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        s = r["summary"].get(mode)
        if s is None:
            continue
        b, a = s["before"], s["after"]
        lines.append(f"| {mode} | {_f(b and b['steps_per_s'], '.2f')} | {_f(a and a['steps_per_s'], '.2f')} | "
                     f"{_f(a and a['samples_per_step'], '.0f')} | {_f(a and a['samples_per_s'], '.0f')} | "
                     f"{_f(s.get('after_vs_before_samples'), '.2f')} | {_f(s.get('after_vs_ideal'), '.2f')} | "
                     f"{_f(s.get('after_vs_reference_after_samples'), '.2f')} |")
    lines += [
        "",
        "- ordered: per-micro-batch gradients summed in global index order at any world size (bit-identical by "
        "construction); global: one SUM all-reduce (summation order changes with the world: within fp rounding); "
        "shrink drops the lost rank's share of every step after the failure (another run); checkpoint-restart "
        "resumes in ordered mode, so it converges identically but redoes the steps since the checkpoint.",
        "- 4 ranks share the machine's cores: when they are fewer than the ranks, a world of 3 gets the same "
        "hardware as the world of 4, and after / ideal can exceed 1.",
    ]
    if r["shm_files_left"]:
        lines.append(f"- files left in the run's shared-memory directory: {r['shm_files_left']}")
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        k = r["sizes"]["kill_step"]
        styles = {"failure-free": "-", "ordered": "--", "global": ":", "shrink": "-", "checkpoint-restart": "-."}
        for i, mode in enumerate(MODES):
            c = r["curves"].get(mode)
            if not c:
                continue
            ax1.plot([p["step"] for p in c], [p["loss"] for p in c], styles[mode], color=f"C{i}", label=mode)
            ax2.plot([p["t"] for p in c], [p["loss"] for p in c], styles[mode], color=f"C{i}", label=mode)
            killed = r["curves"].get(mode + ":killed")
            if killed:
                ax2.axvline(killed[0]["t"], color=f"C{i}", alpha=0.4, lw=1)
        ax1.axvline(k, color="red", alpha=0.5, lw=1, label="node lost")
        ax1.set_xlabel("step")
        ax1.set_ylabel("loss")
        ax2.set_xlabel("seconds from the first step (vertical lines: SIGKILL)")
        ax1.legend(fontsize=7)
        ax1.set_title("loss vs step", fontsize=9)
        ax2.set_title("loss vs wall clock", fontsize=9)

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {','.join(MODES)}")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    if "failure-free" not in modes:
        ap.error("--modes must include failure-free (the reference)")
    # bench_mttr's figures from this run's output (run_all runs it first), else the published ones
    r = run(a.smoke, modes, a.workdir, tuple(d for d in (a.out_dir, RESULTS_DIR) if d))
    text = table(r)
    print(text)
    publish("elastic", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
