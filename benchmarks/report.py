"""The report of a run: report.md (a section per scenario, figures against their targets) and
the P1 and P2 plots, from results.json's dictionary. P9 to P12 write their own sections
(report_lines in their modules)."""

from __future__ import annotations

import os
from typing import Any

from benchmarks.agent_scale import report_lines as p9_lines
from benchmarks.common import MiB
from benchmarks.node_cost import report_lines as p11_lines
from benchmarks.node_view import report_lines as p10_lines
from benchmarks.requests_bench import p12_lines


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def write_plots(res: dict[str, Any], out_dir: str) -> list[str]:
    """P1 and P2 as bar charts (log scale: the figures span four orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "P1" in res:
        rows = res["P1"]["rows"]
        names = list(rows)
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.barh(names, [rows[n]["median_ns"] for n in names],
                color=["tab:gray" if "empty" in n else "tab:green" if "ebpf" in n else "tab:orange" for n in names])
        ax.set_xscale("log")
        ax.set_xlabel("ns per call (median, log scale)")
        ax.set_title("P1: cost of one memory check")
        ax.invert_yaxis()
        fig.tight_layout()
        path = os.path.join(out_dir, "p1_check_cost.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if "P2" in res:
        rows = res["P2"]["rows"]
        cap = res["P2"]["max_mib"] - res["P2"]["threshold"] // MiB
        names = list(rows)
        values = [rows[n]["median_mib"] if not rows[n]["not_flipped"] else cap for n in names]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        bars = ax.bar(names, [max(v, 0.01) for v in values],
                      color=["tab:green" if n == "ebpf" else "tab:orange" for n in names])
        for bar, n in zip(bars, names, strict=True):
            if rows[n]["not_flipped"]:
                ax.annotate(f"> {cap} MiB in {rows[n]['not_flipped']} runs", (bar.get_x(), bar.get_height()),
                            fontsize=8, xytext=(0, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_ylabel("MiB past the threshold (median)")
        ax.set_title("P2: overshoot before the check flips")
        fig.tight_layout()
        path = os.path.join(out_dir, "p2_overshoot.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_report(res: dict[str, Any], out_dir: str) -> str:
    m = res["machine"]
    lines = ["# rtml-ebpf benchmark report", "",
             f"Machine: Linux {m['kernel']}, {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
             f"Python {m['python']}; {m['date']}. A shared VM: figures are medians of interleaved repeats "
             "with their spread (min–max).", "",
             "Reproduce: `make bench` (as root).", ""]
    if res.get("sections_from"):  # a report merged from runs of some sections (see --merge)
        lines += ["Sections from separate runs on this machine: " + "; ".join(
            f"{k}: {v}" for k, v in res["sections_from"].items()) + ".", ""]
    if "P1" in res:
        p = res["P1"]
        lines += ["## P1 check cost", "", "| check | ns per call (median) | spread |", "|---|---|---|"]
        lines += [f"| {k} | {v['median_ns']:.1f} | {v['spread_ns']} |" for k, v in p["rows"].items()]
        lines += ["", f"- direct file read / ebpf check: **{p['file_read_over_ebpf']:.0f}x** (target ≥ 100x: "
                  f"{verdict(p['file_read_over_ebpf'] >= 100)})",
                  f"- ebpf check / empty method call: **{p['ebpf_over_empty']:.2f}x** (target ≤ 1.6x: "
                  f"{verdict(p['ebpf_over_empty'] <= 1.6)})",
                  f"- psutil RSS / ebpf check: {p['psutil_over_ebpf']:.0f}x; uncached poll / ebpf: "
                  f"{p['poll_nocache_over_ebpf']:.0f}x", "", "![P1](p1_check_cost.png)", ""]
    if "P2" in res:
        p = res["P2"]
        lines += ["## P2 overshoot", "",
                  f"A process in a {p['limit'] // MiB} MiB cgroup allocates and touches memory in 1 MiB steps as "
                  f"fast as it can, checking after each step; threshold {p['threshold'] // MiB} MiB (usage). "
                  f"Overshoot = kernel usage at the flip minus the threshold. A run that had not flipped after "
                  f"{p['max_mib']} MiB counts as 'not flipped' (overshoot > {p['max_mib'] - p['threshold'] // MiB}"
                  " MiB).", "",
                  "| check | overshoot MiB (median) | spread | not flipped | alloc rate MiB/s |",
                  "|---|---|---|---|---|"]
        for k, v in p["rows"].items():
            med_s = f"{v['median_mib']:.2f}" if v["median_mib"] is not None else "-"
            lines.append(f"| {k} | {med_s} | {v['spread_mib']} | {v['not_flipped']} | {v['rate_mib_s']:.0f} |")
        e = p["rows"]["ebpf"]["median_mib"]
        lines += ["", f"- ebpf overshoot target ≤ 1 MiB: {verdict(e is not None and e <= 1)}", "",
                  "![P2](p2_overshoot.png)", ""]
    if "P3" in res:
        p = res["P3"]
        lines += ["## P3 probe overhead, per hook set", "",
                  f"A C fault storm (mmap 64 MiB, touch every page, munmap; {p['pages_per_run']} faults per run), "
                  f"{p['fault_us_base']:.2f} µs per fault without BPF. For each hook set: the storm with the set's "
                  "empty programs (the floor: what the kernel charges to run any program there), and with rtml "
                  "watching the storm's cgroup and another one; all interleaved.", "",
                  "| hook set | hooks | storm overhead | floor (empty programs) | storm in an unwatched cgroup |"
                  " target |", "|---|---|---|---|---|---|"]
        for name, v in p["sets"].items():
            target = "≤ 5%" if name == "lean" else "-"
            ok = f" {verdict(v['overhead_pct'] <= 5)}" if name == "lean" else ""
            lines.append(f"| {name} | {', '.join(v['hooks'])} | **{v['overhead_pct']:.1f}%** "
                         f"({v['overhead_spread_pct']}) | {v['floor_overhead_pct']:.1f}% ({v['floor_spread_pct']}) | "
                         f"{v['unwatched_overhead_pct']:.1f}% ({v['unwatched_spread_pct']}) | {target}{ok} |")
        lines += ["", "| hook set | program | ns per run (median) | spread | runs per fault |", "|---|---|---|---|---|"]
        for name, v in p["sets"].items():
            for k, e in v["per_event"].items():
                if "events per fault" in k:
                    continue
                per = v["per_event"].get(k + " events per fault", {"median": 0.0})["median"]
                lines.append(f"| {name} | {k} | {e['median']:.0f} | {e['spread']} | {per:.2f} |")
        lines += ["", "Per-event run time target ≤ 100 ns (measured with kernel.bpf_stats_enabled, whose two "
                  "clock reads are included). Programs that ran a handful of times have noisy figures.", ""]
    if "P4" in res:
        p = res["P4"]
        lines += ["## P4 start-up", "", "| step | median | spread |", "|---|---|---|",
                  f"| import rtml_ebpf | {p['import_s']['median'] * 1e3:.1f} ms | {p['import_s']['spread']} s |",
                  f"| first ebpf Limiter (load, verify, attach) | {p['limiter_s']['median'] * 1e3:.1f} ms | "
                  f"{p['limiter_s']['spread']} s |",
                  f"| RSS added | {p['rss_bytes']['median'] / MiB:.1f} MiB | {p['rss_bytes']['spread']} B |", "",
                  f"- total {p['total_s']['median'] * 1e3:.0f} ms, target ≤ 150 ms: "
                  f"{verdict(p['total_s']['median'] <= 0.150)}; RSS target ≤ 10 MiB: "
                  f"{verdict(p['rss_bytes']['median'] <= 10 * MiB)}", ""]
        if "shared" in p:  # older results have no shared-load rows
            sh = p["shared"]
            lines += ["First Limiter of a root process in a cgroup of its own, no node agent (`backend=\"auto\"`): "
                      "the first process starts the node's shared load, the others adopt it.", "",
                      "| step | median | spread | target |", "|---|---|---|---|",
                      f"| start the shared load (spawn its agent, load, attach, watch) | {sh['start_s'] * 1e3:.1f} ms "
                      "| one run | |",
                      f"| adopt the shared load | {sh['adopt_s']['median'] * 1e3:.1f} ms | {sh['adopt_s']['spread']} s "
                      f"| ≤ {sh['target_s'] * 1e3:.0f} ms: {verdict(sh['adopt_s']['median'] <= sh['target_s'])} |", ""]
    if "P5" in res:
        p = res["P5"]
        lines += ["## P5 flood survival", "",
                  f"`rtml-ebpf demo`: limit {p['limit_bytes'] // MiB} MiB, threshold {p['threshold']}, "
                  f"{p['clients']} clients, {p['payload_mib']} MiB per request, {p['duration_s']:.0f} s per run.", "",
                  "| run | OOM kills | served | rejected | failed | peak MiB | first OOM kill |",
                  "|---|---|---|---|---|---|---|"]
        for r in p["runs"]:
            first = f"{r['time_to_first_oom_s']:.1f} s" if r["time_to_first_oom_s"] is not None else "-"
            lines.append(f"| {r['name']} | {r['oom_kills']} | {r['served']} | {r['rejected']} | {r['failed']} | "
                         f"{r['peak_bytes'] / MiB:.0f} | {first} |")
        guarded = [r for r in p["runs"] if r["guard"] in ("ebpf", "admission")]
        lines += ["", f"- zero OOM kills for the kernel-fed guards (in-handler check, pre-fork admission): "
                  f"{verdict(all(r['oom_kills'] == 0 for r in guarded))}", "", "![flood](flood.png)", ""]
    if "P6" in res:
        p = res["P6"]
        g = p["goodput"]
        lines += ["## P6 admission", "",
                  f"- overhead per admitted request (try_admit + finish, shared ledger, kernel-fed meter): "
                  f"**{p['admission_us']['median']:.1f} µs** (spread {p['admission_us']['spread']}), against "
                  f"{p['door_us']['median']:.2f} µs for the check at the door alone; target ≤ 5 µs: "
                  f"{verdict(p['admission_us']['median'] <= 5)}",
                  f"- error of the measured per-request cost against what the request allocated (threads and "
                  f"asyncio requests, 2–64 MiB): worst **{p['cost_max_error']['median'] * 100:.1f}%** "
                  f"(spread {p['cost_max_error']['spread']}); target ≤ 10%: "
                  f"{verdict(p['cost_max_error']['median'] <= 0.10)}",
                  f"- goodput of the guarded pre-fork flood (gunicorn --preload, 4 gthread workers x 8, 256 MiB, "
                  f"threshold 0.8, 48 clients): mean requests in flight **{g['mean_inflight']:.2f}** against the "
                  f"ideal (threshold - idle usage {g['idle_bytes'] / MiB if g['idle_bytes'] else 0:.0f} MiB) / "
                  f"cost {g['cost_bytes'] / MiB:.1f} MiB = {g['ideal_concurrency']:.2f}: **{g['share'] * 100:.0f}%**;"
                  f" target ≥ 80%: {verdict(g['share'] >= 0.8)}. {g['oom_kills']} OOM kills, {g['served']} served, "
                  f"{g['rejected']} rejected, {g['failed']} failed, peak {g['peak_bytes'] / MiB:.0f} MiB.", ""]
    if "P7" in res:
        p = res["P7"]
        lines += ["## P7 overhead a real service sees", "",
                  "The unguarded demo service (threaded http.server), requests/s with no program attached and "
                  "with each hook set watching its cgroup, interleaved.", "",
                  "| request | requests/s without | memcg set | lean set | target (lean) |", "|---|---|---|---|---|"]
        names = {"/work": "allocate 24 MiB in 1 MiB chunks", "/json": "parse a 5 MB JSON document"}
        for path, v in p.items():
            lean = v["lean"]["overhead_pct"]
            lines.append(f"| {names.get(path, path)} | {v['base_rps']:.1f} | {v['memcg']['overhead_pct']:.1f}% "
                         f"({v['memcg']['spread_pct']}) | {lean:.1f}% ({v['lean']['spread_pct']}) | ≤ 5%: "
                         f"{verdict(lean <= 5)} |")
        lines.append("")
    if "P8" in res:
        p = res["P8"]
        lines += ["## P8 precision per hook set", "",
                  "Time for the verdict to clear after the cgroup frees 100 MiB (threshold 64 MiB), and the "
                  "working-set error at rest with 96 MiB of file cache and 40 MiB of anon memory in the cgroup "
                  "(stats() against usage - inactive_file read from the files at the same moment).", "",
                  "| hook set | time to clear after a free (ms) | working-set error (MiB) |", "|---|---|---|"]
        for name, v in p.items():
            lines.append(f"| {name} | {v['clear_ms']['median']:.0f} ({v['clear_ms']['spread']}) | "
                         f"{v['ws_error_mib']['median']:.2f} ({v['ws_error_mib']['spread']}) |")
        lines.append("")
    if "P9" in res:
        lines += p9_lines(res["P9"])
    if "P10" in res:
        lines += p10_lines(res["P10"])
    if "P11" in res:
        lines += p11_lines(res["P11"])
    if "P12" in res:
        lines += p12_lines(res["P12"])
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
