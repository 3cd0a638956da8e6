"""Build the report: results/metrics.json, results/plots/*.csv|png, results/summary.md and, per
scenario, a picture of pseudo images next to real images of the same classes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import dfml  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its threads)
import numpy as np

from dfml.data import DatasetStore
from dfml.data.grid import sample_class_images, save_array_grid
from dfml.inversion import PseudoDataset
from dfml.layout import metatrain_run
from dfml.replicates import aggregate
from dfml.report import load_results, ordered_methods, read_curve, run_colours, training_cost, write_report
from dfml.scenario import pseudo_to_pictures
from dfml.studies.attack import write_attack_report

REPRODUCE = "make run   (or: snakemake --cores all --workflow-profile workflow/profiles/local)"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", nargs="+", required=True, help="meta-test result JSON files")
    parser.add_argument("--curves", nargs="*", default=[], help="metatrain curve.csv files")
    parser.add_argument("--pseudo", nargs="*", default=[], help="pseudo_final.safetensors, one per scenario")
    parser.add_argument("--out", default="results")
    parser.add_argument("--metrics", default="results/metrics.json")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--reproduce", default=REPRODUCE)
    parser.add_argument("--method-order", default="[]",
                        help="the methods' order in tables and figures, as JSON: params methods, then "
                        "metatest.baselines (dfml.report.method_order); [] = PURER, the other trained methods, "
                        "the baselines, each by name")
    parser.add_argument("--comparisons-json", default="[]",
                        help="pre-registered [a, b] method pairs (params report.comparisons); [] = purer vs every other")
    parser.add_argument("--members", nargs="*", default=[],
                        help="members.json files of the methods that select pool members (the attack study)")
    parser.add_argument("--scenarios-json", default="{}",
                        help="the params `scenarios` block (scenarios equal apart from `untrusted` form attack "
                        "families)")
    parser.add_argument("--pools-root", default="results/pool", help="pool folders, whose cards say which members "
                        "were untrusted")
    return parser


def curve_name(path: str, protocol: str | None = None, with_seed: bool = False) -> str:
    """results/metatrain/<scenario>/<method>/seed<t>/shot<k>/curve.csv -> <scenario>/<method>/<k>shot, with the
    scenario named "<scenario>:<protocol>" when the run has several protocols (as dfml.report does) and
    "@seed<t>" after the shot when it has several training seeds."""
    run = metatrain_run(path)
    scenario = run["scenario"] if protocol is None else f"{run['scenario']}:{protocol}"
    seed = f"@seed{run['training_seed']}" if with_seed else ""
    return f"{scenario}/{run['method']}/{run['shot']}shot{seed}"


def read_curves(paths: list[str]) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    several_seeds = len({metatrain_run(path)["training_seed"] for path in paths}) > 1
    for path in paths:
        per_protocol = read_curve(path)
        for protocol, points in per_protocol.items():
            curves[curve_name(path, protocol if len(per_protocol) > 1 else None, several_seeds)] = points
    return curves


def pseudo_vs_real(pseudo_path: str, data_root: str, out: Path, per_class: int = 6, n_classes: int = 6) -> None:
    """Rows alternate: pseudo images of a class, then real images of the same class."""
    pseudo = PseudoDataset.load(pseudo_path)
    names = pseudo.class_names[:: max(1, pseudo.num_classes // n_classes)][:n_classes]
    stores = {name.split("/", 1)[0]: None for name in names}
    stores = {d: DatasetStore(Path(data_root) / d) for d in stores}
    size = pseudo.image_shape[-1]
    fake = pseudo_to_pictures(pseudo, stores, names, per_class)
    rows, labels = [], []
    for name, fake_row in zip(names, fake):
        dataset, cls = name.split("/", 1)
        real = sample_class_images(stores[dataset], [cls], per_class)[0]
        rows += [fake_row, resize_like(real, size, fake_row.shape[-1])]
        labels += [f"{name} (pseudo)", f"{name} (real)"]
    save_array_grid(np.stack(rows), labels, out)


def resize_like(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main(args: argparse.Namespace) -> int:
    with ordered_methods(json.loads(args.method_order)):
        return write(args)


def write(args: argparse.Namespace) -> int:
    results = load_results(args.results)
    curves = read_curves(args.curves)
    out = Path(args.out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    attack = write_attack_report(aggregate(results), args.members, json.loads(args.scenarios_json), args.pools_root,
                                 out / "plots", run_colours(results, curves))
    write_report(results, curves, out, Path(args.metrics), args.reproduce, json.loads(args.comparisons_json),
                 costs=[training_cost(path) for path in args.curves], sections=attack)
    for path in args.pseudo:
        scenario = metatrain_run(path)["scenario"]
        pseudo_vs_real(path, args.data_root, out / "plots" / f"pseudo_vs_real_{scenario}.png")
    print((out / "summary.md").read_text())
    print(f"[report] summary: {out / 'summary.md'}  metrics: {args.metrics}  figures: {out / 'plots'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
