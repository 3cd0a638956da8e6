"""Summarise a pool: one row per member (architecture, dataset, classes, held-out accuracy) as CSV + Markdown."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from dfml.data.store import atomic_write_text
from dfml.pool import load_pool

COLUMNS = ["member", "model", "arch", "dataset", "classes", "heldout_accuracy", "best_epoch", "train_seconds"]


def summary_rows(pool_dir: str) -> list[dict]:
    rows = []
    for member in load_pool(pool_dir):  # loading validates every card against its weights
        card = member.card
        rows.append({"member": card["index"], "model": card["model"], "arch": card["architecture"]["name"],
                     "dataset": card["dataset"], "classes": " ".join(card["classes"]),
                     "heldout_accuracy": card["heldout_accuracy"], "best_epoch": card["best_epoch"],
                     "train_seconds": card.get("train_seconds", "")})
    return rows


def to_markdown(rows: list[dict], title: str) -> str:
    lines = [f"# Pool {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    mean = sum(r["heldout_accuracy"] for r in rows) / len(rows)
    lines += ["", f"{len(rows)} members, mean held-out accuracy {mean:.3f}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pool_dir")
    parser.add_argument("--csv", required=True)
    parser.add_argument("--markdown", required=True)
    args = parser.parse_args(argv)
    rows = summary_rows(args.pool_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(args.csv), buffer.getvalue())
    atomic_write_text(Path(args.markdown), to_markdown(rows, Path(args.pool_dir).name))
    print(to_markdown(rows, Path(args.pool_dir).name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
