"""The lazy-checkpoint benchmark's report: the Markdown table and the plot.

Where it sits: the last stage of ``bench_lazy``, after its phases (:mod:`bench._lazy_phases`)
and :func:`bench.bench_lazy.run`'s reduction of them. The flow: :func:`table` writes the state,
the calibration, the stall per checkpoint of every method, the iteration times, the restore
times per tier and the memory each method adds, each ratio against its target;
:func:`_plot` draws the stall and the restore times side by side. ``main`` prints the table and
publishes both through :func:`bench.report.publish`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["table", "_plot"]


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def table(r: dict[str, Any]) -> str:
    c, st, ra, tg = r["calibration"], r["stall_s"], r["ratios"], r["targets"]
    met = r["met"]

    def mark(k: str) -> str:
        return f"{ra[k]:.3f} (target {tg[k]}: {'met' if met[k] else 'MISSED'})"

    it = r["iteration_s"]
    rs = r["restore_s"]
    mem = r["memory"]
    lines = [
        f"state: {r['bytes'] / 2**30:.2f} GiB ({r['model']['layers']} x {r['model']['width']}^2 MLP + AdamW), "
        f"{r['steps']} counted saves after {r['warmup']} warm-up, {r['iters']} timed iterations"
        + (" [smoke]" if r["smoke"] else ""),
        f"calibration: memcpy of the state {c['memcpy_s'] * 1e3:.1f} ms ({c['memcpy_gb_per_s']:.1f} GB/s); "
        f"batch {c['batch']} -> fwd+bwd {c['fwd_bwd_s'] * 1e3:.1f} ms = {c['fwd_bwd_vs_memcpy']:.2f}x memcpy; "
        f"optimizer step {c['optimizer_step_s'] * 1e3:.1f} ms",
        "",
        "| training stall per checkpoint | median s | max s | recoverkit / this |",
        "|---|---:|---:|---:|",
    ]
    rk = st["recoverkit_save_async"]["median"]
    for k, v in st.items():
        lines.append(f"| {k} | {v['median']:.4f} | {v['max']:.4f} | {rk / v['median']:.4f} |")
    lines += [
        "",
        f"- stall vs torch.save: {mark('stall_vs_torch_save')}",
        f"- stall vs dcp.async_save: {mark('stall_vs_async_save')}",
        "",
        "| iteration | median s | mean s | max s |",
        "|---|---:|---:|---:|",
    ]
    for k in ("no_checkpoint", "save_async_every_step", "save_async_stall"):
        v = it[k]
        lines.append(f"| {k} | {v['median']:.4f} | {v['mean']:.4f} | {v['max']:.4f} |")
    lines += [
        "",
        f"- iteration overhead (median): {mark('iteration_overhead')}",
        "",
        "| restore | seconds | GB/s |",
        "|---|---:|---:|",
    ]
    for k, v in rs.items():
        n = r["restore_detail"]["resharded"]["bytes"] if k == "resharded_local_disk" else r["bytes"]
        lines.append(f"| {k} | {v:.3f} | {n / v / 1e9:.2f} |")
    lines += [
        "",
        *(
            []
            if r["restore_detail"].get("host_snapshot_used", True)
            else [
                f"- WARNING: host-snapshot restore returned steps {r['restore_detail']['host_restored_steps']}, "
                f"not the newest step {r['restore_detail']['host_snapshot_step']} held in memory: that row timed a "
                "fallback to an older step on disk"
            ]
        ),
        f"- page cache dropped before disk restores: {r['restore_detail']['page_cache_dropped']}; "
        f"resharded: {r['restore_detail']['resharded']['layout']}, bit-exact {r['restore_detail']['resharded']['bit_exact']}",
        f"- host / local restore {ra['host_restore_vs_local_restore']:.2f}; host restore / memcpy {ra['host_restore_vs_memcpy']:.2f}; "
        f"local / torch.load {ra['local_restore_vs_torch_load']:.2f}; local / dcp.load {ra['local_restore_vs_dcp_load']:.2f}; "
        f"resharded / local per byte {ra['resharded_vs_local_per_byte']:.2f}",
        "",
        f"| memory ({mem['rss_method']}) | added peak RSS |",
        "|---|---:|",
    ]
    for k, v in mem["added_rss_bytes"].items():
        lines.append(f"| {k} | {_mib(v)} |")
    p = mem["pool"]
    lines += [
        "",
        f"- staging pool high water {_mib(p['high_water'])} of budget {_mib(p['budget_bytes'])}: "
        f"{mark('pool_high_water_vs_budget')}; recoverkit / async_save added RSS {ra['rss_vs_async_save']:.2f}",
        f"- recoverkit saves skipped (pool full): {r['recoverkit_skipped_saves']}; dcp.async_save: {r['dcp_async_options']}",
        f"- runtime {r['runtime_s']:.0f} s",
    ]
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        st = r["stall_s"]
        names = list(st)
        colors = ["tab:blue" if n.startswith("recoverkit") else "tab:gray" for n in names]
        ax1.bar(names, [max(1e-6, st[n]["median"]) for n in names], color=colors)
        ax1.set_yscale("log")
        ax1.set_ylabel("training stall per checkpoint (s, median)")
        ax1.set_title("stall: recoverkit vs torch/DCP", fontsize=9)
        ax1.tick_params(axis="x", labelrotation=20, labelsize=7)
        rs = r["restore_s"]
        keys = list(rs)
        colors = ["tab:gray" if k in ("torch_load", "dcp_load") else "tab:blue" for k in keys]
        ax2.bar(keys, [rs[k] for k in keys], color=colors)
        ax2.set_ylabel("restore time (s)")
        ax2.set_title(f"restore of {r['bytes'] / 2**30:.2f} GiB", fontsize=9)
        ax2.tick_params(axis="x", labelrotation=20, labelsize=7)

    return draw
