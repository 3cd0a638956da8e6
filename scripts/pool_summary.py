"""Summarise a pool: one row per member (architecture, dataset, classes, held-out accuracy) as CSV + Markdown,
and the meta-train classes left out of the pool as cross-dataset concept leaks (dfml/leakage.py). A pool with
untrusted members (dfml/untrusted.py) also shows what each member truly is next to what its card claims: the
report may read the truth that methods never see."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from dfml.data.store import atomic_write_text
from dfml.pool import PoolMember, load_pool, member_paths, read_truth

COLUMNS = ["member", "model", "arch", "dataset", "classes", "heldout_accuracy", "best_epoch", "train_seconds",
           "excluded_pool_classes"]
TRUTH_COLUMNS = ["truth", "true_heldout_accuracy"]  # after heldout_accuracy, for a pool with untrusted members


def summary_rows(pool: list[PoolMember]) -> list[dict]:
    rows = []
    for member in pool:
        card = member.card
        rows.append({"member": card["index"], "model": card["model"], "arch": card["architecture"]["name"],
                     "dataset": card["dataset"], "classes": " ".join(card["classes"]),
                     "heldout_accuracy": card["heldout_accuracy"], "best_epoch": card.get("best_epoch", ""),
                     "train_seconds": card.get("train_seconds", ""),
                     "excluded_pool_classes": len(card.get("excluded_classes", []))})
    return rows


def add_truth(rows: list[dict], pool_dir: Path) -> list[str]:
    """Each row's truth kind and true held-out accuracy (an honest member's is the one it claims); the columns
    to show: the truth columns only when some member is untrusted."""
    truths = [read_truth(member_paths(pool_dir, row["member"])[1]) for row in rows]
    if not any(truths):
        return COLUMNS
    for row, truth in zip(rows, truths):
        row["truth"] = truth["kind"] if truth else "honest"
        row["true_heldout_accuracy"] = truth["true_heldout_accuracy"] if truth else row["heldout_accuracy"]
    at = COLUMNS.index("heldout_accuracy") + 1
    return COLUMNS[:at] + TRUTH_COLUMNS + COLUMNS[at:]


def excluded_classes(pool: list[PoolMember]) -> list[dict]:
    """The classes left out of the pool as leaks, once per dataset (every member of a dataset lists them)."""
    excluded: dict[str, list[dict]] = {}
    for member in pool:
        excluded.setdefault(member.card["dataset"], member.card.get("excluded_classes", []))
    return [entry for entries in excluded.values() for entry in entries]


def exclusions_markdown(excluded: list[dict]) -> list[str]:
    """A table with one row per (dataset, family): its groups, its classes, and why they were left out."""
    if not excluded:
        return []
    rows: dict[tuple[str, str], list[dict]] = {}
    for entry in excluded:
        rows.setdefault((entry["dataset"], entry["family"]), []).append(entry)
    lines = ["## Classes left out of the pool (cross-dataset concept leaks)", "",
             f"{len(excluded)} meta-train classes whose script family is among another dataset's meta-test "
             "classes (scenario option `cross_dataset_leaks: exclude`); members were assigned from the rest.", "",
             "| dataset | family | groups | count | why | classes |", "|---|---|---|---|---|---|"]
    for (dataset, family), entries in rows.items():
        groups = sorted({entry["group"] for entry in entries})
        names = " ".join(entry["class"] for entry in entries)
        lines.append(f"| {dataset} | {family} | {', '.join(groups)} | {len(entries)} | {entries[0]['reason']} "
                     f"| {names} |")
    return lines + [""]


def to_markdown(rows: list[dict], title: str, excluded: list[dict] = (), columns: list[str] = COLUMNS) -> str:
    lines = [f"# Pool {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    mean = sum(r["heldout_accuracy"] for r in rows) / len(rows)
    lines += ["", f"{len(rows)} members, mean held-out accuracy {mean:.3f}" + untrusted_note(rows), ""]
    return "\n".join(lines + exclusions_markdown(list(excluded)))


def untrusted_note(rows: list[dict]) -> str:
    untrusted = [row for row in rows if row.get("truth", "honest") != "honest"]
    if not untrusted:
        return ""
    return f" as claimed; {len(untrusted)} of them untrusted (the truth column: what each really is)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pool_dir")
    parser.add_argument("--csv", required=True)
    parser.add_argument("--markdown", required=True)
    args = parser.parse_args(argv)
    pool = load_pool(args.pool_dir)  # loading validates every card against its weights
    rows = summary_rows(pool)
    columns = add_truth(rows, Path(args.pool_dir))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    markdown = to_markdown(rows, Path(args.pool_dir).name, excluded_classes(pool), columns)
    atomic_write_text(Path(args.csv), buffer.getvalue())
    atomic_write_text(Path(args.markdown), markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
