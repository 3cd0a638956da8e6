"""Benchmark the PURER meta-iteration: the project's engine vs a sequential reference (issue 8).

One command measures, in the same run and on the same device: the meta-iteration (pool inversion
step + MAML meta-batch step) with the engine and with the sequential reference (per-member and
per-task Python loops, teachers resident), their ratio, the achieved FLOP/s against the device's
measured matmul peak, the components alone (pool inversion, meta-batch, one ICFIL test episode),
every engine path on the device, scaling with pool size (Conv4) and architecture (ResNet-18), peak
memory per configuration, equality with the reference, a profile and what bounds each number.

    .venv/bin/python tools/benchmark.py                 # full run, results/benchmark/
    .venv/bin/python tools/benchmark.py --quick         # tiny sizes, seconds (smoke test)
    .venv/bin/python tools/benchmark.py --device cuda --pool-sizes 5 20 100 --repeats 10
    .venv/bin/python tools/benchmark.py --preset cifarfs  # CIFAR-FS SS pool alone: 13 Conv4, 3 x 32 x 32
    .venv/bin/python tools/benchmark.py --preset evaluation  # batched evaluation vs the per-episode path

Writes results.json, results.csv, table.txt and scaling.png into --out and prints the table (the evaluation
preset: results.json and table.md into --out, default results/benchmark/evaluation).
"""

from __future__ import annotations

import dfml  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its threads)

import argparse
from dataclasses import replace
from pathlib import Path

from dfml.studies.bench.suite import PRESETS, BenchOptions, run_benchmark


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat, in-process (smoke test)")
    parser.add_argument("--preset", choices=sorted([*PRESETS, "evaluation"]), default=None,
                        help="measure a named pool alone (cifarfs: the CIFAR-FS SS pool, 13 Conv4 teachers on "
                             "3-channel images); explicit options below still apply. evaluation: batched "
                             "evaluation against the per-episode path (600-episode meta-test, 1 and 5 shots, plain "
                             "and ICFIL; dfml/studies/bench/evaluation.py)")
    parser.add_argument("--episodes", type=int, default=None, help="evaluation preset: episodes per cell (600)")
    parser.add_argument("--pool-sizes", type=int, nargs="+", default=None,
                        help="Conv4 pool sizes (default 5 10 20 50 100)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5)")
    parser.add_argument("--main-pool", type=int, default=None, help="pool size of the component/profile run (20)")
    parser.add_argument("--resnet-pool", type=int, default=None, help="ResNet-18 pool size (5; 0: none)")
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    parser.add_argument("--in-process", action="store_true", help="no subprocess per configuration")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--report-only", type=Path, default=None, metavar="RESULTS_JSON",
                        help="rewrite table, CSV and plot from an earlier results.json (into --out), measure nothing")
    return parser


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    options = BenchOptions.quick_options() if args.quick else BenchOptions()
    if args.preset:
        options = options.with_preset(args.preset)
    overrides = {"device": args.device, "out": args.out, "shot": args.shot}
    for name in ("repeats", "main_pool", "resnet_pool", "threads"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.pool_sizes:
        overrides["pool_sizes"] = tuple(args.pool_sizes)
    if args.in_process:
        overrides["isolate"] = False
    if args.no_profile:
        overrides["profile"] = False
    if args.no_plot:
        overrides["plot"] = False
    return replace(options, **overrides)


def evaluation_options_from_args(args: argparse.Namespace):
    from dfml.studies.bench.evaluation import EvalBenchOptions

    options = EvalBenchOptions.quick_options() if args.quick else EvalBenchOptions()
    overrides = {"device": args.device, "threads": args.threads}
    if args.out != Path("results/benchmark"):
        overrides["out"] = args.out
    if args.episodes:
        overrides["episodes"] = args.episodes
    return replace(options, **overrides)


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.preset == "evaluation":
        from dfml.studies.bench.evaluation import evaluation_table, run_evaluation_benchmark

        results = run_evaluation_benchmark(evaluation_options_from_args(args))
        print(evaluation_table(results))
        return results
    if args.report_only:
        import json

        from dfml.studies.bench.report import write_outputs

        results = json.loads(args.report_only.read_text())
        write_outputs(results, options_from_args(args))
        return results
    return run_benchmark(options_from_args(args))


if __name__ == "__main__":
    main()
