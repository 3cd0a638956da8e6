"""The scaling study's report: markdown tables of every kept model, the selection beside the official rule, the
fits, predictions and verdicts (dfml/studies/scaling.py's analysis), and the figure of accuracy against
meta-iterations on a log axis with the paper's numbers as lines."""

from __future__ import annotations

from pathlib import Path


def _ci(pair: list[float]) -> str:
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]"


def markdown(analysis: dict, pool: list[dict]) -> list[str]:
    settings = analysis["settings"]
    lines = ["# Scaling study: accuracy against meta-iterations", ""]
    if pool:
        held = [c["heldout_accuracy"] for c in pool if c.get("heldout_accuracy") is not None]
        lines += [f"Pool: {len(pool)} teachers, held-out accuracy {100 * min(held):.1f}-{100 * max(held):.1f} % "
                  f"(mean {100 * sum(held) / len(held):.1f} %).", ""]
    lines += ["Accuracies in %, plain adaptation, 5-way; meta-test over 600 fixed episodes (95 % CI over episodes, "
              "one training seed), meta-val over the selection's episodes.", ""]
    for arm in analysis["arms"]:
        paper = settings["paper"].get(f"shot{arm['shot']}")
        for protocol, entry in arm["protocols"].items():
            lines += [f"## {arm['method']}, {arm['shot']}-shot, {protocol} ({arm['scenario']}, {arm['run']})", "",
                      "| iterations | meta-val | meta-test |", "|---:|---:|---:|"]
            for kept in entry["kept"]:
                mark = " (selected)" if kept["iteration"] == arm["selected"][protocol]["iteration"] else ""
                lines.append(f"| {kept['iteration']:,}{mark} | {kept['meta_val']:.2f} | {kept['meta_test']:.2f} "
                             f"+- {kept['meta_test_ci95']:.2f} |")
            rule, recent, every = entry["official_rule"], entry["fit"], entry["fit_all"]
            lines += ["", f"- selected on meta-val: iteration {arm['selected'][protocol]['iteration']:,}, meta-test "
                      f"{rule['selected']:.2f}; the official rule (maximum on meta-test): iteration "
                      f"{rule['max_iteration']:,}, {rule['max']:.2f}, inflation {rule['inflation']:+.2f} "
                      f"{_ci(rule['inflation_ci'])}",
                      f"- slope per doubling over iterations {', '.join(f'{i:,}' for i in recent['iterations'])}: "
                      f"{recent['slope_per_doubling']:+.2f} {_ci(recent['slope_ci'])}; predicted at "
                      f"{recent['extrapolate_to']:,}: {recent['predicted']:.2f} {_ci(recent['predicted_ci'])}"
                      + (f" against the paper's {paper:.2f}: **{recent['verdict']}**" if paper is not None else ""),
                      f"- over every kept model: slope {every['slope_per_doubling']:+.2f} {_ci(every['slope_ci'])}, "
                      f"predicted {every['predicted']:.2f} {_ci(every['predicted_ci'])}", ""]
        for protocol, scores in arm.get("icfil", {}).items():
            lines += [f"ICFIL ({protocol}): " + "; ".join(
                f"iteration {int(i):,}: {s['icfil']:.2f} +- {s['icfil_ci95']:.2f} (plain {s['plain']:.2f}; ICFIL - plain "
                f"{s['icfil_minus_plain']['difference']:+.2f} {_ci(s['icfil_minus_plain']['ci'])})" for i, s in sorted(
                    scores.items(), key=lambda kv: int(kv[0]))), ""]
    if analysis["comparisons"]:
        lines += ["## Pre-registered differences (paired over episodes, bootstrap 95 % interval)", "",
                  "| pair | shot | protocol | at | iterations | difference |", "|---|---:|---|---|---|---:|"]
        for row in analysis["comparisons"]:
            lines.append(f"| {row['pair']} | {row['shot']} | {row['protocol']} | {row['at']} | "
                         f"{row['iterations'][0]:,} / {row['iterations'][1]:,} | {row['difference']:+.2f} "
                         f"{_ci(row['ci'])} |")
        lines.append("")
    return lines


def figure(analysis: dict, path: Path) -> None:
    """Accuracy against meta-iterations (log axis) per shot: each method and protocol a line with its
    episodes' CI, the fitted line dotted to the paper's iterations, the paper's number a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = analysis["settings"]
    shots = sorted({arm["shot"] for arm in analysis["arms"]})
    fig, axes = plt.subplots(1, len(shots), figsize=(6.2 * len(shots), 4.6), squeeze=False)
    colours, styles = {}, {}
    for ax, shot in zip(axes[0], shots):
        for arm in (a for a in analysis["arms"] if a["shot"] == shot):
            for protocol, entry in arm["protocols"].items():
                colour = colours.setdefault(arm["method"], f"C{len(colours)}")  # a colour per method,
                style = styles.setdefault(protocol, ["-", "--", "-."][len(styles) % 3])  # a line per protocol
                x = [k["iteration"] for k in entry["kept"]]
                y = [k["meta_test"] for k in entry["kept"]]
                err = [k["meta_test_ci95"] for k in entry["kept"]]
                ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, color=colour, ls=style,
                            label=f"{arm['method']} {protocol}")
                fit = entry["fit"]
                span = np.array([fit["iterations"][0], fit["extrapolate_to"]], dtype=float)
                slope, end = fit["slope_per_doubling"], fit["predicted"]
                ax.plot(span, end - slope * (np.log2(span[1]) - np.log2(span)), ":", color=colour, lw=1)
                ax.errorbar([fit["extrapolate_to"]], [end], yerr=[[end - fit["predicted_ci"][0]],
                                                                  [fit["predicted_ci"][1] - end]],
                            fmt="x", color=colour, capsize=3)
        paper = settings["paper"].get(f"shot{shot}")
        if paper is not None:
            ax.axhline(paper, color="black", lw=1, ls="--", label=f"PURER paper ({paper:.2f})")
        ax.set_xscale("log", base=2)
        ticks = sorted({k["iteration"] for a in analysis["arms"] for e in a["protocols"].values() for k in e["kept"]}
                       | {settings["extrapolate_to"]})
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks], rotation=45, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("meta-iterations (log scale; x: fitted prediction)")
        ax.set_ylabel("meta-test accuracy (%), plain")
        ax.set_title(f"CIFAR-FS SS, 5-way {shot}-shot")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
