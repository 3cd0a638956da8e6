"""Benchmark outputs: console table, results.json, results.csv, scaling.png, and what bounds each number."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

MIB = 1024 * 1024
TARGET_PEAK_FRACTION = 0.30

CSV_FIELDS = ["arch", "pool", "role", "component", "impl", "wall_median_s", "wall_min_s", "wall_max_s",
              "wall_iqr_s", "cpu_median_s", "repeats", "gflop", "gflops_achieved", "peak_fraction",
              "speedup_median", "peak_rss_mib", "path"]


def peak_gflops(results: dict) -> float:
    """The device's measured matmul peak: the best of every measurement of the run (start, end and
    one per configuration), so a measurement depressed by other jobs on the machine cannot flatter
    the fractions of peak."""
    measured = [results["matmul_peak_start"]["gflops_max"], results["matmul_peak_end"]["gflops_max"]]
    measured += [c["matmul_peak"]["gflops_max"] for c in results["configurations"] if "matmul_peak" in c]
    return max(measured)


def peak_1thread_gflops(results: dict) -> float | None:
    measured = [results.get("matmul_peak_1thread", {}).get("gflops_max")]
    measured += [c.get("matmul_peak_1thread", {}).get("gflops_max") for c in results["configurations"]]
    measured = [m for m in measured if m]
    return max(measured) if measured else None


def rows(results: dict) -> list[dict]:
    peak = peak_gflops(results)
    out = []
    for config in results["configurations"]:
        base = {"arch": config["arch"], "pool": config["pool"], "role": config["role"]}
        for component in ("iteration", "inversion", "maml"):
            if component not in config:
                continue
            entry = config[component]
            gflop = entry.get("gflop_reference")
            for impl in ("engine", "reference"):
                t = entry[impl]
                achieved = gflop / t["wall_median_s"] if gflop else None
                out.append({**base, "component": component, "impl": impl, **_timing_fields(t),
                            "gflop": gflop, "gflops_achieved": achieved,
                            "peak_fraction": achieved / peak if achieved else None,
                            "speedup_median": entry["speedup_median"] if impl == "engine" else 1.0,
                            "peak_rss_mib": _rss_mib(config, impl) if component == "iteration" else None,
                            "path": config["inversion_path"] if impl == "engine" else "sequential"})
        if "icfil_episode" in config:
            t = config["icfil_episode"]
            achieved = t["gflop"] / t["wall_median_s"]
            out.append({**base, "component": "icfil_episode", "impl": "engine", **_timing_fields(t),
                        "gflop": t["gflop"], "gflops_achieved": achieved, "peak_fraction": achieved / peak,
                        "speedup_median": None, "peak_rss_mib": None, "path": "dfml.evaluation.icfil"})
        for name, t in config.get("paths", {}).items():
            if isinstance(t, dict):
                out.append({**base, "component": "path_" + name.split("_")[0], "impl": name.split("_", 1)[1],
                            **_timing_fields(t), "gflop": None, "gflops_achieved": None, "peak_fraction": None,
                            "speedup_median": None, "peak_rss_mib": None, "path": name})
    return out


def _timing_fields(t: dict) -> dict:
    return {key: t[key] for key in ("wall_median_s", "wall_min_s", "wall_max_s", "wall_iqr_s", "cpu_median_s",
                                    "repeats")}


def _rss_mib(config: dict, impl: str) -> float | None:
    key = "peak_rss_engine_bytes" if impl == "engine" else "peak_rss_bytes"
    cuda = config.get("cuda_max_memory_allocated_bytes")
    if cuda is not None and impl == "engine":
        return cuda / MIB
    return config[key] / MIB if key in config else None


# ----------------------------------------------------------------------------- analysis


def scaling_fit(results: dict) -> dict:
    """Least-squares t = a + b * pool over the conv4 configurations, per implementation."""
    points = sorted(((c["pool"], c["iteration"]) for c in results["configurations"] if c["arch"] == "conv4"),
                    key=lambda point: point[0])
    out = {}
    for impl, clock in (("engine", "wall"), ("reference", "wall"), ("engine", "cpu"), ("reference", "cpu")):
        xs = [p for p, _ in points]
        ys = [it[impl][f"{clock}_median_s"] for _, it in points]
        if len(xs) < 2:
            continue
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
        intercept = mean_y - slope * mean_x
        per_member = [y / x for x, y in zip(xs, ys)]
        growth = (ys[-1] / ys[0]) / (xs[-1] / xs[0])  # 1.0 = exactly linear through the origin
        out[impl if clock == "wall" else f"{impl}_cpu"] = {
                     "clock": clock, "pools": xs, "seconds": ys, "intercept_s": intercept, "per_member_s": slope,
                     "time_per_member_s": per_member, "growth_vs_linear": growth,
                     "linear_or_better": growth <= 1.10}
    return out


def bounds(results: dict) -> list[str]:
    """Plain-language statements of what bounds the measured numbers (targets not met included)."""
    peak = peak_gflops(results)
    lines = []
    load = results.get("load_before"), results.get("load_after")
    for config in results["configurations"]:
        it = config["iteration"]
        label = f"{config['arch']} x{config['pool']}"
        achieved = it["gflop_reference"] / it["engine"]["wall_median_s"]
        fraction = achieved / peak
        parallel = it["engine"]["cpu_median_s"] / it["engine"]["wall_median_s"]
        speed = it["speedup_median"]
        verdict = "meets" if fraction >= TARGET_PEAK_FRACTION else "below"
        best_fraction = it["gflop_reference"] / it["engine"]["wall_min_s"] / peak
        text = (f"{label}: engine {speed:.2f}x the reference (best runs {it.get('speedup_best', speed):.2f}x); "
                f"{achieved:.1f} GFLOP/s = {fraction:.0%} of the {peak:.0f} GFLOP/s matmul peak, best run "
                f"{best_fraction:.0%} ({verdict} the {TARGET_PEAK_FRACTION:.0%} target on the median); "
                f"{parallel:.2f} cores busy on average")
        if speed < 1.0:
            text += "; SLOWER than the reference"
        if config["inversion_path"] != "fused" and config["arch"] != "conv4":
            text += f"; {config['arch']} teachers take the per-member autograd path (no fused kernel)"
        lines.append(text)
        for key, name in (("profile_engine", "engine"), ("profile_reference", "reference")):
            prof = config.get(key)
            if not prof:
                continue
            single = peak_1thread_gflops(results)
            gemm_rate = prof["gemm_conv_gflops"]
            rate_text = f" at {gemm_rate:.0f} GFLOP/s" if gemm_rate else ""
            if gemm_rate and single:
                rate_text += f" ({gemm_rate / single:.0%} of the 1-thread peak {single:.0f})"
            lines.append(
                f"  {name} time, 1-thread profile of one iteration: GEMM/conv kernels {prof['share_gemm_conv']:.0%}"
                f"{rate_text}; max-pool {prof['share_pooling']:.0%}; other ops (elementwise, reductions, copies: "
                f"memory-bound) {prof['share_other_ops']:.0%}; Python/dispatch/autograd overhead "
                f"{prof['share_overhead']:.0%}")
        main = next((c for c in results["configurations"] if c["role"] == "main"), None)
        if fraction < TARGET_PEAK_FRACTION and "profile_engine" not in config:
            reasons = []
            if main is not None and "maml" in main and config["arch"] == "conv4":
                maml_s = main["maml"]["engine"]["wall_median_s"]
                share = maml_s / it["engine"]["wall_median_s"]
                if share > 0.2:
                    reasons.append(f"the meta-batch step (~{maml_s * 1e3:.0f} ms, {main['maml']['speedup_median']:.2f}x "
                                   f"the reference, {main['maml']['gflop_reference']:.1f} GFLOP) is ~{share:.0%} of "
                                   f"this iteration")
            if parallel < 0.8 * results["machine"]["torch_threads"]:
                reasons.append(f"parallel efficiency: {parallel:.2f} of {results['machine']['torch_threads']} cores "
                               f"busy (load average {config.get('load_start')} -> {config.get('load_end')})")
            if config["arch"] != "conv4":
                reasons.append("per-member autograd (no fused kernel for this architecture)")
            if reasons:
                lines.append("  bounded by: " + "; ".join(reasons))
        if fraction < TARGET_PEAK_FRACTION and "profile_engine" in config:
            prof = config["profile_engine"]
            memory = prof["share_pooling"] + prof["share_other_ops"]
            reasons = []
            if memory > 0.25:
                reasons.append(f"memory-bound passes over the full-resolution feature maps ({memory:.0%})")
            if prof["share_overhead"] > 0.15:
                reasons.append(f"per-op Python/dispatch overhead ({prof['share_overhead']:.0%})")
            single = peak_1thread_gflops(results)
            if prof["gemm_conv_gflops"] and single and prof["gemm_conv_gflops"] < 0.6 * single:
                reasons.append("small GEMMs (conv layers with 32 channels: K = 288, N = 32; C_in = 1 first layer "
                               "with K = 9) that run far below the large-sgemm rate")
            if parallel < 0.8 * results["machine"]["torch_threads"]:
                reasons.append(f"parallel efficiency: {parallel:.2f} of {results['machine']['torch_threads']} "
                               f"cores busy (load average {load[0]} -> {load[1]}: other jobs share the cores)")
            if reasons:
                lines.append("  bounded by: " + "; ".join(reasons))
    fit = scaling_fit(results)
    for key in ("engine", "engine_cpu"):
        if key not in fit:
            continue
        e = fit[key]
        lines.append(f"scaling (conv4, {e['clock']} time): engine {e['per_member_s'] * 1e3:.1f} ms per member + "
                     f"{e['intercept_s'] * 1e3:.0f} ms fixed (least squares); time grows {e['growth_vs_linear']:.2f}x "
                     f"of linear from {e['pools'][0]} to {e['pools'][-1]} members "
                     f"({'linear or better' if e['linear_or_better'] else 'SUPERLINEAR'})")
    return lines


# ----------------------------------------------------------------------------- writing


def table(results: dict) -> str:
    peak = peak_gflops(results)
    m = results["machine"]
    header = [
        f"PURER meta-iteration benchmark on {m['device']} ({m['cpu_model']}, {m['logical_cpus']} logical CPUs, "
        f"{m['torch_threads']} torch threads, torch {m['torch']})",
        f"load average before {results['load_before']} after {results['load_after']}; "
        f"matmul peak {peak:.1f} GFLOP/s (float32 sgemm, best of every measurement in the run)"
        + (f"; 1 thread {peak_1thread_gflops(results):.1f}" if peak_1thread_gflops(results) else ""),
        *_preset_line(results["options"]),
        "",
        f"{'config':<13}{'component':<15}{'engine ms':>11}{'(min-max)':>17}{'reference ms':>14}{'(min-max)':>17}"
        f"{'speedup':>9}{'best-x':>7}{'cpu-x':>7}{'cores':>6}{'GFLOP':>8}{'GFLOP/s':>9}{'%peak':>7}{'best%':>7}"
        f"{'RSS MiB':>9}{'load':>6}",
    ]
    lines = list(header)
    for row in _table_rows(results, peak):
        lines.append(row)
    lines.append("speedup: reference / engine, wall medians of interleaved runs; best-x: the same on the fastest "
                 "run of each (least disturbed by other jobs); cpu-x: on process CPU time; cores: engine CPU / wall;")
    lines.append("GFLOP: the reference's count for one call; GFLOP/s, %peak: that count per engine wall second "
                 "(median) vs the matmul peak; best%: on the engine's fastest run; RSS: engine peak; load: 1-min "
                 "load average at the end of the configuration")
    lines.append("")
    paths = next((c["paths"] for c in results["configurations"] if "paths" in c), None)
    if paths:
        parts = [f"{name} {t['wall_median_s'] * 1e3:.0f} ms" for name, t in paths.items() if isinstance(t, dict)]
        lines.append("paths on this device (median): " + ", ".join(parts))
        lines.append(f"auto picks: inversion '{paths['auto_inversion_path']}', meta-batch '{paths['auto_meta_path']}'")
    checks = next((c["checks"] for c in results["configurations"] if "checks" in c), None)
    if checks:
        f32, f64, meta = checks["inversion_float32"], checks["inversion_float64"], checks["meta_batch"]
        lines.append(f"equality with the reference: inversion float64 grad max rel diff "
                     f"{f64['grad_max_rel_diff']:.1e}, "
                     f"float32 loss {f32['loss_rel_diff']:.1e} / grad max rel {f32['grad_max_rel_diff']:.1e} "
                     f"({f32['grad_fraction_above_1e-5']:.1e} of pixels above 1e-5: max-pool near-ties); "
                     f"meta-batch grad max rel diff {meta['grad_max_rel_diff']:.1e}")
    lines.append("")
    lines.extend(bounds(results))
    return "\n".join(lines)


def _preset_line(options: dict) -> list[str]:
    """One header line naming the preset and its sizes (none for runs without a preset)."""
    if not options.get("preset"):
        return []
    s = options["sizes"]
    return [f"preset {options['preset']}: conv4 x{options['main_pool']} teachers (width {s['width']}) on "
            f"{s['channels']} x {s['image_size']} x {s['image_size']} inputs, {s['way']}-way {options['shot']}-shot "
            f"{s['query']}-query tasks, {s['slots']} pseudo slots per class, meta-batch {s['meta_batch']}"]


def _table_rows(results: dict, peak: float) -> list[str]:
    out = []
    for config in results["configurations"]:
        label = f"{config['arch']} x{config['pool']}"
        for component in ("iteration", "inversion", "maml"):
            if component not in config:
                continue
            entry = config[component]
            e, r = entry["engine"], entry["reference"]
            gflop = entry["gflop_reference"]
            rate = gflop / e["wall_median_s"]
            rss = _rss_mib(config, "engine") if component == "iteration" else None
            cores = e["cpu_median_s"] / e["wall_median_s"]
            load = (config.get("load_end") or [None])[0] if component == "iteration" else None
            best = entry.get("speedup_best", r["wall_min_s"] / e["wall_min_s"])
            best_rate = gflop / e["wall_min_s"]
            out.append(f"{label:<13}{component:<15}{e['wall_median_s'] * 1e3:>11.1f}{_span(e):>17}"
                       f"{r['wall_median_s'] * 1e3:>14.1f}{_span(r):>17}{entry['speedup_median']:>8.2f}x"
                       f"{best:>6.2f}x{entry['speedup_cpu']:>6.2f}x{cores:>6.2f}{gflop:>8.2f}{rate:>9.1f}"
                       f"{rate / peak:>7.0%}{best_rate / peak:>7.0%}"
                       + (f"{rss:>9.0f}" if rss else f"{'':>9}") + (f"{load:>6.1f}" if load is not None else ""))
            label = ""
        if "icfil_episode" in config:
            t = config["icfil_episode"]
            rate = t["gflop"] / t["wall_median_s"]
            name = f"icfil({t['inv_steps']}+{t['cal_steps']})"
            out.append(f"{label:<13}{name:<15}{t['wall_median_s'] * 1e3:>11.1f}{_span(t):>17}{'':>14}{'':>17}"
                       f"{'':>9}{'':>7}{'':>7}{t['cpu_median_s'] / t['wall_median_s']:>6.2f}{t['gflop']:>8.2f}"
                       f"{rate:>9.1f}{rate / peak:>7.0%}{t['gflop'] / t['wall_min_s'] / peak:>7.0%}")
    return out


def _span(t: dict) -> str:
    return f"({t['wall_min_s'] * 1e3:.0f}-{t['wall_max_s'] * 1e3:.0f})"


def write_outputs(results: dict, options, log: Callable[[str], None] = print) -> dict[str, Path]:
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    results["scaling_fit"] = scaling_fit(results)
    results["bounds"] = bounds(results)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "table": out / "table.txt"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows(results))
    text = table(results)
    paths["table"].write_text(text + "\n")
    if options.plot:
        paths["png"] = out / "scaling.png"
        plot(results, paths["png"])
    log(text)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = sorted((c for c in results["configurations"] if c["arch"] == "conv4"), key=lambda c: c["pool"])
    others = [c for c in results["configurations"] if c["arch"] != "conv4"]
    pools = [c["pool"] for c in conv]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    for axis, clock, title in ((axes[0], "wall", "wall time"), (axes[1], "cpu", "process CPU time")):
        for impl, style in (("engine", "o-"), ("reference", "s--")):
            med = [c["iteration"][impl][f"{clock}_median_s"] for c in conv]
            if clock == "wall":
                low = [m - c["iteration"][impl]["wall_min_s"] for m, c in zip(med, conv)]
                high = [c["iteration"][impl]["wall_max_s"] - m for m, c in zip(med, conv)]
                axis.errorbar(pools, med, yerr=[low, high], fmt=style, capsize=3, label=f"{impl} (conv4)")
            else:
                axis.plot(pools, med, style, label=f"{impl} (conv4)")
        for c in others:
            for impl, marker in (("engine", "^"), ("reference", "v")):
                axis.plot([c["pool"]], [c["iteration"][impl][f"{clock}_median_s"]], marker, markersize=9,
                          label=f"{impl} ({c['arch']})")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("pool size (members)")
        axis.set_ylabel(f"seconds per meta-iteration ({clock}, median)")
        axis.set_title(f"PURER meta-iteration, {title}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    right = axes[2]
    right.plot(pools, [c["iteration"]["speedup_median"] for c in conv], "o-", color="tab:blue", label="speedup, wall")
    right.plot(pools, [c["iteration"]["speedup_cpu"] for c in conv], "o:", color="tab:green", label="speedup, CPU time")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xscale("log")
    right.set_xlabel("pool size (members)")
    right.set_ylabel("reference / engine")
    right.set_ylim(bottom=0)
    twin = right.twinx()
    peak = peak_gflops(results)
    frac = [c["iteration"]["gflop_reference"] / c["iteration"]["engine"]["wall_median_s"] / peak * 100 for c in conv]
    twin.plot(pools, frac, "s-", color="tab:orange", label="engine % of matmul peak")
    twin.axhline(TARGET_PEAK_FRACTION * 100, color="tab:orange", linestyle=":", label="30% of peak")
    twin.set_ylabel("% of measured matmul peak")
    twin.set_ylim(bottom=0)
    handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    right.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower right")
    m = results["machine"]
    right.set_title(f"{m['device']} {m['cpu_model']}, {m['torch_threads']} threads, load {results['load_before'][0]}")
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
