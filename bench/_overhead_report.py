"""The checkpoint-overhead benchmark's report: the Markdown table and the plot.

Where it sits: the last stage of ``bench_overhead``, after :func:`bench.bench_overhead.run` has
reduced every cell. The flow: :func:`table` writes the step counts, then per cell (state size,
world) the mean iteration time at every checkpoint interval next to the baseline, each method's
stall at interval 1 and isolated, recoverkit's stall against the others', torchft's per-step
cost and the peak host memory every method added; :func:`_plot` draws the iteration time vs the
interval per state size (:data:`COLORS`: one colour per method). ``main`` prints the table and
publishes both through :func:`bench.report.publish`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._overhead_methods import TORCHFT

__all__ = ["COLORS", "table", "_plot"]

COLORS = {"recoverkit": "tab:blue", "recoverkit_host": "tab:olive", "recoverkit_memory": "tab:cyan", "torch_save": "tab:orange",
          "dcp_save": "tab:green", "dcp_async_save": "tab:red", TORCHFT: "tab:purple"}


# --------------------------------------------------------------------------- output
def table(r: dict[str, Any]) -> str:
    ks = [str(k) for k in r["intervals"]]
    sc = r["step_counts"]
    lines = [
        f"mean iteration time (s) with a checkpoint every k steps vs the same loop without checkpoints; "
        f"stall = training time lost per checkpoint (median over {sc['interval_1_counted_checkpoints']} "
        f"back-to-back checkpoints at k=1, and over {sc['windows_per_method']} isolated one(s))"
        + (" [smoke]" if r["smoke"] else ""),
        f"step counts: {sc['warmup_checkpoints']} warm-up + {sc['interval_1_counted_checkpoints']} counted checkpoints at k=1; "
        f"{sc['baseline_steps']} baseline steps before and {sc['baseline_steps']} after the methods; longer intervals "
        + ("measured directly" if sc["direct"] else f"from {sc['windows_per_method']} isolated window(s) + the baseline median (`*`), "
           "measured directly where the background work outlasts k")
        + f"; {sc['tail_steps']} tail steps per window",
        "",
    ]
    for c in r["cells"]:
        b = c["baseline_iteration_s"]["median"]
        cal = c["calibration"]
        lines += [
            f"**{c['bytes'] / 2**30:.2f} GiB state, {c['world']} rank(s)** ({c['params'] / 1e6:.0f} M params, "
            f"batch {c['batch']}: fwd+bwd {cal['fwd_bwd_s'] * 1e3:.0f} ms = {cal['fwd_bwd_vs_memcpy']:.1f}x memcpy "
            f"{cal['memcpy_s'] * 1e3:.0f} ms; {c['torch_threads_per_rank']} thread(s) per rank; cell {c['runtime_s']:.0f} s)",
            "",
            "| method | " + " | ".join(f"k={k}: iter s (overhead)" for k in ks) + " | stall s, k=1 | stall s, isolated |",
            "|---|" + "---:|" * (len(ks) + 2),
            "| no checkpoint | " + " | ".join(f"{b:.3f}" for _ in ks) + " | - | - |",
        ]
        for name, m in c["methods"].items():
            row = [
                f"{m['iteration_s'][k]:.3f}{'*' if m['mode'][k] != 'measured' else ''} ({m['overhead'][k] * 100:+.1f}%)"
                for k in ks
            ]
            lines.append(
                f"| {name} | " + " | ".join(row)
                + f" | {m['stall_every_step_s']['median']:.3f} | {m['stall_isolated_s']['median']:.3f} |"
            )
        ft = c.get(TORCHFT)
        if ft and "error" not in ft:
            lines.append(f"| torchft, every step (own world; its plain DDP {ft['baseline_step_s']:.3f}) | "
                         f"{ft['torchft_step_s']:.3f} ({ft['overhead'] * 100:+.1f}%) | " + " | ".join("-" for _ in ks[1:])
                         + (" | " if len(ks) > 1 else "") + "- | - |")
        rk = c["methods"].get("recoverkit")
        if rk:
            others = [n for n in c["methods"] if n != "recoverkit"]
            ratios = ", ".join(
                f"{n} {rk['stall_every_step_s']['median'] / max(1e-9, c['methods'][n]['stall_every_step_s']['median']):.3f}"
                for n in others
            )
            lines += ["", f"- recoverkit stall / other method's stall (k=1): {ratios}"]
        mem = c["methods"].get("recoverkit_memory")
        if mem:
            ov = mem["overhead"]["1"]
            what = "shared memory + a peer replica" if c["world"] > 1 else "shared memory"
            lines.append(f"- recoverkit_memory ({what} every step, no disk): {ov * 100:+.1f}% per step vs no "
                         f"checkpoint (target <= 3 %: {'met' if ov <= 0.03 else 'MISSED'})")
        ft = c.get(TORCHFT)
        if ft and "error" not in ft:
            line = (f"- torchft (2 replica groups of 1 process: Manager quorum every step, torchft DDP, same model "
                    f"and batch, its own world): {ft['torchft_step_s']:.3f} s per step vs {ft['baseline_step_s']:.3f} s "
                    f"plain DDP on the same processes: {ft['overhead'] * 100:+.1f}%")
            if mem:
                line += f"; recoverkit_memory {mem['overhead']['1'] * 100:+.1f}%"
            lines.append(line)
        elif ft:
            lines.append(f"- torchft: failed: {ft['error'].splitlines()[-1][:200]}")
        mems = [(n, m) for n, m in c["methods"].items() if m.get("host_memory")]
        if mems:
            lines.append("- peak host memory added per rank (private RSS above the start + shared-memory files; "
                         "budget: staging pool + shared-memory stores): " + ", ".join(
                             f"{n} {m['host_memory']['added_bytes'] / 2**20:.0f} MiB"
                             + (f" ({m['host_memory']['shm_bytes'] / 2**20:.0f} MiB in /dev/shm)"
                                if m["host_memory"]["shm_bytes"] else "")
                             + (f" of budget {m['budget_bytes'] / 2**20:.0f} MiB" if m.get("budget_bytes") else "")
                             for n, m in mems))
        if c.get("shm_bytes_left_after_close"):
            lines.append(f"- {c['shm_bytes_left_after_close']} bytes left in shared memory after every Checkpointer closed")
        lines.append("")
    for name, why in r.get("not_run", {}).items():
        lines.append(f"- {name}: not run: {why}")
    lines.append(f"- runtime {r['runtime_s']:.0f} s")
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        sizes = r["sizes_mib"]
        fig.set_size_inches(max(8.0, 4.2 * len(sizes)), 4.5)
        axes = fig.subplots(1, len(sizes), squeeze=False)[0]
        styles = {1: "-", 2: "--"}
        for ax, size in zip(axes, sizes):
            for c in r["cells"]:
                if c["size_mib"] != size:
                    continue
                ks = r["intervals"]
                ls = styles.get(c["world"], ":")
                for name, m in c["methods"].items():
                    ax.plot(ks, [m["iteration_s"][str(k)] for k in ks], ls, marker="o", ms=3, color=COLORS.get(name),
                            label=f"{name}, {c['world']}r")
                ax.axhline(c["baseline_iteration_s"]["median"], ls=ls, color="black", lw=0.8, label=f"no checkpoint, {c['world']}r")
                ax.set_title(f"{c['bytes'] / 2**30:.2f} GiB state", fontsize=9)
            ax.set_xscale("log")
            ax.set_xlabel("checkpoint interval (steps)")
            ax.tick_params(labelsize=7)
        axes[0].set_ylabel("mean iteration time (s)")
        handles, labels = axes[0].get_legend_handles_labels()
        axes[-1].legend(handles, labels, fontsize=6, loc="upper right")

    return draw
