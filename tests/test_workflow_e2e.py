"""The whole pipeline (default target) through Snakemake on a tiny Omniglot configuration."""

import json

import pytest

from conftest import copy_project, run_snakemake, tiny_omniglot_params

pytestmark = pytest.mark.slow


def tiny_params() -> dict:
    params = tiny_omniglot_params(5, pretrain_epochs=2, iterations=4, eval_every=2, checkpoint_every=2, val_episodes=3)
    params["methods"]["purer"].update(warmup=1, patience=1)
    params["metatest"].update(episodes=5, query=3, calibrations=["plain", "icfil", "steps"])
    params["metatest"]["icfil"].update(inv_steps=2, n_hat=1, cal_steps=1)
    params["metatest"]["icfil_tuning"].update(episodes=2, grid={"tau": [0.1, 0.5]})
    return params


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = copy_project(tmp_path_factory.mktemp("e2e"), tiny_params())
    # an override file, as users run the shipped configs/*.yaml (it changes nothing here)
    (workdir / "override.yaml").write_text("metatest: {episodes: 5}\n")
    proc = run_snakemake(workdir, "--configfile", "override.yaml")
    return workdir, proc


def test_metrics_cover_every_method_shot_and_calibration(run):
    workdir, proc = run
    metrics = json.loads((workdir / "results" / "metrics.json").read_text())
    assert set(metrics["tiny"]) == {"purer", "purer_ei", "random", "average"}
    for method in metrics["tiny"].values():
        for calibration in ("plain", "icfil", "steps"):
            entry = method["1shot"][calibration]
            assert 0 <= entry["accuracy"] <= 100 and entry["ci95"] >= 0 and entry["episodes"] == 5
    assert "results/summary.md" in proc.stdout + proc.stderr  # the run says where the summary is
    # the control for ICFIL adapts with test_steps + ICFIL's tuned cal_steps steps (1 + 1 here)
    control = json.loads((workdir / "results/metatest/tiny/purer/shot1_steps.json").read_text())
    assert control["test_steps"] == 2 and control["icfil"] is None


def test_all_methods_were_scored_on_the_same_episodes(run):
    workdir, _ = run
    files = sorted((workdir / "results" / "metatest" / "tiny").glob("*/shot1_*.json"))
    fingerprints = {json.dumps(json.loads(f.read_text())["per_dataset"]["omni"]["episodes_sha256"]) for f in files}
    assert len(files) == 4 * 3 and len(fingerprints) == 1  # 4 methods x 3 calibrations


def test_icfil_settings_were_chosen_on_meta_val(run):
    workdir, _ = run
    tuned = json.loads((workdir / "results" / "icfil" / "tiny" / "shot1.json").read_text())
    assert tuned["selected_on"] == "meta_val" and tuned["settings"]["tau"] in (0.1, 0.5)
    used = json.loads((workdir / "results" / "metatest" / "tiny" / "purer" / "shot1_icfil.json").read_text())
    assert used["icfil"]["tau"] == tuned["settings"]["tau"]


def test_figures_tables_and_html_report(run):
    workdir, _ = run
    plots = workdir / "results" / "plots"
    for name in ("accuracy.png", "metaval_curves.png", "pseudo_vs_real_tiny.png", "accuracy.csv",
                 "metaval_curves.csv", "comparisons.csv"):
        assert (plots / name).stat().st_size > 0, name
    summary = (workdir / "results" / "summary.md").read_text()
    assert "## Scenario tiny" in summary and "Paired differences" in summary
    assert "--configfile override.yaml`" in summary  # the reproduce line names the override
    run_snakemake(workdir, "--report", "report.html")
    assert (workdir / "report.html").stat().st_size > 10_000


def test_meta_training_recorded_selection_and_iteration_time(run):
    workdir, _ = run
    card = json.loads((workdir / "results" / "metatrain" / "tiny" / "purer" / "shot1" / "meta_model.json").read_text())
    assert card["selected_on"] == "meta_val" and card["seconds_per_iteration"] > 0
    curve = (workdir / "results" / "metatrain" / "tiny" / "purer" / "shot1" / "curve.csv").read_text().splitlines()
    assert len(curve) == 1 + 5  # header, the initialisation (iteration 0), 4 iterations
