"""The scaling study's two steps (workflow/rules/scaling.smk; the analysis: dfml/studies/scaling.py):

  select  per protocol, the kept model meta-val selects among an arm's kept models -> selection.json
  report  every kept model's scores, the selection beside the official rule, fits, predictions and verdicts
          -> report.md, scaling.json, scaling.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dfml.data.store import atomic_write_text
from dfml.studies.scaling import analyse, load_arms, select
from dfml.studies.scaling_report import figure, markdown


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    chooser = steps.add_parser("select", help="the meta-val selection among one arm's kept models")
    chooser.add_argument("--results", nargs="+", type=Path, required=True, help="the arm's <split>_plain.json files")
    chooser.add_argument("--out", type=Path, required=True)
    report = steps.add_parser("report", help="the study's report, numbers and figure")
    report.add_argument("--plain", nargs="+", type=Path, required=True, help="the kept models' <split>_plain.json")
    report.add_argument("--icfil", nargs="*", type=Path, default=[], help="their meta_test_icfil.json")
    report.add_argument("--pool-cards", nargs="*", type=Path, default=[], help="the pool members' cards")
    report.add_argument("--settings-json", default="{}", help="the config's scaling section as JSON")
    report.add_argument("--out-dir", type=Path, default=Path("results/scaling"))
    return parser


def main(args: argparse.Namespace) -> int:
    if args.step == "select":
        arms = load_arms(args.results)
        if len(arms) != 1:
            raise SystemExit(f"select takes one arm's results, got {len(arms)} arms: "
                             + ", ".join(f"{a.scenario}/{a.method}/{a.run}/shot{a.shot}" for a in arms))
        chosen = select(arms[0])
        atomic_write_text(args.out, json.dumps({"selected_on": "meta_val", "selected": chosen}, indent=2) + "\n")
        print(f"{arms[0].name}: " + ", ".join(f"{p} iteration {c['iteration']} ({100 * c['meta_val']:.2f}%)"
                                              for p, c in chosen.items()))
        return 0
    try:
        analysis = analyse(load_arms(args.plain), load_arms(args.icfil), json.loads(args.settings_json))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"[scaling] {err}") from None
    pool = [json.loads(p.read_text()) for p in args.pool_cards]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "scaling.json", json.dumps(analysis, indent=2) + "\n")
    atomic_write_text(args.out_dir / "report.md", "\n".join(markdown(analysis, pool)) + "\n")
    figure(analysis, args.out_dir / "scaling.png")
    print(f"report -> {args.out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
