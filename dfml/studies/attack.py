"""The attack study's report: what untrusted pool members cost each method, and whether the learned
member weights find them (METHODS.md 4.2, task-distribution corruption).

Scenarios that are equal apart from their ``untrusted`` key share one honest pool and differ only in the
fraction of untrusted members; with a clean member (fraction 0) they form a *family*, named by its clean
scenario (:func:`attack_families`). Their meta-test episodes are the same, so the accuracy at a fraction is
paired episode by episode with the clean pool's (:func:`accuracy_against_fraction`). A method that learns
member weights writes ``members.json``, each member's final sampling probability; the pool cards'
``truth`` field says which members were untrusted (:func:`separation`).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dfml.data.store import atomic_write_text
from dfml.evaluation.stats import ALPHA, holm_adjust, paired_difference
from dfml.layout import metatrain_run
from dfml.report import LINE_STYLES, episode_fingerprints, method_sort_key, to_csv

HONEST = "honest"
KIND_ORDER = (HONEST, "deceptive_label", "deceptive_accuracy")
KIND_COLOURS = {HONEST: "tab:green", "deceptive_label": "tab:orange", "deceptive_accuracy": "tab:red"}
MOST_DOWN_WEIGHTED = 5
DAGGER = "\u2020"


def untrusted_fraction(entry: dict) -> float:
    """A scenario's untrusted fraction: 0 without an ``untrusted`` key (an honest pool)."""
    return float((entry.get("untrusted") or {}).get("fraction") or 0.0)


def attack_families(scenarios: dict) -> dict[str, list[tuple[str, float]]]:
    """{clean scenario: [(scenario, fraction), ...] by fraction} over scenarios equal apart from ``untrusted``;
    only groups with a clean member and at least one other fraction are families."""
    groups = defaultdict(list)
    for name, entry in sorted(scenarios.items()):
        pool = json.dumps({k: v for k, v in entry.items() if k != "untrusted"}, sort_keys=True)
        groups[pool].append((name, untrusted_fraction(entry)))
    families = {}
    for members in groups.values():
        fractions = [fraction for _, fraction in members]
        if 0.0 not in fractions or len(set(fractions)) < 2:
            continue
        for fraction in set(fractions):
            same = [name for name, f in members if f == fraction]
            if len(same) > 1:
                raise ValueError(f"scenarios {', '.join(same)} are the same pool at untrusted fraction {fraction:g}: "
                                 "the attack report pairs one scenario per fraction, run only one of them")
        clean = next(name for name, fraction in members if fraction == 0.0)
        families[clean] = sorted(members, key=lambda member: member[1])
    return dict(sorted(families.items()))


def fraction_label(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def base_scenario(result: dict) -> str:
    """The configured scenario of a result (dfml.report.load_results appends ":<protocol>" to it when a run
    has several protocols)."""
    return result["scenario"].removesuffix(f":{result.get('protocol')}")


# -- accuracy against fraction ------------------------------------------------------------------------------


def accuracy_against_fraction(results: list[dict], families: dict[str, list[tuple[str, float]]],
                              alpha: float = ALPHA) -> list[dict]:
    """One row per family x method x shot x protocol x calibration x fraction, in percent: the mean accuracy
    and, at fractions above 0, the paired difference to the clean pool (attacked - clean) with its 95% CI and
    p-value, Holm-adjusted over the family's differences. Runs without a clean-pool result are left out."""
    by_key = {(base_scenario(r), r["method"], r["shot"], r.get("protocol"), r["calibration"]): r for r in results}
    rows = []
    for family, members in families.items():
        clean_runs = sorted((k for k in by_key if k[0] == family), key=lambda k: (method_sort_key(k[1]), k[2:]))
        family_rows = []
        for _, method, shot, protocol, calibration in clean_runs:
            clean = by_key[(family, method, shot, protocol, calibration)]
            for scenario, fraction in members:
                attacked = by_key.get((scenario, method, shot, protocol, calibration))
                if attacked is not None:
                    family_rows.append(_fraction_row(family, scenario, fraction, method, shot, protocol,
                                                     calibration, clean, attacked))
        differences = [row for row in family_rows if row["fraction"] > 0]
        for row, p_holm in zip(differences, holm_adjust([row.pop("_p") for row in differences])):
            row["p_holm"] = float(f"{p_holm:.3g}")
            row["significant"] = bool(p_holm < alpha)
        rows += family_rows
    return rows


def _fraction_row(family, scenario, fraction, method, shot, protocol, calibration, clean, attacked) -> dict:
    row = {"family": family, "scenario": scenario, "fraction": fraction, "method": method, "shot": shot,
           "protocol": protocol, "calibration": calibration, "accuracy": round(100 * attacked["mean"], 3),
           "difference": None, "ci95": None, "p_value": None, "p_holm": None, "significant": None,
           "episodes": len(attacked["accuracies"])}
    if fraction == 0:
        return row
    if episode_fingerprints(attacked) != episode_fingerprints(clean):
        raise ValueError(f"attack family {family}: {method} {shot}-shot ({protocol}, {calibration}) was not scored "
                         f"on the same meta-test episodes in {family} and {scenario}; the accuracy drop cannot be "
                         "paired (the scenarios must share datasets, meta-test settings and seed)")
    diff = paired_difference(attacked["accuracies"], clean["accuracies"])
    ci95 = round(100 * diff.ci95, 3) if math.isfinite(diff.ci95) else None
    return {**row, "difference": round(100 * diff.mean, 3), "ci95": ci95, "p_value": float(f"{diff.p_value:.3g}"),
            "_p": diff.p_value}


# -- separation of honest and untrusted members -------------------------------------------------------------


def read_members(path: str | Path, pools_root: str | Path) -> dict:
    """A members.json (results/metatrain/<scenario>/<method>/seed<t>/shot<k>/) with each member's truth kind from
    its pool card (``truth.kind``; honest cards have no ``truth``)."""
    path = Path(path)
    run = json.loads(path.read_text())
    where = metatrain_run(path)
    scenario, method, shot = where["scenario"], where["method"], where["shot"]
    members = []
    for member in run["members"]:
        card = Path(pools_root) / scenario / member["card"]
        if not card.is_file():
            raise FileNotFoundError(f"{path}: member {member['index']} names the pool card {card}, which does not "
                                    "exist (is --pools-root the pool folder of this run?)")
        truth = json.loads(card.read_text()).get("truth") or {}
        members.append({**member, "kind": truth.get("kind", HONEST)})
    return {**run, "scenario": scenario, "method": method, "shot": shot, "members": members}


def separation(run: dict, k: int = MOST_DOWN_WEIGHTED) -> dict:
    """How well a run's final sampling probabilities separate honest (positive) from untrusted members: ROC AUC
    (None, with the reason, when undefined), the mean probability per kind and the ``k`` lowest members."""
    from sklearn.metrics import roc_auc_score  # imported lazily: only attack runs need it

    members = run["members"]
    honest = [m["kind"] == HONEST for m in members]
    if run["selection"] == "uniform":
        auc, note = None, "uniform selection"
    elif all(honest) or not any(honest):
        auc, note = None, "no untrusted members" if all(honest) else "no honest members"
    else:
        auc, note = float(roc_auc_score(honest, [m["probability"] for m in members])), ""
    by_kind = defaultdict(list)
    for m in members:
        by_kind[m["kind"]].append(m["probability"])
    lowest = sorted(members, key=lambda m: (m["probability"], m["index"]))[:k]
    return {"scenario": run["scenario"], "method": run["method"], "shot": run["shot"],
            "selection": run["selection"], "reward": run.get("reward"), "data_free": run.get("data_free", True),
            "events": run.get("events"), "auc": auc, "auc_note": note,
            "mean_probability": {kind: sum(p) / len(p) for kind, p in sorted(by_kind.items(), key=_kind_key)},
            "most_down_weighted": [(m["index"], m["kind"], m["probability"]) for m in lowest],
            "probabilities": [(m["index"], m["kind"], m["probability"]) for m in members]}


def _kind_key(item) -> tuple[int, str]:
    kind = item[0]
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind)


def family_separations(members_paths, pools_root, families) -> dict[str, list[dict]]:
    """{family: [separation of each members.json of its scenarios]}; other scenarios' runs are not read."""
    scenario_family = {scenario: family for family, members in families.items() for scenario, _ in members}
    out = {family: [] for family in families}
    for path in members_paths:
        family = scenario_family.get(metatrain_run(path)["scenario"])
        if family is not None:
            out[family].append(separation(read_members(path, pools_root)))
    return out


# -- markdown -------------------------------------------------------------------------------------------------


def attack_markdown(families: dict[str, list[tuple[str, float]]], accuracy_rows: list[dict],
                    separations: dict[str, list[dict]]) -> list[str]:
    """The "## Untrusted members" section of summary.md: per family, the accuracy each method loses to the
    untrusted members, how well the learned weights find them and which members they down-weighted."""
    lines = ["## Untrusted members", "",
             "Scenarios equal apart from their untrusted members form a family, named by its clean scenario "
             "(METHODS.md 4.2). Meta-test episodes are the same at every fraction, so each drop is paired "
             "episode by episode with the clean pool.", ""]
    for family, members in families.items():
        runs = separations.get(family, [])
        not_data_free = {(s["method"], s["shot"]) for s in runs if not s["data_free"]}
        rows = [r for r in accuracy_rows if r["family"] == family]
        lines += [f"### Family {family}: " + ", ".join(f"{s} ({fraction_label(f)})" for s, f in members), ""]
        lines += _accuracy_table(rows, members, not_data_free)
        lines += _weights_tables(runs, members, not_data_free)
        if not_data_free:
            lines += [f"{DAGGER} read real meta-val episodes during training (members.json: `data_free: false`): "
                      "not data-free.", ""]
    return lines


def _row_label(method: str, shot: int, not_data_free: set) -> str:
    return f"{method}{DAGGER if (method, shot) in not_data_free else ''}"


def _accuracy_table(rows: list[dict], members, not_data_free: set) -> list[str]:
    fractions = [f for _, f in members]
    several_protocols = len({r["protocol"] for r in rows}) > 1
    cells = {(r["method"], r["shot"], r["protocol"], r["calibration"], r["fraction"]): r for r in rows}
    keys = sorted({k[:4] for k in cells}, key=lambda k: (method_sort_key(k[0]), k[1], str(k[2]), k[3]))
    m = sum(r["fraction"] > 0 for r in rows)
    lines = ["accuracy (%) against untrusted fraction: mean on the meta-test episodes and, in brackets, the paired "
             "difference to the clean pool (attacked - clean) +- 95% CI; * significant after Holm's correction "
             f"over the {m} differences of this family (family-wise alpha = {ALPHA:g}).", "",
             "| method | shot | " + ("protocol | " if several_protocols else "") + "calibration | "
             + " | ".join(fraction_label(f) for f in fractions) + " |",
             "|---|---|" + ("---|" if several_protocols else "") + "---|" + "---|" * len(fractions)]
    for method, shot, protocol, calibration in keys:
        row = [_accuracy_cell(cells.get((method, shot, protocol, calibration, f))) for f in fractions]
        lines.append(f"| {_row_label(method, shot, not_data_free)} | {shot} | "
                     + (f"{protocol} | " if several_protocols else "") + f"{calibration} | " + " | ".join(row) + " |")
    return lines + [""]


def _accuracy_cell(row: dict | None) -> str:
    if row is None:
        return "n/a"
    if row["difference"] is None:
        return f"{row['accuracy']:.1f}"
    ci = "inf" if row["ci95"] is None else f"{row['ci95']:.1f}"
    return f"{row['accuracy']:.1f} ({row['difference']:+.1f} +- {ci}){'*' if row['significant'] else ''}"


def _weights_tables(runs: list[dict], members, not_data_free: set) -> list[str]:
    if not runs:
        return ["No method of this family wrote members.json (none selects pool members).", ""]
    fraction_of = dict(members)
    attacked = [(s, f) for s, f in members if f > 0]
    by_run = {(r["method"], r["shot"], r["scenario"]): r for r in runs}
    keys = sorted({(r["method"], r["shot"]) for r in runs}, key=lambda k: (method_sort_key(k[0]), k[1]))
    lines = ["Member weights: ROC AUC of each member's final sampling probability separating honest (positive) "
             "from untrusted members; 0.5 is chance, 1 ranks every honest member above every untrusted one. "
             "\"uniform\": the run samples members uniformly and learns no weights (AUC undefined).", "",
             "| method | shot | " + " | ".join(fraction_label(f) for _, f in attacked) + " |",
             "|---|---|" + "---|" * len(attacked)]
    for method, shot in keys:
        cells = [_auc_cell(by_run.get((method, shot, s))) for s, _ in attacked]
        lines.append(f"| {_row_label(method, shot, not_data_free)} | {shot} | " + " | ".join(cells) + " |")
    weighted = sorted((r for r in runs if r["selection"] != "uniform" and fraction_of[r["scenario"]] > 0),
                      key=lambda r: (method_sort_key(r["method"]), r["shot"], fraction_of[r["scenario"]]))
    if not weighted:
        return lines + ["", "No run in this family learns member weights: none down-weights a member.", ""]
    kinds = sorted({k for r in weighted for k in r["mean_probability"]}, key=lambda k: _kind_key((k,)))
    lines += ["", "Mean final sampling probability per member kind (uniform would give 1/n to each):", "",
              "| method | shot | fraction | " + " | ".join(kinds) + " |", "|---|---|---|" + "---|" * len(kinds)]
    for r in weighted:
        probability = [f"{r['mean_probability'][k]:.4f}" if k in r["mean_probability"] else "-" for k in kinds]
        lines.append(f"| {_row_label(r['method'], r['shot'], not_data_free)} | {r['shot']} | "
                     f"{fraction_label(fraction_of[r['scenario']])} | " + " | ".join(probability) + " |")
    lines += ["", "Most down-weighted members (lowest final sampling probability):", ""]
    for r in weighted:
        named = ", ".join(f"member_{i} ({kind}, {p:.4f})" for i, kind, p in r["most_down_weighted"])
        lines.append(f"- {_row_label(r['method'], r['shot'], not_data_free)} {r['shot']}-shot, "
                     f"{fraction_label(fraction_of[r['scenario']])} "
                     f"({r['scenario']}): {named}")
    return lines + [""]


def _auc_cell(run: dict | None) -> str:
    if run is None:
        return "n/a"
    if run["auc"] is None:
        return "uniform" if run["selection"] == "uniform" else f"- ({run['auc_note']})"
    return f"{run['auc']:.3f}"


# -- CSVs and figures -----------------------------------------------------------------------------------------


def weights_rows(separations: dict[str, list[dict]], families) -> list[dict]:
    fraction_of = {s: f for members in families.values() for s, f in members}
    return [{"family": family, "scenario": r["scenario"], "fraction": fraction_of[r["scenario"]],
             "method": r["method"], "shot": r["shot"], "selection": r["selection"], "reward": r["reward"],
             "data_free": r["data_free"], "events": r["events"],
             "auc": None if r["auc"] is None else round(r["auc"], 4), "auc_note": r["auc_note"],
             **{f"mean_probability_{k}": r["mean_probability"].get(k) for k in KIND_ORDER},
             "most_down_weighted": " ".join(f"{i}:{kind}" for i, kind, _ in r["most_down_weighted"])}
            for family, runs in separations.items() for r in runs]


def plot_attack_accuracy(rows: list[dict], family: str, path: Path, colours: dict[str, tuple]) -> Figure:
    """Accuracy against untrusted fraction, one panel per shot; error bars: the paired 95% CI of the
    difference to the clean pool (none at fraction 0); colour = method, line style = protocol/calibration."""
    rows = [r for r in rows if r["family"] == family]
    shots = sorted({r["shot"] for r in rows}) or [None]
    settings = sorted({(r["protocol"] or "", r["calibration"]) for r in rows})
    styles = {s: LINE_STYLES[i % len(LINE_STYLES)] for i, s in enumerate(settings)}
    methods = sorted({r["method"] for r in rows}, key=method_sort_key)
    figure = Figure(figsize=(4.2 * len(shots) + 1.6, 3.4), dpi=110, layout="constrained")
    for ax, shot in zip(figure.subplots(1, len(shots), squeeze=False)[0], shots):
        for method in methods:
            for setting in settings:
                line = sorted((r for r in rows if (r["method"], r["shot"]) == (method, shot)
                               and ((r["protocol"] or ""), r["calibration"]) == setting), key=lambda r: r["fraction"])
                if line:
                    ax.errorbar([100 * r["fraction"] for r in line], [r["accuracy"] for r in line],
                                yerr=[r["ci95"] if r["ci95"] is not None else math.nan for r in line], capsize=2,
                                marker=".", color=colours[method], ls=styles[setting])
        ax.set_xticks(sorted({100 * r["fraction"] for r in rows}))
        ax.set_title(f"{family}, {shot}-shot")
        ax.set_xlabel("untrusted fraction (%)")
        ax.set_ylabel("accuracy (%)")
    handles = [Line2D([], [], color=colours[m], lw=2, label=m) for m in methods]
    if len(settings) > 1:
        handles += [Line2D([], [], color="0.3", ls=styles[s], label=" ".join(filter(None, s))) for s in settings]
    if handles:
        figure.legend(handles=handles, loc="outside right upper", fontsize=8)
    figure.savefig(path)
    return figure


def plot_attack_weights(runs: list[dict], members, path: Path, colours: dict[str, tuple]) -> Figure:
    """Left: ROC AUC against untrusted fraction per weighted run (dotted: chance, 0.5). Right: every member's
    final sampling probability at the highest fraction, coloured by its truth kind."""
    fraction_of = dict(members)
    weighted = [r for r in runs if r["auc"] is not None]
    shots = sorted({r["shot"] for r in weighted})
    styles = {shot: LINE_STYLES[i % len(LINE_STYLES)] for i, shot in enumerate(shots)}
    figure = Figure(figsize=(9.5, 3.4), dpi=110, layout="constrained")
    auc_ax, probability_ax = figure.subplots(1, 2)
    pairs = sorted({(r["method"], r["shot"]) for r in weighted}, key=lambda k: (method_sort_key(k[0]), k[1]))
    for method, shot in pairs:
        line = sorted((r for r in weighted if (r["method"], r["shot"]) == (method, shot)),
                      key=lambda r: fraction_of[r["scenario"]])
        auc_ax.plot([100 * fraction_of[r["scenario"]] for r in line], [r["auc"] for r in line], marker="o",
                    color=colours.get(method, "0.3"), ls=styles[shot], label=f"{method}/{shot}-shot")
    auc_ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    auc_ax.set_xticks([100 * f for _, f in members if f > 0])
    auc_ax.set_ylim(0, 1.05)
    auc_ax.set_xlabel("untrusted fraction (%)")
    auc_ax.set_ylabel("ROC AUC, honest vs untrusted")
    auc_ax.set_title("member weights")
    if weighted:
        auc_ax.legend(fontsize=7)
    else:
        auc_ax.text(0.5, 0.6, "no run learns member weights", ha="center", transform=auc_ax.transAxes)
    _plot_member_probabilities(probability_ax, weighted, fraction_of)
    figure.savefig(path)
    return figure


def _plot_member_probabilities(ax, weighted: list[dict], fraction_of: dict[str, float]) -> None:
    top = max((fraction_of[r["scenario"]] for r in weighted), default=None)
    runs = sorted((r for r in weighted if fraction_of[r["scenario"]] == top),
                  key=lambda r: (method_sort_key(r["method"]), r["shot"]))
    for x, run in enumerate(runs):
        for i, (_, kind, p) in enumerate(run["probabilities"]):
            ax.scatter(x + 0.3 * ((i % 7) / 6 - 0.5), p, s=12, color=KIND_COLOURS.get(kind, "0.5"))
    ax.set_xticks(range(len(runs)), [f"{r['method']}\n{r['shot']}-shot" for r in runs], fontsize=7)
    ax.set_ylabel("final sampling probability")
    ax.set_title("members" + (f" at {fraction_label(top)}" if top is not None else ""))
    kinds = sorted({k for r in runs for _, k, _ in r["probabilities"]}, key=lambda k: _kind_key((k,)))
    if kinds:
        ax.legend(handles=[Line2D([], [], marker="o", ls="", color=KIND_COLOURS.get(k, "0.5"), label=k)
                           for k in kinds], fontsize=7)


def write_attack_report(results: list[dict], members_paths, scenarios: dict, pools_root, plots: Path,
                        colours: dict[str, tuple]) -> list[str]:
    """Write plots/attack_*.csv|png and return the summary.md section; nothing (and []) without a family among
    the scenarios that have results."""
    scored = {base_scenario(r) for r in results}
    families = attack_families({name: entry for name, entry in scenarios.items() if name in scored})
    if not families:
        return []
    rows = accuracy_against_fraction(results, families)
    separations = family_separations(members_paths, pools_root, families)
    atomic_write_text(plots / "attack_accuracy.csv", to_csv(rows))
    atomic_write_text(plots / "attack_weights.csv", to_csv(weights_rows(separations, families)))
    for family, members in families.items():
        plot_attack_accuracy(rows, family, plots / f"attack_accuracy_{family}.png", colours)
        plot_attack_weights(separations[family], members, plots / f"attack_weights_{family}.png", colours)
    return attack_markdown(families, rows, separations)
