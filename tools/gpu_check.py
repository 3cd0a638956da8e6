"""The GPU check (`make gpu-check`, tools/gpu_check.sh): everything a GPU machine should confirm, in one run.

In order, each step timed, every figure written to one file (``--out``, default results/gpu_check/summary.md
and summary.json):

1. the device (name, memory, torch and CUDA versions);
2. the CUDA tests (the CUDA-parametrised tests of batched evaluation, the task memory and the inversion engine);
3. float32 agreement with the CPU: one Conv4 meta-model scored on the same episodes on the CPU (per episode, the
   reference) and on the device (stacked, CUDA graphs), plain and ICFIL: equal predictions per query;
4. the benchmarks: the training engine against the sequential reference at 20 Conv4 members
   (tools/benchmark.py), and the evaluation preset (600 episodes, 1 and 5 shots, plain and ICFIL);
5. the tiny end-to-end pipeline through Snakemake, every phase, on the device and on the CPU, metrics side by side.

Sized to finish in under 8 minutes on one H200. ``--smoke`` runs the same steps on the CPU at toy sizes (how this
script is tested without a GPU; the numbers then mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dfml  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its threads)
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = ["tests/evaluation/test_batched.py", "tests/meta/test_memory.py", "tests/inversion/test_inversion.py"]
PROJECT_FILES = ("Snakefile", "params.yaml", "workflow", "scripts", "dfml")


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1))
    return info


def run_command(command: list[str], log: Path, env: dict | None = None, timeout: int = 600) -> dict:
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, stdout=handle,
                              stderr=subprocess.STDOUT, timeout=timeout)
    return {"command": " ".join(command), "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "log": str(log)}


def cuda_tests(out: Path, smoke: bool) -> dict:
    """The CUDA tests (they skip on a CPU, which is what ``--smoke`` there checks: the command runs)."""
    return run_command([sys.executable, "-m", "pytest", "-q", "-rs", *CUDA_TESTS, "-k", "cuda"], out / "cuda_tests.log")


def float32_agreement(device: torch.device, smoke: bool) -> dict:
    """Per-query agreement of the device's stacked scoring with the CPU's per-episode scoring (float32)."""
    from dfml.evaluation.batched import score_episodes
    from dfml.evaluation.episodes import build_episode_set
    from dfml.evaluation.icfil import ICFILSettings
    from dfml.evaluation.icfil_scoring import icfil_scorer
    from dfml.evaluation.scoring import learner_scorer
    from dfml.meta import build_learner
    from dfml.models import build_model
    from dfml.studies.bench.evaluation import EvalBenchOptions, synthetic_store

    options = EvalBenchOptions.quick_options() if smoke else EvalBenchOptions(episodes=100)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(Path(tmp), options)
        episodes = build_episode_set(store, "meta_test", way=options.way, shot=5, query=options.query,
                                     n_episodes=options.episodes, seed=1, image_size=options.image_size,
                                     channels=options.channels)
        torch.manual_seed(0)
        cpu_model = build_model("conv4", options.way, options.channels, options.image_size, width=options.width,
                                batch_stats_only=True)
        for calibration in ("plain", "icfil"):
            scores = {}
            for where in ("cpu", str(device)):
                model = cpu_model if where == "cpu" else copy.deepcopy(cpu_model).to(device)
                params = {name: w.detach() for name, w in model.named_parameters()}
                learner = build_learner("maml", inner_lr=0.01, test_steps=1)
                scorer = (learner_scorer(learner, model, params, steps=1) if calibration == "plain" else
                          icfil_scorer(learner, model, params, ICFILSettings(**options.icfil), seed=3, steps=1))
                batched = False if where == "cpu" else "auto"
                scores[where] = score_episodes(scorer, episodes, where, batched=batched)
            pairs = list(zip(scores["cpu"], scores[str(device)]))
            result[calibration] = {"episodes": len(pairs), "equal_accuracy": sum(a == b for a, b in pairs),
                                   "max_abs_difference": max(abs(a - b) for a, b in pairs),
                                   "mean_cpu": sum(scores["cpu"]) / len(pairs),
                                   "mean_device": sum(scores[str(device)]) / len(pairs)}
    return result


def benchmarks(device: torch.device, out: Path, smoke: bool) -> dict:
    engine = [sys.executable, "tools/benchmark.py", "--device", str(device), "--out", str(out / "engine"), "--no-plot"]
    engine += ["--quick"] if smoke else ["--pool-sizes", "20", "--main-pool", "20", "--resnet-pool", "0"]
    evaluation = [sys.executable, "tools/benchmark.py", "--preset", "evaluation", "--device", str(device),
                  "--out", str(out / "evaluation")] + (["--quick"] if smoke else [])
    steps = {"engine": run_command(engine, out / "benchmark_engine.log"),
             "evaluation": run_command(evaluation, out / "benchmark_evaluation.log")}
    for name, folder in (("engine", out / "engine"), ("evaluation", out / "evaluation")):
        table = next((p for p in (folder / "table.md", folder / "table.txt") if p.is_file()), None)
        steps[name]["table"] = table.read_text() if table else None
    return steps


def tiny_params(smoke: bool) -> dict:
    """params.yaml at toy scale on the embedded glyphs: one scenario, two width-8 Conv4 members, every method."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params.update(run_scenarios=["tiny"], training_seeds=[0])
    params["datasets"] = {"glyphs": params["datasets"]["glyphs"]}
    params["models"] = {"conv4": {"arch": "conv4", "width": 8}}
    params["scenarios"] = {"tiny": {"datasets": ["glyphs"], "architectures": ["conv4"], "members_per_dataset": 2,
                                    "classes_per_member": 5, "image_size": 28, "channels": 1}}
    params["pretrain"].update(epochs=1 if smoke else 2)
    params["inversion"].update(warm_start_steps=3, slots_per_class=8)
    params["evaluation"] = {"query": 3, "protocols": {"test1": {"test_steps": 1}}}
    params["metatrain"].update(shots=[1], query=3, iterations=4, eval_every=2, checkpoint_every=2, val_episodes=4,
                               meta_model={"width": 8, "pooling": "flatten"})
    params["metatest"].update(episodes=8 if smoke else 40)
    params["metatest"]["icfil_tuning"]["episodes"] = 4
    params["report"] = {"comparisons": []}
    return params


def tiny_pipeline(device: torch.device, out: Path, smoke: bool) -> dict:
    """The tiny pipeline on ``device`` and on the CPU, from the same params, metrics side by side."""
    runs = {}
    for where in ([str(device)] if device.type == "cpu" else [str(device), "cpu"]):
        workdir = out / f"pipeline_{where.replace(':', '')}"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        for name in PROJECT_FILES:
            src = REPO_ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, workdir / name)
        (workdir / "params.yaml").write_text(yaml.safe_dump(tiny_params(smoke)))
        env = {**os.environ, "DFML_DEVICE": where, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        start = time.perf_counter()
        with (out / f"pipeline_{where.replace(':', '')}.log").open("w") as handle:
            proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all", "--workflow-profile",
                                   "workflow/profiles/local"], cwd=workdir, env=env, stdout=handle,
                                  stderr=subprocess.STDOUT, timeout=900)
        metrics = workdir / "results" / "metrics.json"
        runs[where] = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
                       "metrics": json.loads(metrics.read_text()) if metrics.is_file() else None,
                       "devices": _devices_used(workdir)}
    return runs


def _devices_used(workdir: Path) -> list[str]:
    """The devices the meta-test results say they ran on (what proves the GPU was used)."""
    found = set()
    for path in (workdir / "results" / "metatest").rglob("*.json"):
        found.add(json.loads(path.read_text()).get("device", "?"))
    return sorted(found)


def metrics_rows(runs: dict) -> list[str]:
    """| scenario | method | shot | calibration | <device> | cpu | for every cell both runs have."""
    names = list(runs)
    cells: dict[tuple, dict] = {}
    for where, run in runs.items():
        for scenario, methods in (run.get("metrics") or {}).items():
            if not isinstance(methods, dict):
                continue
            for method, shots in methods.items():
                for shot, calibrations in (shots or {}).items():
                    if not isinstance(calibrations, dict):
                        continue
                    for calibration, cell in calibrations.items():
                        if isinstance(cell, dict) and "accuracy" in cell:
                            cells.setdefault((scenario, method, shot, calibration), {})[where] = cell["accuracy"]
    rows = [f"| scenario | method | shot | calibration | {' | '.join(names)} |", "|" + "---|" * (4 + len(names))]
    for key, values in sorted(cells.items()):
        rows.append("| " + " | ".join(key) + " | " + " | ".join(f"{values.get(n, '-')}" for n in names) + " |")
    return rows


def write_summary(summary: dict, out: Path) -> Path:
    lines = [f"# GPU check ({summary['device']['device']})", "", "```json", json.dumps(summary["device"], indent=2),
             "```", ""]
    for name, step in summary["steps"].items():
        lines.append(f"## {name} ({step.get('seconds', '?')} s)")
        lines.append("")
        body = {k: v for k, v in step.items() if k not in ("table", "runs")}
        lines += ["```json", json.dumps(body, indent=2, default=str), "```", ""]
        for sub in ("engine", "evaluation"):
            if isinstance(step.get(sub), dict) and step[sub].get("table"):
                lines += [f"### {sub}", "", step[sub]["table"], ""]
        if "runs" in step:
            for where, run in step["runs"].items():
                lines.append(f"- {where}: exit {run['returncode']}, {run['seconds']} s, meta-test results on "
                             f"{', '.join(run['devices']) or 'nothing'}")
            lines += [""] + metrics_rows(step["runs"]) + [""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (on CPU: how the script is tested)")
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "agreement", "benchmarks", "pipeline"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("[gpu-check] no CUDA device here; run it on a GPU machine, or --device cpu --smoke")
    out = args.out if args.out.is_absolute() else REPO_ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    summary = {"device": device_info(device), "steps": {}}
    steps = {"tests": lambda: cuda_tests(out, args.smoke),
             "agreement": lambda: float32_agreement(device, args.smoke),
             "benchmarks": lambda: benchmarks(device, out, args.smoke),
             "pipeline": lambda: {"runs": tiny_pipeline(device, out, args.smoke)}}
    for name, step in steps.items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        result = step()
        result.setdefault("seconds", round(time.perf_counter() - start, 1))
        summary["steps"][name] = result
        write_summary(summary, out)  # after every step: a run cut short keeps what it measured
    print(f"[gpu-check] figures in {write_summary(summary, out)}", flush=True)
    failed = sorted(failures(summary["steps"]))
    if failed:
        print(f"[gpu-check] FAILED: {', '.join(failed)} (their logs are named in the summary)", flush=True)
    return 1 if failed else 0


def failures(steps: dict) -> list[str]:
    """The steps (and sub-steps) that exited non-zero or disagree with the CPU."""
    failed = []
    for name, step in steps.items():
        if step.get("returncode", 0) != 0:
            failed.append(name)
        for sub, value in step.items():
            if isinstance(value, dict) and value.get("returncode", 0) != 0:
                failed.append(f"{name}.{sub}")
        for where, run in step.get("runs", {}).items():
            if run["returncode"] != 0 or run["metrics"] is None:
                failed.append(f"{name}.{where}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
