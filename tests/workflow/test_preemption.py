"""Preemption and time limits: a meta-training process killed mid-way resumes from its checkpoint and
finishes exactly like an uninterrupted run.

The real scripts/metatrain.py in subprocesses, on a pool and pseudo dataset built by the tiny Snakemake
workflow in a temporary copy of the project (once per module):
- SIGTERM (scancel, preemption, SLURM time limit): a final checkpoint, exit code 143; the rerun resumes
  from that iteration;
- SIGKILL (after KillWait, node failure): the rerun resumes from the last periodic checkpoint;
- through Snakemake: the failed job's outputs are deleted, the rerun restores them from the checkpoint.
Each time the final meta-model is bit-identical to the uninterrupted run's, and so are its card's
accuracy, the pseudo data and the curve (but for wall times).
(tests/workflow/test_slurm.py cancels a meta-training job on a real SLURM cluster the same way.)
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import copy_project, tiny_omniglot_params
from dfml.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

ITERATIONS = 40
CHECKPOINT_EVERY = 5
PSEUDO = "results/synthetic/tiny/seed0/pseudo.safetensors"
WARM_START = str(Path(PSEUDO).with_name("inversion.json"))  # the warm start's seconds, charged to PURER
KEPT = [3, 12, 13, ITERATIONS]  # models kept (metatrain.keep_checkpoints); a SIGKILL lands among 11-13


def pool_files(members: int) -> list[str]:
    return [f"results/pool/tiny/member_{i}.json" for i in range(members)]


def tiny_params() -> dict:
    params = tiny_omniglot_params(11, pretrain_epochs=1, iterations=ITERATIONS, eval_every=5,
                                  checkpoint_every=CHECKPOINT_EVERY, val_episodes=5)
    params["methods"] = {"purer": {"algorithm": "purer", "eci": True, "warmup": 2, "patience": 2}}
    params["metatrain"]["keep_checkpoints"] = KEPT + [2 * ITERATIONS]  # one past the run: skipped
    return params


def env(project: Path) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(project), "DFML_DEVICE": "cpu", "OMP_WAIT_POLICY": "PASSIVE"}


def snakemake(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=project,
                          env=env(project), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    workdir = copy_project(tmp_path_factory.mktemp("preempt"), tiny_params())
    snakemake(workdir, PSEUDO)  # data, pool, inversion: what meta-training needs
    return workdir


class Run:
    """One scripts/metatrain.py process writing out/<name>/ and ckpt/<name>.safetensors; ``overlay``: params
    merged over the project's (--configfile), ``warm_start``: another record of the warm start than invert_pool's."""

    def __init__(self, project: Path, name: str, method: str = "purer", overlay: dict | None = None,
                 warm_start: str = WARM_START):
        self.project, self.name, self.method = project, name, method
        self.overlay, self.warm_start = overlay, warm_start
        self.out = project / "out" / name
        self.checkpoint = project / "ckpt" / f"{name}.safetensors"
        self.log = project / "out" / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Run:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        pseudo = ["--pseudo", PSEUDO, "--warm-start", self.warm_start] if self.method == "purer" else []
        overlay = []
        if self.overlay is not None:
            path = self.project / "out" / f"{self.name}.yaml"
            path.write_text(yaml.safe_dump(self.overlay))
            overlay = ["--configfile", str(path)]
        cmd = [sys.executable, "scripts/metatrain.py", "--scenario", "tiny", "--method", self.method, "--shot", "1",
               "--pool", "results/pool/tiny", *pseudo, "--out", str(self.out),
               "--checkpoint", str(self.checkpoint), "--threads", "1", "--params", "params.yaml", "--data-root", "data",
               *overlay]
        with open(self.log, "a") as handle:
            self.proc = subprocess.Popen(cmd, cwd=self.project, env=env(self.project), stdout=handle,
                                         stderr=subprocess.STDOUT)
        return self

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    def iterations_done(self) -> int:
        """Iterations with a curve row (the row of iteration 0 is the initial evaluation)."""
        curve = self.out / "curve.csv"
        return max(0, len(curve.read_text().splitlines()) - 2) if curve.is_file() else 0

    def wait_until(self, predicate, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"{self.name} ended early ({self.proc.returncode}):\n{self.output()}"
            assert time.monotonic() < deadline, f"{self.name}: timed out waiting\n{self.output()}"
            time.sleep(0.02)

    def output(self) -> str:
        return self.log.read_text() if self.log.is_file() else ""

    def checkpoint_iteration(self) -> int:
        return load_checkpoint(self.checkpoint)["iteration"]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def curve_without_times(path: Path) -> list[dict]:
    with open(path) as handle:
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in csv.DictReader(handle)]


def kept_names(out: Path) -> list[str]:
    """The kept models' folders (not the timestamp Snakemake leaves in a directory output)."""
    return sorted(p.name for p in (out / "kept").iterdir() if not p.name.startswith("."))


def assert_same_result(out: Path, reference: Path) -> None:
    for name in ("test1/meta_model.safetensors", "pseudo_final.safetensors"):
        if name == "pseudo_final.safetensors" and not (reference / name).is_file():
            continue  # a method without pseudo data
        ours, theirs = tensors(out / name), tensors(reference / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key} differs from the uninterrupted run"
    ours, theirs = (json.loads((d / "test1" / "meta_model.json").read_text()) for d in (out, reference))
    for key in ("meta_val_accuracy", "selected_iteration", "architecture", "init"):
        assert ours[key] == theirs[key], key
    assert curve_without_times(out / "curve.csv") == curve_without_times(reference / "curve.csv")
    kept = kept_names(reference)
    assert kept_names(out) == kept
    for name in kept:
        ours, theirs = tensors(out / "kept" / name / "meta_model.safetensors"), tensors(
            reference / "kept" / name / "meta_model.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
        ours, theirs = (json.loads((d / "kept" / name / "meta_model.json").read_text()) for d in (out, reference))
        for key in ("kept_iteration", "selected_iteration", "architecture", "init", "selected_on"):
            assert ours[key] == theirs[key], (name, key)


def kill_between_checkpoints(run: Run) -> int:
    """SIGKILL ``run`` between two periodic checkpoints, a few iterations after the last one (lost to the
    kill); the iteration of the checkpoint left behind."""
    run.wait_until(lambda: run.iterations_done() >= 2 * CHECKPOINT_EVERY + 1
                   and run.iterations_done() % CHECKPOINT_EVERY in (1, 2, 3))
    run.proc.send_signal(signal.SIGKILL)
    assert run.wait(timeout=60) == -signal.SIGKILL
    iteration = run.checkpoint_iteration()
    assert iteration % CHECKPOINT_EVERY == 0 and CHECKPOINT_EVERY <= iteration < ITERATIONS
    return iteration


@pytest.fixture(scope="module")
def reference(project):
    run = Run(project, "reference").start()
    assert run.wait() == 0, run.output()
    assert len(curve_without_times(run.out / "curve.csv")) == ITERATIONS + 1
    assert kept_names(run.out) == sorted(f"iter{i}" for i in KEPT)
    card = json.loads((run.out / "kept" / f"iter{ITERATIONS}" / "meta_model.json").read_text())
    assert card["selected_on"] == "kept" and card["kept_iteration"] == ITERATIONS
    return run.out


def test_sigterm_writes_a_final_checkpoint_exits_143_and_the_rerun_finishes_identically(project, reference):
    run = Run(project, "term").start()
    # mid-way, after the first periodic checkpoint, at an iteration that is not a checkpoint's
    run.wait_until(lambda: run.checkpoint.is_file() and run.iterations_done() >= CHECKPOINT_EVERY + 2)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 143, run.output()
    stopped = re.search(r"stopped by signal 15 after meta-iteration (\d+)", run.output())
    assert stopped, run.output()
    iteration = int(stopped.group(1))
    assert CHECKPOINT_EVERY + 2 <= iteration < ITERATIONS
    assert run.checkpoint_iteration() == iteration  # written on SIGTERM, not only every CHECKPOINT_EVERY

    run.start()
    assert run.wait() == 0, run.output()
    assert f"resuming from {run.checkpoint} at meta-iteration {iteration}" in run.output()
    assert_same_result(run.out, reference)


def test_the_resume_check_tool_finds_a_killed_and_resumed_run_identical_to_the_uninterrupted_one(project, tmp_path):
    """tools/resume_check.py, the check a study runs on its own settings (docs/scaling.md), on the tiny project."""
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[2] / "tools" / "resume_check.py"),
                           "--project", str(project), "--scenario", "tiny", "--iterations", "12", "--checkpoint-every",
                           "5", "--kill-after", "7", "--keep", "5", "10", "12", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"resuming from \S+ at meta-iteration (5|10);", proc.stdout), proc.stdout
    for line in ("curve (wall times aside): identical", "kept model 5: identical", "kept model 10: identical",
                 "kept model 12: identical", "selected model test1: identical"):
        assert line in proc.stdout, proc.stdout
    assert "DIFFERS" not in proc.stdout


def test_sigkill_resumes_from_the_last_periodic_checkpoint_and_finishes_identically(project, reference):
    run = Run(project, "kill").start()
    iteration = kill_between_checkpoints(run)
    assert run.iterations_done() > iteration  # the rows past the checkpoint are redone, not duplicated

    run.start()
    assert run.wait() == 0, run.output()
    assert f"resuming from {run.checkpoint} at meta-iteration {iteration}" in run.output()
    assert_same_result(run.out, reference)


def test_snakemake_rerun_after_sigterm_restores_the_deleted_outputs_and_finishes_identically(project, reference):
    target = "results/metatrain/tiny/purer/seed0/shot1/test1/meta_model.safetensors"
    out = project / "results" / "metatrain" / "tiny" / "purer" / "seed0" / "shot1"
    first = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "2", target], cwd=project,
                             env=env(project), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    curve = out / "curve.csv"
    while not (curve.is_file() and len(curve.read_text().splitlines()) >= CHECKPOINT_EVERY + 4):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.02)
    workers = [p for p in psutil.Process(first.pid).children(recursive=True)
               if "scripts/metatrain.py" in " ".join(p.cmdline()) and p.name().startswith("python")]
    assert len(workers) == 1, workers
    workers[0].send_signal(signal.SIGTERM)  # what SLURM sends at a time limit or on scancel
    output = first.communicate(timeout=300)[0]
    assert first.returncode != 0 and "Removing output files of failed job metatrain" in output, output[-3000:]
    assert not (out / "test1" / "meta_model.safetensors").exists() and not (out / "curve.csv").exists()

    rerun = snakemake(project, target)
    log = (project / "logs" / "metatrain" / "tiny" / "purer" / "seed0" / "shot1.log").read_text()
    assert re.search(r"resuming from \S+ at meta-iteration \d+", log), log[-2000:]
    assert "Nothing to be done" not in rerun.stdout + rerun.stderr
    assert_same_result(out, reference)


def test_a_code_change_never_resumes_a_finished_run(project, reference):
    """A checkpoint is only valid for the code that wrote it: after a change of code in a dfml file that metatrain
    imports, the rerun starts over instead of rewriting the old model from the finished checkpoint (a comment or
    a docstring is not code: tests/workflow/test_reruns.py resumes across one)."""
    run = Run(project, "edited").start()
    assert run.wait() == 0, run.output()
    first_curve = (run.out / "curve.csv").read_text()
    run.start()  # same code: the finished checkpoint is resumed (nothing left to train)
    assert run.wait() == 0 and f"resuming from {run.checkpoint} at meta-iteration {ITERATIONS}" in run.output()

    library = project / "dfml" / "meta" / "learners.py"
    original = library.read_text()
    try:
        library.write_text(original + "\n_AN_EDIT = 1  # a change of code (one that changes no number)\n")
        run.log.write_text("")
        run.start()
        assert run.wait() == 0, run.output()
    finally:
        library.write_text(original)
    assert "resuming" not in run.output()
    assert re.search(r"ignoring \S+: written for another code .*; starting over", run.output()), run.output()
    assert (run.out / "curve.csv").read_text() != first_curve  # trained again: new rows, new wall times
    assert_same_result(run.out, reference)  # this change of code changes no number


# -- equal time budgets: the warm start charged, no meta-iteration kept past the budget ---------------------------

def curve_rows(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_the_warm_starts_seconds_are_charged_to_purers_time_budget(project, reference):
    """invert_pool records the warm start's wall time next to the pseudo data, and a method on the pseudo data
    starts its budget there: a warm start that took the whole budget leaves no meta-iteration; a record of no
    time leaves the run as it was."""
    record = json.loads((project / WARM_START).read_text())
    assert record["warm_start_seconds"] > 0
    runs = {}
    for name, seconds, budget in (("spent", 50.0, 50.0), ("unspent", 0.0, 1e6)):
        path = project / "out" / f"{name}_inversion.json"
        path.write_text(json.dumps({**record, "warm_start_seconds": seconds}))
        runs[name] = Run(project, name, overlay={"metatrain": {"time_budget": budget}}, warm_start=str(path)).start()
        assert runs[name].wait() == 0, runs[name].output()
        assert float(curve_rows(runs[name].out / "curve.csv")[0]["seconds"]) == seconds
        assert json.loads((runs[name].out / "test1" / "meta_model.json").read_text())["warm_start_seconds"] == seconds
    assert len(curve_rows(runs["spent"].out / "curve.csv")) == 1
    assert "time budget of 50 s spent after 0 meta-iterations" in runs["spent"].output()
    assert_same_result(runs["unspent"].out, reference)


def test_a_pseudo_data_method_without_the_record_of_its_warm_start_is_refused(project):
    run = Run(project, "unrecorded", warm_start="out/none.json").start()
    assert run.wait() == 1
    assert "out/none.json: no such warm-start record (invert_pool's inversion.json)" in run.output()
    assert "Traceback" not in run.output()


def assert_budgeted_run_replays_pinned(project: Path, method: str, reference: Path) -> tuple[Path, Path]:
    """A run under half the reference's time keeps no more than its budget, abandons the iteration that would
    cross it, and is the run that pinning the iterations it kept replays: the method restored from its copy
    before that iteration (memory, generators, optimisers, RNG, API counts) is exactly the state it had."""
    budget = round(sum(float(r["seconds"]) for r in curve_rows(reference / "curve.csv") if r["seconds"]) / 2, 3)
    budgeted = Run(project, f"{method}_budgeted", method, overlay={"metatrain": {"time_budget": budget}}).start()
    assert budgeted.wait() == 0, budgeted.output()
    rows = curve_rows(budgeted.out / "curve.csv")
    kept = len(rows) - 1
    assert 0 < kept < ITERATIONS and "abandoned, the run ends after meta-iteration" in budgeted.output()
    # the curve keeps each iteration's seconds to 4 decimals: its sum may pass the exact one by that rounding
    assert sum(float(r["seconds"]) for r in rows if r["seconds"]) <= budget + 0.5e-4 * len(rows)
    pinned = Run(project, f"{method}_pinned", method, overlay={"metatrain": {"iterations": kept}}).start()
    assert pinned.wait() == 0, pinned.output()
    assert_same_result(pinned.out, budgeted.out)
    return budgeted.out, pinned.out


def test_a_budgeted_purer_run_keeps_its_budget_and_replays_with_its_iterations_pinned(project, reference):
    assert_budgeted_run_replays_pinned(project, "purer", reference)


# -- the generator-based methods: memory, triggers, RNG and (BiDf-MKD) API budget in the checkpoint -------------

GENERATIVE = {
    "taco": {"algorithm": "taco", "recovery_steps": 2, "latent_dim": 8, "generator_width": 4, "query_per_class": 3,
             "generate_interval": 3, "memory_batches": 2},
    # TACO as published: reliability weights rewarded, and new tasks triggered, on real meta-val episodes
    "taco_metaval": {"algorithm": "taco", "recovery_steps": 2, "latent_dim": 8, "generator_width": 4,
                     "query_per_class": 3, "generate_interval": 3, "memory_batches": 2, "selection": "reliability",
                     "reward": "metaval", "trigger": "metaval", "val_tasks": 2},
    "bidfmkd": {"algorithm": "bidfmkd", "q": 4, "recovery_steps": 2, "support_per_class": 2, "query_per_class": 3,
                "latent_dim": 8, "generator_width": 4, "kd_steps": 1, "generate_interval": 3, "boundary_start": 4,
                "memory_batches": 2},
    # TGR replays with MAML (its schema default, whatever metatrain.learner says); 2 groups of the 2 members
    "tgr": {"algorithm": "tgr", "recovery_steps": 2, "latent_dim": 8, "generator_width": 4, "support_per_class": 2,
            "query_per_class": 3, "teachers": 2, "groups": 2, "embedding_batches": 1, "embedding_per_class": 2,
            "generate_interval": 3, "memory_batches": 2},
    "free": {"algorithm": "free", "teachers": 2, "per_class": 4, "adaptation_steps": 2, "latent_dim": 8,
             "generator_width": 4, "warmup_events": 2, "generate_interval": 3, "memory_batches": 2},
}


@pytest.fixture(scope="module")
def generative_project(tmp_path_factory):
    params = tiny_params()
    params["methods"] = GENERATIVE
    params["metatrain"]["learner"] = "anil"  # TACO's interpolation needs features, BiDf-MKD's KD a MAML learner
    params["metatrain"]["meta_batch"] = 2  # reliability weights draw distinct members of the 2-member pool
    workdir = copy_project(tmp_path_factory.mktemp("preempt_generative"), params)
    snakemake(workdir, *pool_files(2))  # no inversion: these methods need no pseudo data
    return workdir


@pytest.mark.parametrize("method", sorted(GENERATIVE))
def test_a_killed_generator_based_run_resumes_to_the_same_models_and_curve(generative_project, method):
    reference = Run(generative_project, f"{method}_reference", method).start()
    assert reference.wait() == 0, reference.output()
    run = Run(generative_project, f"{method}_kill", method).start()
    iteration = kill_between_checkpoints(run)
    run.start()
    assert run.wait() == 0, run.output()
    assert f"resuming from {run.checkpoint} at meta-iteration {iteration}" in run.output()
    assert_same_result(run.out, reference.out)
    card = json.loads((run.out / "test1" / "meta_model.json").read_text())
    expected = json.loads((reference.out / "test1" / "meta_model.json").read_text())
    assert card["generation_events"] == expected["generation_events"] > 1
    assert card.get("api_queries") == expected.get("api_queries")  # BiDf-MKD: the budget survives the kill
    members = json.loads((run.out / "members.json").read_text())  # draws, weights and baseline survive too
    assert members == json.loads((reference.out / "members.json").read_text())
    assert sum(m["draws"] for m in members["members"]) > 0
    if method.startswith("taco"):  # the published reward and trigger read real meta-val episodes
        assert card["data_free"] is members["data_free"] is (method == "taco")


@pytest.mark.parametrize("method", ["bidfmkd", "free", "taco", "tgr"])
def test_a_budgeted_generator_based_run_keeps_its_budget_and_replays_with_its_iterations_pinned(generative_project,
                                                                                                method):
    reference = Run(generative_project, f"{method}_reference", method)
    if not (reference.out / "members.json").is_file():
        reference.start()
        assert reference.wait() == 0, reference.output()
    budgeted, pinned = assert_budgeted_run_replays_pinned(generative_project, method, reference.out)
    cards = [json.loads((out / "test1" / "meta_model.json").read_text()) for out in (budgeted, pinned)]
    assert cards[0]["generation_events"] == cards[1]["generation_events"]
    assert cards[0].get("api_queries") == cards[1].get("api_queries")  # BiDf-MKD: the abandoned queries undone
    assert (budgeted / "members.json").read_text() == (pinned / "members.json").read_text()


def test_a_sigterm_mid_taco_run_resumes_to_the_same_weights_models_and_curve(generative_project):
    reference = Run(generative_project, "taco_metaval_reference", "taco_metaval")
    if not (reference.out / "members.json").is_file():
        reference.start()
        assert reference.wait() == 0, reference.output()
    run = Run(generative_project, "taco_metaval_term", "taco_metaval").start()
    run.wait_until(lambda: run.checkpoint.is_file() and run.iterations_done() >= CHECKPOINT_EVERY + 2)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 143, run.output()
    iteration = int(re.search(r"stopped by signal 15 after meta-iteration (\d+)", run.output()).group(1))
    assert run.checkpoint_iteration() == iteration and iteration % CHECKPOINT_EVERY != 0
    run.start()
    assert run.wait() == 0, run.output()
    assert f"resuming from {run.checkpoint} at meta-iteration {iteration}" in run.output()
    assert_same_result(run.out, reference.out)
    assert (run.out / "members.json").read_text() == (reference.out / "members.json").read_text()


def test_a_corrupt_member_stops_training_and_testing_naming_the_file_without_a_traceback(generative_project, tmp_path):
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(generative_project / "results" / "pool" / "tiny", pool)
    weights = pool / "member_1.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    proc = subprocess.run([sys.executable, "scripts/metatrain.py", "--scenario", "tiny", "--method", "taco", "--shot",
                           "1", "--pool", str(pool), "--out", str(tmp_path / "out"), "--checkpoint",
                           str(tmp_path / "c.safetensors"), "--params", "params.yaml", "--data-root", "data"],
                          cwd=generative_project, env=env(generative_project), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert "member_1.safetensors: checksum differs from the card member_1.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "scripts/metatest.py", "--scenario", "tiny", "--method", "average",
                           "--protocol", "test1", "--shot", "1", "--calibrations", "plain", "--pool", str(pool),
                           "--out", str(tmp_path / "m"), "--params", "params.yaml", "--data-root", "data"],
                          cwd=generative_project, env=env(generative_project), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "member_1.safetensors: checksum differs from the card member_1.json" in proc.stderr
