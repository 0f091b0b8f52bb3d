"""The convergence benchmark's report: the Markdown table, the plots, publishing.

Where it sits: the last stage of ``bench_checkfree``, after the summary
(:mod:`bench._checkfree_summary`). The flow: :func:`table` writes the model, the corpus, every
charged figure with its source and one table per failure rate (failures, recoveries, steps lost,
final loss, time to the target and its ratio to checkpoint-restart's); :func:`rate_plots` draws
one figure per rate (validation loss vs step and vs simulated wall clock); :func:`publish_result`
prints the table and writes ``<name>.json``, ``<name>.md`` and the PNGs through
:func:`bench.report.publish`.
"""

from __future__ import annotations

import os
from typing import Any

from recoverkit.recovery.checkfree import CheckFreeOptions

from ._checkfree_sim import CHECKFREE, CKPT, CKPT_FIXED, FALLBACK, MODES, PLUS, RESTARTS, SNAPSHOT
from ._checkfree_summary import GOAL_PCT
from .report import RESULTS_DIR, publish

__all__ = ["table", "rate_plots", "publish_result"]


def _f(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def table(r: dict[str, Any]) -> str:
    z, s, tm, ref = r["sizes"], r["sizes"]["spec"], r["timing"], r["reference"]
    c = r["corpus"]
    lines = [
        f"LLaMa-style decoder, {s['stages']} stages x {s['layers_per_stage']} block (d={s['dim']}, {s['heads']} heads, "
        f"SwiGLU {s['ffn']}, seq {s['seq_len']}, byte-level), {sum(r['params_per_stage'])} parameters; "
        f"{z['micro_batches']} micro-batches of {z['micro_batch']} per step, AdamW lr {z['lr']} "
        f"(warm-up {z['warmup']}, then constant), per-stage clipping at 1.0; a rebuilt stage's rate "
        f"{z.get('lr_scale', CheckFreeOptions().lr_scale)} x the base"
        + (f", then fitted in {z['distill_steps']} steps to the lost stage's last-step input -> output pairs "
           "(held by its neighbours)" if z.get("distill_steps") else "")
        + f"; {z['steps']} steps"
        + (" [smoke]" if r["smoke"] else "") + f"; runtime {r['runtime_s']:.0f} s",
        f"Corpus: the Python {c['python']} standard library's sources ({c['files_train']} files, "
        f"{c['train_bytes']} bytes; held out: every tenth file, {c['files_valid']} files, {c['valid_bytes']} bytes; "
        f"sha256 {c['sha256'][:12]}).",
        "",
        "**Wall-clock charged** (s)",
        "",
        "| figure | s | source |",
        "|---|---:|---|",
    ]
    for name in ("step_s", "save_s", "restore_s", "detection_s", "relaunch_s", "fetch_s"):
        lines.append(f"| {name} | {tm[name]:.4f} | {tm['sources'].get(name, '-')} |")
    if tm.get("job_relaunch_s") is not None:
        lines.append(f"| job_relaunch_s | {tm['job_relaunch_s']:.4f} | {tm['sources'].get('job_relaunch_s', '-')} |")
        lines.append(f"| restart (job_relaunch + restore): checkpoint-restart's | {tm['restart_s']:.3f} | |")
        if tm.get("rollback_ready_s") is not None:
            lines.append(f"| rollback_ready_s | {tm['rollback_ready_s']:.4f} | {tm['sources'].get('rollback_ready_s', '-')} |")
        lines.append(f"| in-process rollback ({'rollback_ready' if tm.get('rollback_ready_s') is not None else 'detection + relaunch'} "
                     f"+ restore): checkfree-fallback's edge stages; shown beside checkpoint-restart | "
                     f"{tm['inprocess_restart_s']:.3f} | the job's processes kept, a spare brought in, every stage "
                     "restored (StagePipeline with stage checkpoints) |")
    else:
        lines.append(f"| restart (detection + relaunch + restore) | {tm['restart_s']:.3f} | |")
    lines.append(f"| CheckFree recovery (detection + relaunch + fetch) | {tm['recover_s']:.3f} | |")
    if z.get("distill_steps"):
        lines.append(f"| distill_step_s: a rebuilt stage's fit, per fitting step ({z['distill_steps']} a rebuild) | "
                     f"{tm.get('distill_step_s', 0.0):.4f} | {tm['sources'].get('distill_step_s', '-')} |")
    if SNAPSHOT in r["modes"]:
        lines.append(f"| snapshot: replica overhead per step (fraction of step_s) | {tm['replica_overhead']:.4f} | "
                     f"{tm['sources'].get('replica_overhead', '-')} |")
        lines.append(f"| snapshot: exact recovery (detection + re-forming + replica loaded) | "
                     f"{tm['replica_recover_s']:.3f} | {tm['sources'].get('replica_recover_s', '-')} |")
    seeds = ref.get("seeds") or {}
    spread = (f"; over {seeds['seeds']} seeds (initialisation and data order) its final loss has a std of "
              f"{seeds['std']:.4f} ({seeds['source']})") if seeds.get("std") else ""
    lines += ["", f"Target validation loss {ref['target']:.4f}: the failure-free run's at step {ref['target_step']}; "
              f"its final {ref['final_val']:.4f} at step {z['steps']}; evaluation noise (std) {ref['noise']:.4f}"
              f"{spread}.", ""]
    for rate, pr in r["per_rate"].items():
        lines += [
            f"**{rate} %/h** (the paper's p = {pr['p_step']:g} per stage per step; {pr['per_stage_per_h_sim']:.1f} "
            f"failures per stage per simulated hour at this step time; {pr['failures_in_first_steps']} stage "
            f"failures in the first {z['steps']} iterations; checkpoint every {pr['ckpt_every_young_daly']} steps "
            f"(Young/Daly for the measured save time) and every {pr['ckpt_every_fixed']} (fixed))",
            "",
            "| method | failures (edge) | recoveries / restarts | steps lost | iterations | final val loss | "
            "vs no failure | time to target s | steps to target | time vs checkpoint-restart (Young/Daly) | "
            "time vs checkpoint-restart-fixed |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for mode in MODES:
            row = pr["summary"].get(mode)
            if row is None:
                continue
            vs = []
            for m in RESTARTS:
                if f"time_vs_{m}" in row:
                    pct = row[f"faster_than_{m}_pct"]
                    vs.append(f"{row[f'time_vs_{m}']:.3f} ({abs(pct):.1f} % {'faster' if pct >= 0 else 'slower'})")
                else:
                    vs.append("-")
            if mode == SNAPSHOT:
                mode = (f"{mode} (per-step replica, +{100 * tm['replica_overhead']:.0f} % per step; vs step "
                        f"{'bit-identical to' if row['bit_identical_to_ref'] else 'DIFFERS from'} no failure)")
            if mode == FALLBACK:
                how = "in-process rollback" if tm.get("job_relaunch_s") is not None else "checkpoint-restart"
                mode = f"{mode} (edges: {how} to saves every {row['ckpt_every']})"
            if mode in RESTARTS:
                mode = f"{mode} (every {row['ckpt_every']}; vs step {'bit-identical to' if row['bit_identical_to_ref'] else 'DIFFERS from'} no failure)"
            rec = f"{row['recoveries']} / {row['restarts']}"
            lines.append(f"| {mode} | {row['failures']} ({row['edge_failures']}) | {rec} | {row['lost_steps']} | "
                         f"{row['iterations']} | {_f(row['final_val'], '.4f')} | {_f(row['final_val_minus_ref'], '+.4f')} | "
                         f"{_f(row['time_to_target_s'], '.1f')} | {_f(row['steps_to_target'], '.0f')} | {vs[0]} | {vs[1]} |")
        lines.append("")
        for mode in (CHECKFREE, PLUS, FALLBACK):
            row = pr["summary"].get(mode)
            if row is None:
                continue
            margins = [f"{abs(x):.1f} % {'faster' if x >= 0 else 'slower'} than {m}"
                       for m in RESTARTS if (x := row.get(f"faster_than_{m}_pct")) is not None]
            inproc = [f"{abs(x):.1f} % {'faster' if x >= 0 else 'slower'} than {m}"
                      for m in RESTARTS if (x := row.get(f"faster_than_{m}_inprocess_pct")) is not None]
            if margins and inproc:
                margins.append(f"with an in-process rollback charged to {'both' if mode == FALLBACK else 'checkpoint-restart'} "
                               f"instead ({tm['inprocess_restart_s']:.2f} s): " + ", ".join(inproc))
            goal = row.get(f"goal_restart_s_{CKPT}")
            if goal is not None:
                margins.append(f"{GOAL_PCT:.0f} % sooner than {CKPT} whenever its restart takes "
                               + (f">= {goal:.2f} s" if goal > 0 else "any time"))
            reached = "; ".join(margins) if margins else "not reached"
            even = row.get(f"break_even_save_s_{CKPT_FIXED}")
            sig = row.get("final_val_seed_sigmas")
            lines.append(f"- {mode} at {rate} %/h: to the target: {reached} (the paper: > 12 % faster; the issue's goal: "
                         f">= 20 % at 10 %/h); final validation loss {_f(row['final_val_minus_ref'], '+.4f')} vs no "
                         f"failure (evaluation noise {ref['noise']:.4f}"
                         + ("" if sig is None else f"; {sig:+.1f} seed-to-seed stds") + ")"
                         + ("" if even is None else
                            f"; against a save every {pr['ckpt_every_fixed']} steps it is faster even with free saves"
                            if even <= 0 else
                            f"; against a save every {pr['ckpt_every_fixed']} steps it breaks even when a save takes "
                            f"{even:.2f} s ({row[f'break_even_save_steps_{CKPT_FIXED}']:.1f} steps; measured here "
                            f"{r['timing']['save_s']:.3f} s to local disk)"))
        row = pr["summary"].get(SNAPSHOT)
        if row is not None:
            parts = []
            for m in RESTARTS:
                x, even = row.get(f"faster_than_{m}_pct"), row.get(f"break_even_replica_overhead_{m}")
                if x is None:
                    continue
                parts.append(f"{abs(x):.1f} % {'faster' if x >= 0 else 'slower'} than {m}"
                             + ("" if even is None else
                                f" (it breaks even at a replica overhead of {100 * even:+.0f} % per step)"))
            lines.append(f"- snapshot at {rate} %/h: to the target: {'; '.join(parts) if parts else 'not reached'}; "
                         f"charged the real pipeline's replica overhead of {100 * tm['replica_overhead']:.0f} % per step "
                         "(measured on its small test model) and its exact recovery; final validation loss "
                         f"{_f(row['final_val_minus_ref'], '+.4f')} vs no failure")
            absolute = row.get(f"time_vs_{CKPT}_absolute_overhead")
            if absolute is not None and tm.get("replica_extra_s"):
                lines.append(f"  - charged instead the replica's extra {1e3 * tm['replica_extra_s']:.1f} ms per step as "
                             f"measured there (+{100 * tm['replica_extra_s'] / tm['step_s']:.0f} % of this step; not "
                             f"scaled to this model's larger stages): "
                             f"{row['time_to_target_s_absolute_overhead']:.1f} s to the target, {absolute:.3f} x "
                             f"{CKPT}'s ({100 * abs(1 - absolute):.1f} % {'faster' if absolute <= 1 else 'slower'})")
        lines.append("")
    lines += [
        "- checkfree: an edge stage lost is re-initialised at random (CheckFree's averaging needs two neighbours; "
        "the recoverkit strategy refuses an edge without CheckFree+). checkfree+: the swap schedule on odd "
        f"micro-batches, a lost edge copies its partner, (de)embedding replicated every {z['replicate_every']} steps.",
        "- checkpoint-restart saves every K steps (Young/Daly for the measured save time; -fixed: every "
        f"{z['ckpt_every']}; blocking, local disk) and rolls every stage back to the newest save"
        + ("; a failure is charged torchrun's restart of every worker as measured on the real pipeline, plus this "
           "model's restore (the in-process restart, shown beside it, keeps the job's processes and brings a spare "
           "in, as CheckFree's recovery does)" if tm.get("job_relaunch_s") is not None else "")
        + "; checkfree-fallback's edge stages roll back in process (recoverkit's StagePipeline with stage "
        "checkpoints: no process restarts; charged the in-process rollback) to saves every K steps (Young/Daly for "
        "the edges' failure rate alone); CheckFree methods "
        f"keep training past the failure-free run's steps (at most {int(z['steps'] * (1 + z['max_extra']))}) "
        "until they reach the target.",
        "- A stage fails before an iteration with probability p (the same iterations for every method; a redone "
        "step counts again); the recovery (or restart) is charged, then the step runs. Evaluation time is not "
        "charged. checkfree+ also trains differently when nothing fails (the swapped micro-batches).",
    ]
    if SNAPSHOT in r["modes"]:
        lines.append("- snapshot: every step each stage's model and AdamW state are copied in memory; a lost stage is a "
                     "new stage loaded from that copy (exact, simulated for real: its curve vs step is computed and "
                     "checked against no failure). Charged per step: the real pipeline's replica step / plain step "
                     "ratio (its small test model; a larger stage's compute would dilute it) x this step.")
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        rates = list(r["per_rate"])
        # one column per rate: loss vs step above, vs wall clock below (one rate: side by side)
        axes = fig.subplots(1, 2, squeeze=False) if len(rates) == 1 else fig.subplots(2, len(rates), squeeze=False)
        for i, rate in enumerate(rates):
            pr = r["per_rate"][rate]
            for j, key in enumerate(("step", "t")):
                ax = axes[0][j] if len(rates) == 1 else axes[j][i]
                for n, mode in enumerate(MODES):
                    run_ = pr["runs"].get(mode)
                    if not run_:
                        continue
                    c = run_["curve"]
                    pts = sorted(c, key=lambda p: p["t"]) if key == "t" else c
                    ax.plot([p[key] for p in pts], [p["val"] for p in pts], lw=1, color=f"C{n}", label=mode)
                ax.axhline(r["reference"]["target"], color="grey", lw=0.6, ls=":")
                ax.set_xlabel("step" if key == "step" else "simulated wall clock (s)", fontsize=7)
                ax.set_ylabel("validation loss", fontsize=7)
                ax.set_title(f"{rate} %/h: val loss vs {'step' if key == 'step' else 'wall clock'}", fontsize=8)
                ax.tick_params(labelsize=6)
                ax.set_ylim(top=min(ax.get_ylim()[1], r["reference"]["target"] + 0.9))
        axes[0][0].legend(fontsize=6)

    return draw


def rate_plots(r: dict[str, Any], out_dir: str | None, name: str) -> list[str]:
    """One figure per failure rate, ``<name>_<rate>pct.png``: loss vs step and vs wall clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    os.makedirs(out_dir or RESULTS_DIR, exist_ok=True)
    for rate in r["per_rate"]:
        one = {**r, "per_rate": {rate: r["per_rate"][rate]}}
        fig = plt.figure(figsize=(9, 3.8), dpi=100)
        try:
            _plot(one)(fig)
            fig.tight_layout()
            path = os.path.join(out_dir or RESULTS_DIR, f"{name}_{rate}pct.png")
            tmp = f"{path}.tmp.{os.getpid()}.png"
            fig.savefig(tmp)
            os.replace(tmp, path)
            paths.append(path)
        finally:
            plt.close(fig)
    return paths


def publish_result(r: dict[str, Any], out_dir: str | None, name: str) -> None:
    text = table(r)
    extra = rate_plots(r, out_dir, name)
    text += "\n\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in extra)
    print(text)
    publish(name, r, text, plot=_plot(r), out_dir=out_dir)
