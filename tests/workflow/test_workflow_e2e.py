"""The whole pipeline (default target) through Snakemake on a tiny Omniglot configuration."""

import csv
import json
import os

import pytest

from conftest import copy_project, run_snakemake, tiny_omniglot_params
from dfml.codedeps import module_file, script_modules

pytestmark = pytest.mark.slow


# each method's training-seed folder: trained methods and random inits per seed, fusions of the pool once
RUN = {method: "pool" if method.startswith("average") else "seed0"
       for method in ("purer", "purer_ei", "bidfmkd", "taco", "free", "tgr", "average", "average_protonet")}


def tiny_params() -> dict:
    params = tiny_omniglot_params(5, pretrain_epochs=2, iterations=4, eval_every=2, checkpoint_every=2, val_episodes=3)
    params["methods"]["purer"].update(warmup=1, patience=1)
    params["methods"]["bidfmkd"] = {"algorithm": "bidfmkd", "q": 4, "recovery_steps": 2, "support_per_class": 4,
                                    "query_per_class": 4, "latent_dim": 8, "generator_width": 4, "kd_steps": 1,
                                    "generate_interval": 1, "boundary_start": 2}
    params["methods"]["taco"].update(recovery_steps=2, generator_width=4, latent_dim=8, query_per_class=3,
                                     generate_interval=1, memory_batches=2)
    params["methods"]["free"] = {"algorithm": "free", "teachers": 2, "per_class": 4, "adaptation_steps": 2,
                                 "latent_dim": 8, "generator_width": 4, "warmup_events": 1, "generate_interval": 1,
                                 "memory_batches": 2}
    params["methods"]["tgr"] = {"algorithm": "tgr", "recovery_steps": 2, "latent_dim": 8, "generator_width": 4,
                                "support_per_class": 2, "query_per_class": 3, "teachers": 2, "groups": 2,
                                "embedding_batches": 1, "embedding_per_class": 2, "generate_interval": 1,
                                "memory_batches": 2}
    params["evaluation"] = {"query": 3, "protocols": {"test1": {"test_steps": 1}, "test3": {"test_steps": 3}}}
    params["metatest"].update(episodes=5, calibrations=["plain", "icfil", "steps"], plain_only=["random", "random_protonet"])
    params["metatest"]["icfil"].update(inv_steps=2, n_hat=1, cal_steps=1)
    params["metatest"]["icfil_tuning"].update(episodes=3, grid={"tau": [0.1, 0.5], "cal_steps": [1, 2]})
    params["report"] = {"comparisons": [["purer", "purer_ei"], ["taco", "start"]]}
    return params


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = copy_project(tmp_path_factory.mktemp("e2e"), tiny_params())
    # an override file and a --config value, as users run the shipped configs/*.yaml (they change nothing here)
    (workdir / "override.yaml").write_text("metatest: {episodes: 5}\n")
    traces = workdir / "import_traces"
    traces.mkdir()
    os.environ["DFML_TRACE_IMPORTS"] = str(traces)  # each job lists the dfml modules it loaded (dfml/__init__.py)
    try:
        proc = run_snakemake(workdir, "--configfile", "override.yaml", "--config", "run_scenarios=[tiny]")
    finally:
        del os.environ["DFML_TRACE_IMPORTS"]
    return workdir, proc


def test_every_job_loaded_only_modules_its_rule_declares_as_code(run):
    workdir, _ = run
    # the jobs' traces (Snakemake's own process, which reads params through dfml, writes one too)
    traces = [t for t in sorted((workdir / "import_traces").glob("*.py.*.txt"))
              if (workdir / "scripts" / (t.name.split(".py.")[0] + ".py")).is_file()]
    scripts = {trace.name.split(".py.")[0] + ".py" for trace in traces}
    assert {"prepare_data.py", "pretrain_member.py", "invert_pool.py", "metatrain.py", "metatest.py",
            "report.py", "pool_summary.py"} <= scripts
    for trace in traces:
        script = workdir / "scripts" / (trace.name.split(".py.")[0] + ".py")
        loaded = {m for m in trace.read_text().split() if module_file(m, workdir) is not None}
        assert loaded <= set(script_modules(script, workdir)), (script.name, loaded - set(script_modules(script, workdir)))


def test_metrics_cover_every_method_protocol_shot_and_calibration(run):
    workdir, proc = run
    metrics = json.loads((workdir / "results" / "metrics.json").read_text())
    assert set(metrics) == {"tiny:test1", "tiny:test3"}  # two protocols: one report scenario each
    for scenario in metrics.values():
        assert set(scenario) == {"purer", "purer_ei", "bidfmkd", "taco", "free", "tgr", "random", "average",
                                 "random_protonet", "average_protonet"}
        for name, method in scenario.items():
            calibrations = ("plain",) if name.startswith("random") else ("plain", "icfil", "steps")  # plain_only
            assert set(method["1shot"]) == set(calibrations)
            for calibration in calibrations:
                entry = method["1shot"][calibration]
                assert 0 <= entry["accuracy"] <= 100 and entry["ci95"] >= 0 and entry["episodes"] == 5
    assert "results/summary.md" in proc.stdout + proc.stderr  # the run says where the summary is


def test_one_protocol_selects_on_meta_val_and_tests_with_the_same_steps(run):
    workdir, _ = run
    out = workdir / "results" / "metatrain" / "tiny" / "purer" / "seed0" / "shot1"
    header = (out / "curve.csv").read_text().splitlines()[0].split(",")
    assert {"val_test1", "val_test3"} <= set(header)
    for protocol, steps in (("test1", 1), ("test3", 3)):
        card = json.loads((out / protocol / "meta_model.json").read_text())
        assert card["protocol"] == protocol and card["selected_on"] == "meta_val"
        result = json.loads((workdir / f"results/metatest/tiny/purer/seed0/{protocol}/shot1_plain.json").read_text())
        assert result["protocol"] == protocol and result["test_steps"] == steps


def test_all_methods_were_scored_on_the_same_episodes(run):
    workdir, _ = run
    files = sorted((workdir / "results" / "metatest" / "tiny").glob("*/*/*/shot1_*.json"))
    fingerprints = {json.dumps(json.loads(f.read_text())["per_dataset"]["omni"]["episodes_sha256"]) for f in files}
    # 2 protocols x (8 methods x 3 calibrations + the two random references' plain)
    assert len(files) == 2 * (8 * 3 + 2) and len(fingerprints) == 1


def test_icfil_and_the_steps_control_were_tuned_on_meta_val_for_each_method(run):
    workdir, _ = run
    for method in ("purer", "purer_ei", "bidfmkd", "taco", "free", "tgr", "average", "average_protonet"):
        for protocol in ("test1", "test3"):
            tuned = json.loads((workdir / f"results/icfil/tiny/{method}/{RUN[method]}/{protocol}/shot1.json").read_text())
            assert tuned["selected_on"] == "meta_val" and tuned["method"] == method
            assert len(tuned["icfil"]["grid"]) == 4 and len(tuned["steps"]["grid"]) == 2  # every point kept
            assert all({"mean", "ci95", "gap_to_chosen", "gap_ci95"} <= set(row) for row in tuned["icfil"]["grid"])
            used = json.loads((workdir / f"results/metatest/tiny/{method}/{RUN[method]}/{protocol}/shot1_icfil.json").read_text())
            assert {k: used["icfil"][k] for k in ("tau", "cal_steps")} == tuned["icfil"]["settings"]
            control = json.loads((workdir / f"results/metatest/tiny/{method}/{RUN[method]}/{protocol}/shot1_steps.json").read_text())
            steps = int(protocol.removeprefix("test"))
            assert control["test_steps"] == steps + tuned["steps"]["settings"]["extra_steps"]
            assert control["icfil"] is None
    assert not (workdir / "results/icfil/tiny/random").exists()  # plain_only: nothing to tune


def test_figures_tables_and_html_report(run):
    workdir, _ = run
    plots = workdir / "results" / "plots"
    for name in ("accuracy.png", "metaval_curves.png", "pseudo_vs_real_tiny.png", "accuracy.csv",
                 "metaval_curves.csv", "comparisons.csv"):
        assert (plots / name).stat().st_size > 0, name
    assert "tiny:test3/purer/1shot" in (plots / "metaval_curves.csv").read_text().splitlines()[0]
    summary = (workdir / "results" / "summary.md").read_text()
    assert "## Scenario tiny:test1" in summary and "## Scenario tiny:test3" in summary
    assert "Paired differences" in summary
    assert "--configfile override.yaml --config run_scenarios=[tiny]`" in summary  # the reproduce line: both
    run_snakemake(workdir, "--report", "report.html")
    assert (workdir / "report.html").stat().st_size > 10_000


def test_meta_training_recorded_selection_and_iteration_time(run):
    workdir, _ = run
    card = json.loads((workdir / "results/metatrain/tiny/purer/seed0/shot1/test1/meta_model.json").read_text())
    assert card["selected_on"] == "meta_val" and card["seconds_per_iteration"] > 0
    curve = (workdir / "results" / "metatrain" / "tiny" / "purer" / "seed0" / "shot1" / "curve.csv").read_text().splitlines()
    assert len(curve) == 1 + 5  # header, the initialisation (iteration 0), 4 iterations


def test_bidfmkd_ran_on_black_box_apis_from_the_same_pool_and_reported_its_budget(run):
    workdir, _ = run
    out = workdir / "results" / "metatrain" / "tiny" / "bidfmkd" / "seed0" / "shot1"
    assert not (out / "pseudo_final.safetensors").exists()  # no pseudo data in, none out
    card = json.loads((out / "test1" / "meta_model.json").read_text())
    assert card["access"] == "black_box" and card["init"] == "random" and card["generation_events"] >= 1
    header, *rows = (out / "curve.csv").read_text().splitlines()
    columns = header.split(",")
    assert {"generated", "kd_loss", "api_queries", "memory_classes"} <= set(columns)
    final = dict(zip(columns, rows[-1].split(",")))
    assert card["api_queries"] == int(float(final["api_queries"])) > 0  # the card's budget is the curve's last
    log = (workdir / "logs" / "metatrain" / "tiny" / "bidfmkd" / "seed0" / "shot1.log").read_text()
    assert f"API budget used: {card['api_queries']:,} queries over 2 black-box members" in log
    assert card["settings"]["scenario"] == json.loads(
        (workdir / "results/metatrain/tiny/purer/seed0/shot1/test1/meta_model.json").read_text())["settings"]["scenario"]


def test_profile_recovery_splits_one_recovery_of_a_real_member(run):
    import subprocess
    import sys

    workdir, _ = run
    proc = subprocess.run([sys.executable, "tools/profile_recovery.py", "--pool", "results/pool/tiny", "--q", "4",
                           "--steps", "2", "--per-class", "2", "--generator-width", "4", "--device", "cpu"],
                          cwd=workdir, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(workdir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    shares = [int(line.split("|")[3].strip().rstrip("%")) for line in lines if line.startswith("| ")
              and not line.startswith("| part") and "total" not in line]
    assert len(shares) == 3 and abs(sum(shares) - 100) <= 2  # the three parts add up to the whole
    assert "\n100 queries" in proc.stdout  # 2 steps x 5 classes x 2 images x (4 + 1)


def test_a_comparison_with_start_resolves_from_the_cards_of_the_run(run):
    workdir, _ = run
    card = json.loads((workdir / "results/metatrain/tiny/taco/seed0/shot1/test1/meta_model.json").read_text())
    start = f"{card['init']}_protonet"  # TACO adapts with ProtoNet: its start is scored with it
    with open(workdir / "results" / "plots" / "comparisons.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["a"] == "taco" and r["calibration"] == "plain"]
    assert {r["b"] for r in rows} == {f"{start} (start)"} and len(rows) == 2  # one per protocol
    assert all(r["over"] == "episodes" and r["seeds"] == "1" for r in rows)  # one seed: within-run view, said so
    summary = (workdir / "results" / "summary.md").read_text()
    assert "do **not** include training variance" in summary
