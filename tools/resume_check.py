"""Check that a meta-training killed mid-way and resumed joins the uninterrupted run, on a study's own settings
and data (its pool and pseudo data): run A uninterrupted, run B SIGKILLed after --kill-after iterations (past
its last periodic checkpoint) and rerun; compare their curves (wall times aside), kept models and selected
models, bit for bit. Exit status 1 when they differ.

  python tools/resume_check.py --project ../scaling --configfile configs/scaling.yaml --method purer --shot 1 \\
      --iterations 300 --kill-after 150 --keep 100 200 300
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path("."), help="the study's checkout (its code and results)")
    parser.add_argument("--configfile", action="append", default=[], help="the study's config (relative to --project)")
    parser.add_argument("--scenario", default="cifarfs_ss")
    parser.add_argument("--method", default="purer")
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="the training seed whose warm start is used")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--kill-after", type=int, default=150, help="SIGKILL run B after this many iterations")
    parser.add_argument("--keep", type=int, nargs="*", default=[100, 200, 300])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    return parser


def command(args, workdir: Path, name: str, overlay: Path) -> list[str]:
    results = args.project / "results"
    pseudo = results / "synthetic" / args.scenario / f"seed{args.seed}" / "pseudo.safetensors"
    configs = [x for c in args.configfile for x in ("--configfile", str(args.project / c))]
    return [sys.executable, str(args.project / "scripts" / "metatrain.py"), "--scenario", args.scenario,
            "--method", args.method, "--shot", str(args.shot), "--pool", str(results / "pool" / args.scenario),
            "--pseudo", str(pseudo), "--warm-start", str(pseudo.with_name("inversion.json")),
            "--out", str(workdir / name), "--checkpoint", str(workdir / f"{name}.ckpt.safetensors"),
            "--threads", "1", "--params", str(args.project / "params.yaml"), *configs, "--configfile", str(overlay),
            "--data-root", str(args.project / "data")]


def curve(path: Path) -> list[dict]:
    with open(path) as handle:
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in csv.DictReader(handle)]


def rows_done(out: Path) -> int:
    path = out / "curve.csv"
    return max(0, len(path.read_text().splitlines()) - 2) if path.is_file() else 0


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="resume_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    overlay = workdir / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "metatrain": {"iterations": args.iterations, "checkpoint_every": args.checkpoint_every,
                      "eval_every": args.iterations, "keep_checkpoints": args.keep},
        "methods": {args.method: {"iterations": args.iterations}}}))
    env = {**os.environ, "PYTHONPATH": str(args.project.resolve()), "OMP_WAIT_POLICY": "PASSIVE", "DFML_DEVICE": "cpu"}
    logs = {name: open(workdir / f"{name}.log", "a") for name in ("A", "B")}
    start = time.perf_counter()
    a = subprocess.Popen(command(args, workdir, "A", overlay), env=env, stdout=logs["A"], stderr=subprocess.STDOUT)
    b = subprocess.Popen(command(args, workdir, "B", overlay), env=env, stdout=logs["B"], stderr=subprocess.STDOUT)
    while rows_done(workdir / "B") < args.kill_after:
        if b.poll() is not None:
            raise SystemExit(f"run B ended before iteration {args.kill_after}: see {workdir / 'B.log'}")
        time.sleep(0.05)
    b.send_signal(signal.SIGKILL)
    b.wait()
    killed_at = rows_done(workdir / "B")
    b = subprocess.run(command(args, workdir, "B", overlay), env=env, stdout=logs["B"], stderr=subprocess.STDOUT)
    if a.wait() != 0 or b.returncode != 0:
        raise SystemExit(f"a run failed: see {workdir / 'A.log'} and {workdir / 'B.log'}")
    checks = {"curve (wall times aside)": curve(workdir / "A" / "curve.csv") == curve(workdir / "B" / "curve.csv")}
    for iteration in args.keep:
        name = f"kept/iter{iteration}/meta_model.safetensors"
        checks[f"kept model {iteration}"] = same_tensors(workdir / "A" / name, workdir / "B" / name)
    for protocol in sorted(p.name for p in (workdir / "A").iterdir() if (p / "meta_model.safetensors").is_file()):
        checks[f"selected model {protocol}"] = same_tensors(workdir / "A" / protocol / "meta_model.safetensors",
                                                            workdir / "B" / protocol / "meta_model.safetensors")
    resumed = re.findall(r"resuming from \S+ at meta-iteration \d+", (workdir / "B.log").read_text())
    print(f"{args.method} {args.shot}-shot, {args.iterations} iterations: run B killed after {killed_at} iterations, "
          f"{resumed[-1] if resumed else 'NOT resumed'}; {time.perf_counter() - start:.0f} s; {workdir}")
    for name, ok in checks.items():
        print(f"  {name}: {'identical' if ok else 'DIFFERS'}")
    return 0 if resumed and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
