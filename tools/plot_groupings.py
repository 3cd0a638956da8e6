"""How TGR's groupings split a pool: the members' dissimilarity matrix (from the probe's Fisher embeddings) with
each grouping's partition beside it, one panel per scenario, from the runs' members.json.

    .venv/bin/python tools/plot_groupings.py --results results --scenarios het_sh het_mh \\
        --methods tgr tgr_random tgr_similar --out docs/images/heterogeneity_groups.png

Each method's members.json holds its groups and the dissimilarity matrix it grouped on (dfml/methods/tgr/);
the members' architectures and datasets come from the pool's cards.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", type=Path)
    parser.add_argument("--scenarios", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=["tgr", "tgr_random", "tgr_similar"],
                        help="TGR runs (one per grouping) whose groups are drawn beside the matrix")
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def member_labels(pool_dir: Path) -> list[str]:
    cards = sorted(pool_dir.glob("member_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    labels = []
    for path in cards:
        card = json.loads(path.read_text())
        labels.append(f"{card['index']} {card['model']} {card['dataset'][:4]}")
    return labels


def within_group_dissimilarity(matrix: list[list[float]], groups: list[list[int]]) -> float:
    """The mean dissimilarity of the pairs of members sharing a group (what TGR's grouping maximises)."""
    pairs = [matrix[a][b] for group in groups for i, a in enumerate(group) for b in group[i + 1:]]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def main(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = {(s, m): json.loads((args.results / "metatrain" / s / m / f"shot{args.shot}" / "members.json").read_text())
            for s in args.scenarios for m in args.methods}
    figure, axes = plt.subplots(1, len(args.scenarios), figsize=(6.2 * len(args.scenarios), 5.2), squeeze=False)
    for axis, scenario in zip(axes[0], args.scenarios):
        matrix = np.array(runs[(scenario, args.methods[0])]["groups"]["dissimilarity"])
        n = len(matrix)
        image = axis.imshow(matrix, cmap="viridis")
        labels = member_labels(args.results / "pool" / scenario)
        axis.set_yticks(range(n), labels, fontsize=7)
        axis.set_xticks(range(n), [label.split()[0] for label in labels], fontsize=7)
        # one column of group colours per grouping, right of the matrix
        for k, method in enumerate(args.methods):
            groups = runs[(scenario, method)]["groups"]
            x = n + 0.5 + k
            for g, members in enumerate(groups["members"]):
                for member in members:
                    axis.add_patch(plt.Rectangle((x - 0.45, member - 0.45), 0.9, 0.9, color=f"C{g}", clip_on=False))
            score = within_group_dissimilarity(matrix.tolist(), groups["members"])
            axis.text(x, n - 0.4, f"{groups['grouping']} {score:.3f}", ha="center", va="top", fontsize=7,
                      rotation=90)
        axis.set_xlim(-0.5, n + len(args.methods) + 0.2)
        axis.set_title(f"{scenario}: dissimilarity (probe {runs[(scenario, args.methods[0])]['groups']['probe']}); "
                       "groups right", fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.04)
    figure.suptitle("TGR's groupings: colour = group; under each column its mean within-group dissimilarity",
                    fontsize=10)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    for (scenario, method), run in runs.items():
        groups = run["groups"]
        score = within_group_dissimilarity(groups["dissimilarity"], groups["members"])
        print(f"{scenario} {method}: {groups['grouping']} groups {groups['members']}, mean within-group "
              f"dissimilarity {score:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
