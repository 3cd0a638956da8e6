"""Training seeds as a run dimension, through Snakemake on a tiny Omniglot configuration: each seed its own warm
start, meta-training and selection, the pool and the episodes shared, the report's statistics over the seeds."""

import csv
import json

import pytest
from safetensors.torch import load_file

from conftest import copy_project, run_snakemake, tiny_omniglot_params

pytestmark = pytest.mark.slow

SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    params = tiny_omniglot_params(3, pretrain_epochs=1, iterations=2, eval_every=1, checkpoint_every=1, val_episodes=2)
    params.update(training_seeds=SEEDS, run_methods=["purer"])
    params["methods"]["purer"].update(warmup=1, patience=1)
    params["metatest"].update(episodes=6, baselines=["random", "average"], calibrations=["plain"],
                              plain_only=["random"])
    params["report"] = {"comparisons": [["purer", "random"], ["purer", "average"], ["purer", "start"]]}
    workdir = copy_project(tmp_path_factory.mktemp("seeds"), params)
    run_snakemake(workdir)
    return workdir


def test_each_seed_has_its_own_warm_start_and_meta_training_on_one_pool(run):
    warm = [load_file(run / f"results/synthetic/tiny/seed{t}/pseudo.safetensors") for t in SEEDS]
    assert all(not w["images"].equal(warm[0]["images"]) for w in warm[1:])  # seeded apart
    cards = [json.loads((run / f"results/metatrain/tiny/purer/seed{t}/shot1/test1/meta_model.json").read_text())
             for t in SEEDS]
    assert [c["settings"]["training_seed"] for c in cards] == SEEDS
    assert {c["settings"]["seed"] for c in cards} == {3}  # the pool's seed, shared
    assert not list((run / "results/pool/tiny").glob("seed*"))  # one pool for every seed


def test_random_starts_are_drawn_per_seed_and_a_fusion_once_on_shared_episodes(run):
    results = {p.relative_to(run / "results/metatest/tiny").parts[:2]: json.loads(p.read_text())
               for p in (run / "results/metatest/tiny").glob("*/*/test1/shot1_plain.json")}
    assert set(results) == {(m, f"seed{t}") for m in ("purer", "random") for t in SEEDS} | {("average", "pool")}
    assert results[("average", "pool")]["training_seed"] is None
    assert [results[("random", f"seed{t}")]["training_seed"] for t in SEEDS] == SEEDS
    fingerprints = {json.dumps(r["per_dataset"]["omni"]["episodes_sha256"]) for r in results.values()}
    assert len(fingerprints) == 1  # the same episodes for every seed and method


def test_the_report_averages_over_seeds_and_tests_over_them(run):
    metrics = json.loads((run / "results/metrics.json").read_text())["tiny"]
    purer = metrics["purer"]["1shot"]["plain"]
    assert purer["seeds"] == 3 and purer["ci_over"] == "seeds" and set(purer["per_seed"]) == {"0", "1", "2"}
    assert purer["accuracy"] == pytest.approx(sum(purer["per_seed"].values()) / 3, abs=2e-3)
    assert metrics["average"]["1shot"]["plain"]["seeds"] == 1
    with open(run / "results/plots/comparisons.csv") as handle:
        rows = {(r["a"], r["b"]): r for r in csv.DictReader(handle)}
    card = json.loads((run / "results/metatrain/tiny/purer/seed0/shot1/test1/meta_model.json").read_text())
    assert {("purer", "random"), ("purer", f"{card['init']} (start)")} <= set(rows)
    assert card["init"] != "average" or ("purer", "average") not in rows  # PURER's start: one row, one test
    assert all(r["over"] == "seeds" and r["seeds"] == "3" for r in rows.values())
    summary = (run / "results/summary.md").read_text()
    assert "3 training seeds" in summary and "include training variance" in summary


def test_the_replication_command_matches_the_run_bit_for_bit_and_names_a_perturbed_cell(run, tmp_path):
    """tools/replicate.py against a recorded copy of this very run, then against a copy whose PURER 1-shot cell
    was recorded beyond the accepted spread (as if measured on other code)."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    metrics = run / "results/metrics.json"
    recorded = json.loads(metrics.read_text())

    def replicate(tree):
        path = tmp_path / "recorded.json"
        path.write_text(json.dumps(tree))
        return subprocess.run([sys.executable, str(REPO_ROOT / "tools/replicate.py"), "--run", str(metrics),
                               "--recorded", str(path)], capture_output=True, text=True)

    same = replicate(recorded)
    cells = sum(len(c) for m in recorded["tiny"].values() for c in m.values())
    assert same.returncode == 0 and same.stdout.startswith(f"{cells} identical, 0 within, 0 outside, 0 missing")
    cell = recorded["tiny"]["purer"]["1shot"]["plain"]
    cell.update(accuracy=cell["accuracy"] + 1.5 * cell["ci95"] + 5, sha256="recorded elsewhere")  # past sqrt(2) CIs
    perturbed = replicate(recorded)
    assert perturbed.returncode == 1 and f"{cells - 1} identical, 0 within, 1 outside" in perturbed.stdout
    assert "| tiny/purer/1shot/plain | outside |" in perturbed.stdout
