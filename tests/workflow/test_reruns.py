"""What the real workflow reruns after an edit (dfml/codedeps.py, docs/reruns.md): after one complete tiny run
(PURER and TACO, the random and OTA baselines), dry runs plan a method's jobs for its code only, OTA's jobs for
OTA's code only, no meta-test for the CPU inversion kernels, and nothing for a comment, a docstring or a
reformatting anywhere; every job ran only code its digest covers; a checkpoint resumes across a docstring edit,
never across a code edit."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import copy_project, tiny_omniglot_params
from dfml.codedeps import dataset_choices, metatest_choices, metatrain_choices, module_file, script_modules

pytestmark = pytest.mark.slow

TARGET_RULES = {"all", "metatest_all", "metatrain_all", "invert", "pool", "prepare_data"}
METATEST_RULES = {"metatest", "metatest_plain"}


def tiny_params() -> dict:
    params = tiny_omniglot_params(7, pretrain_epochs=1, iterations=2, eval_every=1, checkpoint_every=1, val_episodes=2)
    params.pop("run_methods", None)
    methods = params["methods"]
    params["methods"] = {
        "purer": {**methods["purer"], "warmup": 1, "patience": 1},
        "taco": {**methods["taco"], "recovery_steps": 2, "generator_width": 4, "latent_dim": 8, "query_per_class": 3,
                 "generate_interval": 1, "memory_batches": 2},
    }
    params["metatest"].update(episodes=3, baselines=["random", "ota"], plain_only=["random"],
                              calibrations=["plain", "icfil"])
    params["metatest"]["icfil"].update(inv_steps=1, n_hat=1, cal_steps=1)
    params["metatest"]["icfil_tuning"].update(episodes=2, grid={"tau": [0.1], "cal_steps": [1]})
    params["report"] = {"comparisons": []}
    return params


def snakemake(workdir: Path, *args: str, env: dict | None = None) -> str:
    """A real `snakemake --cores 2 ...`; PYTHONPATH: the jobs import the copy of dfml the tests edit."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "PYTHONPATH": str(workdir), "DFML_DEVICE": "cpu", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    full_env.pop("SNAKEMAKE_PROFILE", None)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=workdir, env=full_env,
                          capture_output=True, text=True, timeout=1200)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{output[-6000:]}")
    return output


@dataclass
class PlannedJob:
    rule: str
    wildcards: dict = field(default_factory=dict)
    reason: str = ""

    @property
    def method(self) -> str | None:
        return self.wildcards.get("method")


def plan(workdir: Path) -> list[PlannedJob]:
    """The jobs `snakemake -n` plans (target rules left out), with their wildcards and reason."""
    output = snakemake(workdir, "-n")
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        match = re.match(r"(?:local)?rule (\w+):", block)
        if not match or match[1] in TARGET_RULES:
            continue
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        reason = re.search(r"^\s+reason: (.*)$", block, re.M)
        jobs.append(PlannedJob(match[1], dict(kv.split("=", 1) for kv in wildcards[1].split(", ")) if wildcards else {},
                               reason[1] if reason else ""))
    assert jobs or "Nothing to be done" in output, output[-3000:]
    return jobs


def summary(jobs: list[PlannedJob]) -> list[str]:
    return sorted(f"{j.rule}({j.method})" if j.method else j.rule for j in jobs)


@contextmanager
def edited(*edits: tuple[Path, callable]):
    """Each file rewritten by its function for the duration, then restored byte for byte."""
    originals = {path: path.read_bytes() for path, _ in edits}
    try:
        for path, change in edits:
            path.write_text(change(path.read_text()))
        yield
    finally:
        for path, content in originals.items():
            path.write_bytes(content)


def append_code(text: str) -> str:
    return text + "\n_RERUN_PROBE = 1\n"


def reword_docstrings(text: str) -> str:
    """Every docstring reworded, a comment on every top-level statement, blank lines and a line break added."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    docstrings = [node.body[0].value for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
                  and isinstance(node.body[0].value.value, str)]
    for node in sorted(docstrings, key=lambda n: (n.lineno, n.col_offset), reverse=True):
        line = lines[node.lineno - 1]
        quote = re.match(r"[rRbBuU]*('''|\"\"\"|'|\")", line[node.col_offset:])
        cut = node.col_offset + quote.end()
        lines[node.lineno - 1] = line[:cut] + "Reworded. " + line[cut:]
    ends = {node.end_lineno for node in tree.body}
    out = []
    for number, line in enumerate(lines, start=1):
        out.append(line.rstrip("\n") + ("  # a new comment\n" if number in ends and not line.rstrip().endswith("\\")
                                       else "\n"))
        if number in ends:
            out.append("\n")
    return "".join(out) + "\n# a closing comment\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One complete tiny run, its import traces, and how long it took."""
    workdir = copy_project(tmp_path_factory.mktemp("reruns"), tiny_params())
    traces = workdir / "import_traces"
    traces.mkdir()
    start = time.perf_counter()
    snakemake(workdir, env={"DFML_TRACE_IMPORTS": str(traces)})
    print(f"complete tiny run: {time.perf_counter() - start:.0f} s")
    return workdir


def test_the_complete_run_leaves_nothing_to_do(run):
    assert plan(run) == []


def test_every_job_ran_only_code_its_digest_covers(run):
    """The per-job code (one method, one fusion, one source) is sound: what each job loaded is in it."""
    config = yaml.safe_load((run / "params.yaml").read_text())
    checked = set()
    for argv_file in sorted((run / "import_traces").glob("*.py.*.argv.json")):
        argv = json.loads(argv_file.read_text())
        script = Path(argv[0]).name
        if not (run / "scripts" / script).is_file():
            continue  # Snakemake's own process
        options = dict(zip(argv[1::2], argv[2::2]))
        choices = {"prepare_data.py": lambda: dataset_choices(config["datasets"][options["--dataset"]]),
                   "metatrain.py": lambda: metatrain_choices(json.loads(options["--settings-json"])),
                   "metatest.py": lambda: metatest_choices(config, options["--method"])}.get(script, lambda: None)()
        loaded = set(argv_file.with_name(argv_file.name.replace(".argv.json", ".txt")).read_text().split())
        loaded = {m for m in loaded if module_file(m, run) is not None}
        declared = set(script_modules(run / "scripts" / script, run, choices=choices))
        assert loaded <= declared, (argv, sorted(loaded - declared))
        checked.add((script, options.get("--method")))
    assert {("metatrain.py", "purer"), ("metatrain.py", "taco"), ("metatest.py", "ota"), ("metatest.py", "taco"),
            ("metatest.py", "random"), ("prepare_data.py", None), ("report.py", None)} <= checked


def python_files(workdir: Path) -> list[Path]:
    return sorted((workdir / "dfml").rglob("*.py")) + sorted((workdir / "scripts").glob("*.py"))


def test_comments_docstrings_and_reformatting_anywhere_plan_nothing(run):
    files = python_files(run)
    assert len(files) > 60
    with edited(*[(path, reword_docstrings) for path in files]):
        assert (run / "dfml" / "codedeps.py").read_text().count("Reworded. ") > 10
        assert plan(run) == []


def test_a_code_edit_in_taco_plans_only_tacos_jobs_and_the_report(run):
    with edited((module_file("dfml.methods.taco", run), append_code)):
        jobs = plan(run)
    print("taco edit:", summary(jobs))
    assert {j.rule for j in jobs if j.method is None} == {"report"}
    assert {j.method for j in jobs if j.method is not None} == {"taco"}
    assert any(j.rule.startswith("metatrain") for j in jobs) and any(j.rule in METATEST_RULES for j in jobs)


def test_a_code_edit_in_ota_plans_only_otas_meta_test_and_the_report(run):
    with edited((module_file("dfml.models.ota", run), append_code)):
        jobs = plan(run)
    print("ota edit:", summary(jobs))
    assert summary(jobs) == ["metatest(ota)", "report"]  # OTA is a baseline: it has no meta-training


def test_a_code_edit_in_a_cpu_inversion_kernel_plans_no_meta_test_for_its_code(run):
    """The kernels serve the warm-start inversion and PURER's meta-training: those rerun, and the meta-tests of
    the models they remake (their inputs change); no meta-test reruns for its own code."""
    with edited((module_file("dfml.inversion.fused_conv4", run), append_code)):
        jobs = plan(run)
    print("fused_conv4 edit:", summary(jobs))
    assert {j.rule for j in jobs if j.rule not in METATEST_RULES} == {"invert_pool", "metatrain", "report"}
    metatests = [j for j in jobs if j.rule in METATEST_RULES]
    assert {j.method for j in metatests} <= {"purer"}
    assert all("Params have changed" not in j.reason and j.reason.startswith("Input files updated by another job")
               for j in metatests), [j.reason for j in metatests]


def test_a_shared_module_reruns_every_job_that_runs_it(run):
    """The other side: a code edit in the shared meta-training loop reruns every method's meta-training."""
    with edited((module_file("dfml.methods.loop", run), append_code)):
        jobs = plan(run)
    assert {j.method for j in jobs if j.rule.startswith("metatrain")} == {"purer", "taco"}
    assert not [j for j in jobs if j.rule in METATEST_RULES and "Params have changed" in j.reason]


def force_taco_metatrain(workdir: Path) -> str:
    target = "results/metatrain/tiny/taco/seed0/shot1/curve.csv"
    snakemake(workdir, "--force", target)
    return (workdir / "logs/metatrain/tiny/taco/seed0/shot1.log").read_text()


def test_a_checkpoint_resumes_across_a_docstring_edit_and_never_across_a_code_edit(run):
    """Last in this file: it reruns TACO's meta-training (a few seconds)."""
    taco = module_file("dfml.methods.taco", run)
    checkpoint = "results/checkpoints/tiny/taco/seed0/shot1.safetensors"
    with edited((taco, reword_docstrings)):
        log = force_taco_metatrain(run)
    assert f"resuming from {checkpoint} at meta-iteration 2" in log, log[-2000:]
    with edited((taco, append_code)):
        log = force_taco_metatrain(run)
    assert f"ignoring {checkpoint}: written for another code" in log and "starting over" in log, log[-2000:]
