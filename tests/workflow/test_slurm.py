"""The tiny pipeline on a real SLURM cluster through Snakemake's slurm executor and the project's profile.

Needs a SLURM controller that answers (`scontrol ping`). CI brings up a one-node cluster on loopback
with a fake GPU gres (.ci/slurm/start.sh, root) before `make test`; without a cluster this module is
skipped with the reason, unless DFML_REQUIRE_SLURM=1 (CI sets it), which turns the skip into a failure.

One SLURM run of the default target (workflow/profiles/slurm, partition and GPU type adapted to the
cluster) and, side by side, one plain local run (`snakemake --cores 2`) of the same tiny configuration
in a second copy. While the SLURM run goes, a watcher records every job of the run (squeue keeps them
MinJobAge seconds) and cancels the purer meta-training job once, mid-way (`scancel`: SIGTERM, as on
preemption); Snakemake's retry resubmits it and it resumes from the checkpoint written on SIGTERM.
Asserted: one SLURM job per pool member, GPU rules requested a GPU (--gpus=<type>:1) and CPU rules none,
the cancelled job resumed, and the results (meta-models, metrics.json when the workflow builds it) are
identical to the local run's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO_ROOT, copy_project, tiny_omniglot_params

pytestmark = pytest.mark.slow

PROFILE = REPO_ROOT / "workflow" / "profiles" / "slurm" / "config.yaml"
GPU_RULES = ["invert_pool", "metatrain"]
CPU_RULES = ["prepare_dataset", "pretrain_model"]
ITERATIONS = 60  # long enough (a few seconds) to cancel the meta-training job mid-way
CANCEL_AFTER_ROWS = 4  # curve rows (iterations) before the watcher cancels the purer job
TIMEOUT = 1200


def run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def controller_problem() -> str | None:
    """None when a SLURM controller answers, else why not."""
    for cmd in (["scontrol", "ping"], ["sinfo", "-h", "-o", "%P %a %G %c"]):
        if shutil.which(cmd[0]) is None:
            return f"`{cmd[0]}` is not installed"
        try:
            proc = run(cmd, timeout=20)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out"
        if proc.returncode != 0 or (cmd[1] == "ping" and "UP" not in proc.stdout):
            said = (proc.stdout + proc.stderr).strip().splitlines()
            return f"`{' '.join(cmd)}` failed: {said[-1] if said else f'exit code {proc.returncode}'}"
    return None


PROBLEM = controller_problem()
if PROBLEM is not None:
    message = (f"no SLURM cluster answers ({PROBLEM}); start the one-node test cluster with "
               f"`sudo .ci/slurm/start.sh` to run this test")
    if os.environ.get("DFML_REQUIRE_SLURM") == "1":
        pytest.fail(f"DFML_REQUIRE_SLURM=1 but {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def cluster() -> dict:
    """The default partition, its GPU type (from the gres, e.g. gpu:fake:2) and CPUs per node."""
    lines = [line.split() for line in run(["sinfo", "-h", "-o", "%P %a %G %c"]).stdout.splitlines()]
    if not lines:
        pytest.fail("sinfo lists no partition: the test cluster answered at collection but is gone now "
                    "(stopped mid-run?)", pytrace=False)
    default = next((line for line in lines if line[0].endswith("*")), lines[0])
    gres = re.search(r"gpu:([A-Za-z0-9_.]+):(\d+)", default[2])
    return {"partition": default[0].rstrip("*"), "gpu_model": gres.group(1) if gres else None,
            "gpus": int(gres.group(2)) if gres else 0, "cpus": int(default[3].rstrip("+"))}


def tiny_params() -> dict:
    # checkpoint_every > iterations: the only checkpoint a cancelled job can resume from is its SIGTERM one.
    params = tiny_omniglot_params(7, pretrain_epochs=1, iterations=ITERATIONS, eval_every=10, checkpoint_every=1000,
                                  val_episodes=5)
    params["run_methods"] = ["purer", "purer_ei"]  # the cluster's mechanics, not every method, are tested here
    for method in params["methods"].values():
        if method["algorithm"] == "purer" and method.get("eci", True):
            method.update(warmup=2, patience=2)
    if "metatest" in params:  # the meta-test phase, when the workflow has it: as few jobs as it goes
        small = {"episodes": 5, "query": 3, "baselines": [], "calibrations": ["plain"]}
        params["metatest"].update({k: v for k, v in small.items() if k in params["metatest"]})
    return params


def adapted_profile(info: dict, path: Path) -> Path:
    """The project's slurm profile with the SITE values replaced by the test cluster's."""
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    profile["default-resources"]["slurm_partition"] = info["partition"]
    profile["default-resources"].pop("slurm_account", None)
    for rule, resources in profile.get("set-resources", {}).items():
        if "slurm_partition" in resources:
            resources["slurm_partition"] = info["partition"]
        if "gpu_model" in resources:
            resources["gpu_model"] = info["gpu_model"]
        if "cpus_per_gpu" in resources:
            resources["cpus_per_gpu"] = 1
    profile.update({
        "slurm-status-command": "squeue",  # no accounting database on the test cluster
        "slurm-no-account": True,
        "slurm-keep-successful-logs": True,  # the evidence: one log per SLURM job
        # first status check after 8 s, then +10 s while nothing finished: most tiny jobs take 15-25 s
        "slurm-init-seconds-before-status-checks": 8,
        "latency-wait": 5,
    })
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(profile))
    return path


def job_env(workdir: Path) -> dict:
    # PYTHONPATH: jobs import the copy's dfml (exported to SLURM jobs by sbatch --export=ALL).
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(workdir), "DFML_DEVICE": "cpu", "OMP_WAIT_POLICY": "PASSIVE"}


class Watcher(threading.Thread):
    """Records the SLURM jobs of the run (id -> state, comment, TRES per job) and cancels the purer
    meta-training job once, after CANCEL_AFTER_ROWS iterations."""

    def __init__(self, workdir: Path):
        super().__init__(daemon=True)
        self.workdir = workdir
        self.jobs: dict[str, dict] = {}
        self.earlier = {job["id"] for job in self.snapshot()}  # jobs of earlier runs, still listed
        self.cancelled: str | None = None
        self.cancelled_at_rows = 0
        self.stop = threading.Event()

    def snapshot(self) -> list[dict]:
        out = run(["squeue", "-t", "all", "-h", "-O",
                   "JobID:20,State:20,TimeLimit:20,MinMemory:20,Comment:250,tres-per-job:60"]).stdout
        rows = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[4].startswith("rule_"):
                rows.append({"id": fields[0], "state": fields[1], "time_limit": fields[2], "memory": fields[3],
                             "comment": fields[4], "tres": fields[5] if len(fields) > 5 else ""})
        return rows

    def curve_rows(self) -> int:
        curves = list((self.workdir / "results" / "checkpoints").glob("tiny/purer/seed0/shot*.curve.csv"))
        return max((len(c.read_text().splitlines()) - 1 for c in curves), default=0)

    def run(self) -> None:
        while not self.stop.is_set():
            self.record()
            if self.cancelled is None and (rows := self.curve_rows()) >= CANCEL_AFTER_ROWS:
                running = [j for j in self.jobs.values() if j["state"] == "RUNNING"
                           and re.fullmatch(r"rule_metatrain_wildcards_tiny_purer_\d+_\d+", j["comment"])]
                if running:
                    run(["scancel", running[0]["id"]])
                    self.cancelled, self.cancelled_at_rows = running[0]["id"], rows
            time.sleep(0.5)
        self.record()

    def record(self) -> None:
        for job in self.snapshot():
            if job["id"] not in self.earlier:
                self.jobs.setdefault(job["id"], {}).update(job)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    info = cluster()
    if not info["gpu_model"]:
        pytest.skip(f"partition {info['partition']} offers no GPU gres (gpu:<type>:<n>): GPU rules cannot be "
                    "scheduled; the CI test cluster has a fake one")
    if info["cpus"] < 2:
        pytest.skip(f"partition {info['partition']} nodes have {info['cpus']} CPU; the tiny run needs 2")
    root = tmp_path_factory.mktemp("slurm")
    params = tiny_params()
    (root / "slurm").mkdir()
    (root / "local").mkdir()
    on_slurm = copy_project(root / "slurm", params)
    local = copy_project(root / "local", params)
    profile = adapted_profile(info, root / "profile")

    started = time.monotonic()
    local_proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "2"], cwd=local,
                                  env=job_env(local), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = Watcher(on_slurm)
    watcher.start()
    try:
        slurm_proc = subprocess.run([sys.executable, "-m", "snakemake", "--workflow-profile", str(profile)],
                                    cwd=on_slurm, env=job_env(on_slurm), capture_output=True, text=True,
                                    timeout=TIMEOUT)
    finally:
        watcher.stop.set()
        watcher.join(timeout=60)
    slurm_seconds = time.monotonic() - started
    local_out, _ = local_proc.communicate(timeout=TIMEOUT)
    slurm_out = slurm_proc.stdout + slurm_proc.stderr
    assert slurm_proc.returncode == 0, f"snakemake on SLURM failed:\n{slurm_out[-6000:]}"
    assert local_proc.returncode == 0, f"local snakemake failed:\n{local_out[-4000:]}"
    print(f"[test_slurm] SLURM run {slurm_seconds:.0f}s, {len(watcher.jobs)} jobs; cancelled {watcher.cancelled}")
    return {"slurm": on_slurm, "local": local, "watcher": watcher, "log": slurm_out, "info": info}


def jobs_of(runs, rule: str) -> list[dict]:
    return [j for j in runs["watcher"].jobs.values() if j["comment"].startswith(f"rule_{rule}_wildcards_")]


def test_pool_members_ran_as_separate_slurm_jobs(runs):
    members = jobs_of(runs, "pretrain_model")
    assert sorted(j["comment"] for j in members) == ["rule_pretrain_model_wildcards_tiny_0",
                                                     "rule_pretrain_model_wildcards_tiny_1"]
    assert len({j["id"] for j in members}) == 2 and all(j["state"] == "COMPLETED" for j in members)
    for member in (0, 1):  # the plugin's per-job logs, named by SLURM job id
        logs = list((runs["slurm"] / ".snakemake" / "slurm_logs" / "rule_pretrain_model" / f"tiny_{member}").glob(
            "*.log"))
        assert [p.stem for p in logs] == [j["id"] for j in members if j["comment"].endswith(f"_{member}")]


def test_gpu_rules_requested_a_gpu_and_cpu_rules_none(runs):
    gpu = runs["info"]["gpu_model"]
    for rule in GPU_RULES:
        jobs = jobs_of(runs, rule)
        assert jobs, f"no SLURM job for {rule}"
        assert all(j["tres"] == f"gres:gpu:{gpu}:1" for j in jobs), jobs
    for rule in CPU_RULES:
        jobs = jobs_of(runs, rule)
        assert jobs and all("gpu" not in j["tres"] for j in jobs), jobs


def minutes(time_limit: str) -> int:
    parts = [int(p) for p in re.split(r"[-:]", time_limit)]  # [D-]HH:MM:SS or MM:SS
    days = parts.pop(0) if len(parts) == 4 else 0
    hours, mins, _ = ([0] + parts)[-3:]
    return days * 1440 + hours * 60 + mins


def megabytes(memory: str) -> float:
    return float(memory[:-1]) * {"M": 1, "G": 1024, "T": 1024 ** 2}[memory[-1]]


def test_cancelled_metatrain_job_was_retried_with_twice_the_resources_and_resumed(runs):
    watcher = runs["watcher"]
    assert watcher.cancelled, "the purer meta-training job was never seen running (nothing to cancel)"
    cancelled = watcher.jobs[watcher.cancelled]
    assert cancelled["state"] == "CANCELLED"
    retried = [j for j in jobs_of(runs, "metatrain")
               if j["comment"] == cancelled["comment"] and int(j["id"]) > int(cancelled["id"])]
    assert len(retried) == 1 and retried[0]["state"] == "COMPLETED", retried
    # attempt 2: the profile's runtime and the rule's mem_mb are both scaled by `attempt`
    assert minutes(retried[0]["time_limit"]) == 2 * minutes(cancelled["time_limit"])
    assert megabytes(retried[0]["memory"]) == 2 * megabytes(cancelled["memory"])
    log = next((runs["slurm"] / "logs" / "metatrain" / "tiny" / "purer" / "seed0").glob("shot*.log")).read_text()
    match = re.search(r"resuming from \S+ at meta-iteration (\d+)", log)
    assert match, log[-2000:]
    # checkpoint_every > iterations: only the SIGTERM handler can have written this checkpoint
    assert watcher.cancelled_at_rows - 1 <= int(match.group(1)) < ITERATIONS


def tensors_equal(a: Path, b: Path) -> bool:
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_results_equal_the_local_run(runs):
    slurm, local = runs["slurm"], runs["local"]
    models = sorted(p.relative_to(local) for p in (local / "results" / "metatrain").rglob("*.safetensors"))
    assert len(models) >= 2
    for path in models:
        assert tensors_equal(slurm / path, local / path), path
    for card in (local / "results" / "metatrain").rglob("meta_model.json"):
        ours, theirs = (json.loads(p.read_text()) for p in (slurm / card.relative_to(local), card))
        for key in ("meta_val_accuracy", "selected_iteration"):
            assert ours[key] == theirs[key], (card, key)
    if (local / "results" / "metrics.json").is_file():
        assert json.loads((slurm / "results" / "metrics.json").read_text()) == json.loads(
            (local / "results" / "metrics.json").read_text())
