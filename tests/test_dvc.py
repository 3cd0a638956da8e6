"""DVC on top of Snakemake: dvc.yaml mirrors the rules (fast, static checks) and a real temporary git + DVC
repository runs the whole pipeline on a tiny Omniglot config (slow): repro, no-op repro, a meta-test-only
experiment, exp show, push to a local remote and pull into a fresh clone that Snakemake agrees with."""

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, copy_project, shared_dir
from dfml.codedeps import DIGESTS_FILE, digest_key, module_file, script_code_files, sync_dvc_deps

DVC_FILES = ["dvc.yaml", ".dvcignore", ".gitignore"]
STAGE_RULE_FILES = {"data": ["data"], "pool": ["pool"], "invert": ["invert"], "metatrain": ["metatrain"],
                    "metatest": ["metatest"], "report": ["report"]}
STAGES = list(STAGE_RULE_FILES)
GLOBALS = {"SCENARIOS": "scenarios", "DATASETS": "datasets", "RUN_SCENARIOS": "run_scenarios",
           "METHODS": "methods", "BASELINES": "metatest", "PROTOCOLS": "evaluation",
           "TRAINING_SEEDS": "training_seeds"}


def dvc_stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def rule_text(phase: str) -> str:
    return (REPO_ROOT / "workflow" / "rules" / f"{phase}.smk").read_text()


def common_functions() -> dict[str, str]:
    """Top-level function bodies of common.smk (and dfml.pool.member_settings, which reads the config)."""
    text = (REPO_ROOT / "workflow" / "rules" / "common.smk").read_text()
    bodies = dict(re.findall(r"^def (\w+)\(.*?\n((?:[ \t]+.*\n|\n)*)", text, re.M))
    pool = (REPO_ROOT / "dfml" / "pool.py").read_text()
    bodies["member_settings"] = re.search(r"^def member_settings\(.*?\n((?:[ \t]+.*\n|\n)*)", pool, re.M)[1]
    return bodies


def config_keys(text: str, functions: dict[str, str], seen: set[str] | None = None) -> set[str]:
    """Top-level params.yaml keys that `text` reads, directly or through the common.smk helpers it calls."""
    seen = set() if seen is None else seen
    keys = set(re.findall(r"""(?:config|params)\[["'](\w+)["']\]""", text))
    keys |= {key for name, key in GLOBALS.items() if re.search(rf"\b{name}\b", text)}
    for name, body in functions.items():
        if name not in seen and re.search(rf"\b{name}\(", text):
            seen.add(name)
            keys |= config_keys(body, functions, seen)
    return keys


def test_each_stage_runs_its_phase_target_with_only_its_rules():
    for name, stage in dvc_stages().items():
        cmd = stage["cmd"].split()
        rules = {r for phase in STAGE_RULE_FILES[name]  # rules, and rules derived with `use rule a as b`
                 for r in re.findall(r"^(?:rule (\w+):|use rule \w+ as (\w+))", rule_text(phase), re.M) for r in r if r}
        allowed = set(cmd[cmd.index("--allowed-rules") + 1:])
        assert allowed == rules, name
        assert cmd[:2] == ["snakemake", cmd[1]] and cmd[1] in rules, name  # the target rule is allowed
        assert not {"--profile", "--workflow-profile", "--executor", "-e", "--jobs", "-j"} & set(cmd), name
        assert stage.get("persist", False) is False, name
    assert list(dvc_stages()) == STAGES


def test_only_the_report_stage_has_git_tracked_outs():
    """DVC saves no run cache for a stage with a plain `cache: false` out (metrics and plots excepted): keep
    those in the cheap report stage, so that revisiting a configuration restores the expensive phases from
    the run cache instead of recomputing them (docs/versioning.md shows it on a real sweep)."""
    for name, stage in dvc_stages().items():
        uncached = [next(iter(o)) for o in stage["outs"] if isinstance(o, dict) and not o[next(iter(o))]["cache"]]
        assert uncached == ([] if name != "report" else ["results/summary.md", "results/plots"]), name
        for metric in stage.get("metrics", []):
            assert metric[next(iter(metric))]["cache"] is False, name


def test_stage_deps_and_params_mirror_the_rules():
    functions = common_functions()
    for name, stage in dvc_stages().items():
        text = "".join(rule_text(phase) for phase in STAGE_RULE_FILES[name])
        deps = set(stage["deps"])
        scripts = set(re.findall(r'code=job_code\("(scripts/[\w.]+)"', text))
        code = {f for script in scripts for f in [script] + script_code_files(REPO_ROOT / script, REPO_ROOT)}
        rule_files = {f"workflow/rules/{phase}.smk" for phase in STAGE_RULE_FILES[name]}
        assert rule_files | {"Snakefile", "workflow/rules/common.smk"} <= deps, name
        # code is compared by digest (params), never byte for byte (deps): a comment must not rerun a stage
        assert not [d for d in deps if d.startswith(("dfml", "scripts"))], name
        assert (REPO_ROOT / "workflow/schemas/params.schema.yaml").is_file() and \
            "workflow/schemas/params.schema.yaml" in deps, name  # schema defaults are params too
        keys = [p for p in stage["params"] if isinstance(p, str)]
        code_params = [p for p in stage["params"] if isinstance(p, dict)]
        assert set(keys) == config_keys(text, functions), name
        assert code_params == [{DIGESTS_FILE: sorted(digest_key(f) for f in code)}], name


def test_dvc_yaml_and_the_code_digests_are_in_sync_with_the_code():
    """tools/sync_dvc_deps.py --check: each stage lists its code's digest keys, and the digests are current."""
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import sync_dvc_deps as tool

    for path, wanted in tool.wanted_files(REPO_ROOT).items():
        assert path.read_text() == wanted, f"{path.name} is out of date: run python tools/sync_dvc_deps.py"
    assert sync_dvc_deps((REPO_ROOT / "dvc.yaml").read_text(), REPO_ROOT) == (REPO_ROOT / "dvc.yaml").read_text()


def test_every_rule_output_is_an_out_of_its_stage_or_a_dep_from_upstream():
    stages = dvc_stages()
    for name, stage in stages.items():
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", []) + stage.get("metrics", [])]
        text = "".join(rule_text(phase) for phase in STAGE_RULE_FILES[name])
        for path in set(re.findall(r'"((?:data|results)/[^"]+)"', text)):
            if path.startswith("results/checkpoints/"):
                continue  # resumable scratch state, deliberately not versioned
            covered = [p for p in outs + stage["deps"] if path == p or path.startswith(p.rstrip("/") + "/")]
            assert covered, f"{name}: {path} is neither an out nor a dep"
    assert "results/checkpoints" not in json.dumps(stages)


# -- a real git + DVC repository ----------------------------------------------------------------------


def tiny_params(omniglot_root: Path) -> dict:
    return {
        "seed": 1,
        "training_seeds": [0],  # DVC needs every params key its stages list
        "run_scenarios": ["tiny"],
        "datasets": {"omni": {"source": "omniglot", "options": {"root": str(omniglot_root), "image_size": 28}}},
        "models": {"conv4": {"arch": "conv4", "width": 4}},
        "scenarios": {"tiny": {"datasets": ["omni"], "architectures": ["conv4"], "members_per_dataset": 2,
                               "image_size": 28, "channels": 1}},
        "pretrain": {"epochs": 1, "batch_size": 32},
        "inversion": {"warm_start_steps": 2, "slots_per_class": 6},
        "metatrain": {"shots": [1], "query": 5, "iterations": 2, "eval_every": 1, "checkpoint_every": 1,
                      "val_episodes": 2, "meta_model": {"width": 4}},
        "methods": {"purer": {"algorithm": "purer", "eci": True, "lambda_adv": 10.0, "warmup": 1, "patience": 1}},
        "evaluation": {"query": 5, "protocols": {"test1": {"test_steps": 1}}},
        "metatest": {"episodes": 6, "baselines": [],
                     "icfil": {"inv_steps": 2, "cal_steps": 1},
                     "icfil_tuning": {"episodes": 2, "grid": {"tau": [0.1], "cal_steps": [1]}}},
        "report": {"comparisons": []},  # DVC needs every params key its stages list
    }


ARTIFACTS = ["data/omni/splits.json", "results/pool/tiny/member_1.safetensors",
             "results/synthetic/tiny/seed0/pseudo.safetensors", "results/metatrain/tiny/purer/seed0/shot1/test1/meta_model.safetensors",
             "results/icfil/tiny/purer/seed0/test1/shot1.json", "results/metatest/tiny/purer/seed0/test1/shot1_icfil.json",
             "results/metrics.json"]


def run(cwd: Path, *cmd: str) -> str:
    # PYTHONPATH: jobs import the copy of dfml that DVC hashes as a dep, not the checkout's editable install.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd), "DFML_DEVICE": "cpu", "OMP_WAIT_POLICY": "PASSIVE", "DVC_NO_ANALYTICS": "1"}
    env.pop("SNAKEMAKE_PROFILE", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-6000:]}")
    return output


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC repository with the tiny pipeline reproduced and committed, and pushed to a local remote."""
    root = tmp_path_factory.mktemp("dvc")
    work = root / "work"
    work.mkdir()
    copy_project(work, tiny_params(shared_dir() / "data" / "omniglot"))
    for name in DVC_FILES:
        shutil.copy(REPO_ROOT / name, work / name)
    run(work, "git", "init", "-q")
    run(work, "git", "config", "user.name", "dfml test")
    run(work, "git", "config", "user.email", "test@dfml.invalid")
    run(work, "dvc", "init", "-q")
    run(work, "dvc", "config", "core.analytics", "false")
    run(work, "dvc", "remote", "add", "-d", "local", str(root / "remote"))
    run(work, "git", "add", "-A")
    run(work, "git", "commit", "-qm", "tiny project")
    first = run(work, "dvc", "repro")
    run(work, "git", "add", "-A")
    run(work, "git", "commit", "-qm", "tiny run")
    artifacts = {path: (work / path).read_bytes() for path in ARTIFACTS}
    pushed = run(work, "dvc", "push")
    return {"root": root, "work": work, "first": first, "artifacts": artifacts, "pushed": pushed}


@pytest.mark.slow
def test_repro_builds_every_phase_and_git_tracks_metrics_and_plots(repo):
    work = repo["work"]
    assert ran_stages(repo["first"]) == STAGES
    metrics = json.loads((work / "results" / "metrics.json").read_text())
    assert metrics["tiny"]["purer"]["1shot"]["icfil"]["episodes"] == 6
    tracked = run(work, "git", "ls-files", "results", "dvc.lock").split()
    assert {"dvc.lock", "results/metrics.json", "results/summary.md", "results/plots/accuracy.csv",
            "results/plots/metaval_curves.csv"} <= set(tracked)
    assert not [p for p in tracked if p.startswith(("results/pool/", "results/metatrain/", "data/"))]
    assert run(work, "git", "status", "--porcelain").strip() == ""


@pytest.mark.slow
def test_second_repro_runs_no_stage(repo):
    output = run(repo["work"], "dvc", "repro")
    assert ran_stages(output) == [] and "Data and pipelines are up to date" in output


def changed_stages(work: Path) -> set[str]:
    """The stages `dvc status` reports changed, after tools/sync_dvc_deps.py refreshed the code digests."""
    run(work, sys.executable, "tools/sync_dvc_deps.py")
    return set(json.loads(run(work, "dvc", "status", "--json")))


@contextmanager
def edited(path: Path, change):
    original = path.read_bytes()
    path.write_text(change(path.read_text()))
    try:
        yield
    finally:
        path.write_bytes(original)


def commented(text: str) -> str:
    """A comment and a reworded module docstring: no code changes."""
    return text.replace('"""', '"""Reworded. ', 1) + "\n# a comment\n"


@pytest.mark.slow
def test_dvc_follows_code_changes_not_comments(repo):
    """Code is a stage's params (workflow/code_digests.yaml): a comment or docstring edit leaves `dvc status`
    clean, a code edit reports the stages that run the file and no other."""
    work = repo["work"]
    if changed_stages(work):  # a checkout whose dvc.yaml lags its code (test_dvc_yaml_and_the_code_digests_... fails)
        run(work, "dvc", "commit", "-f", "-q")
        run(work, "git", "commit", "-qam", "dvc.yaml and the code digests in sync with the code")
    probe = lambda text: text + "\n_RERUN_PROBE = 1\n"  # noqa: E731
    purer, kernel = module_file("dfml.methods.purer", work), module_file("dfml.inversion.fused_conv4", work)
    with edited(purer, commented), edited(kernel, commented), edited(work / "scripts/metatest.py", commented):
        assert changed_stages(work) == set()
        assert "Data and pipelines are up to date" in run(work, "dvc", "status")
    with edited(purer, probe):
        assert changed_stages(work) == {"metatrain"}
    with edited(kernel, probe):
        assert changed_stages(work) == {"invert", "metatrain"}
    with edited(module_file("dfml.models.ota", work), probe):
        assert changed_stages(work) == {"metatrain", "metatest"}  # metatrain.init may be ota, a baseline may be
    assert changed_stages(work) == set()
    assert run(work, "git", "status", "--porcelain").strip() == ""  # the digests are back as committed


@pytest.fixture(scope="module")
def experiment(repo):
    """A workspace experiment on a meta-test-only key, through the script that turns a config overlay into
    `dvc exp run -S` overrides."""
    return run(repo["work"], sys.executable, "tools/dvc_experiment.py", "run", "--set", "metatest.episodes=4",
               "-n", "fewer-episodes")


@pytest.mark.slow
def test_experiment_on_a_metatest_key_reruns_only_metatest_and_exp_show_carries_it(repo, experiment):
    work = repo["work"]
    assert ran_stages(experiment) == ["metatest", "report"]
    for stage in ("data", "pool", "invert", "metatrain"):
        assert f"Stage '{stage}' didn't change, skipping" in experiment
    rows = json.loads(run(work, "dvc", "exp", "show", "--json"))
    baseline = next(row for row in rows if row["rev"] != "workspace")
    exp_row = next(e["revs"][0] for e in baseline["experiments"] if e["name"] == "fewer-episodes")
    for row, episodes in ((baseline, 6), (exp_row, 4)):
        params = row["data"]["params"]["params.yaml"]["data"]
        metrics = row["data"]["metrics"]["results/metrics.json"]["data"]
        assert params["metatest"]["episodes"] == episodes
        assert metrics["tiny"]["purer"]["1shot"]["plain"]["episodes"] == episodes
    diff = run(work, "dvc", "params", "diff", "HEAD", "fewer-episodes")
    assert re.search(r"metatest\.episodes\s+6\s+4", diff)
    assert "tiny.purer.1shot.plain.episodes" in run(work, "dvc", "metrics", "diff", "HEAD", "fewer-episodes")


def exp_show_row(work: Path, name: str) -> dict:
    rows = json.loads(run(work, "dvc", "exp", "show", "--json"))
    baseline = next(row for row in rows if row["rev"] != "workspace")
    return next(e["revs"][0] for e in baseline["experiments"] if e["name"] == name)["data"]


@pytest.mark.slow
def test_a_snakemake_run_with_a_config_overlay_is_saved_as_an_experiment_without_rerunning(repo, experiment):
    """The benchmarks run under Snakemake (`--configfile`); `dvc_experiment.py save` records that workspace as
    an experiment whose params are the overlay's, with no stage run again."""
    work = repo["work"]
    (work / "overlay.yaml").write_text(yaml.safe_dump({"metatest": {"episodes": 3}}))
    run(work, "snakemake", "--cores", "2", "--configfile", "overlay.yaml")
    saved = run(work, sys.executable, "tools/dvc_experiment.py", "save", "--configfile", "overlay.yaml",
                "-n", "from-snakemake")
    assert ran_stages(saved) == []
    data = exp_show_row(work, "from-snakemake")
    assert data["params"]["params.yaml"]["data"]["metatest"]["episodes"] == 3
    assert data["metrics"]["results/metrics.json"]["data"]["tiny"]["purer"]["1shot"]["icfil"]["episodes"] == 3
    assert "Data and pipelines are up to date" in run(work, "dvc", "status")


@pytest.mark.slow
def test_an_experiment_adds_bidfmkd_and_trains_only_it_on_the_same_pool(repo, experiment):
    """A method added by `dvc exp run -S` (Hydra's + appends a key): the data, pool and inversion stages are
    skipped; DVC empties the meta-training stage's outs before running it, so PURER's job reruns too, but it
    restores its model from its finished checkpoint (results/checkpoints/ is not an out) instead of training."""
    work = repo["work"]
    tiny = ("{algorithm: bidfmkd, q: 4, recovery_steps: 2, support_per_class: 4, query_per_class: 5, latent_dim: 8,"
            " generator_width: 4, kd_steps: 1}")
    output = run(work, "dvc", "exp", "run", "-n", "with-bidfmkd", "-S", f"+methods.bidfmkd={tiny}")
    assert ran_stages(output) == ["metatrain", "metatest", "report"]
    assert "method=bidfmkd" in output  # the job's wildcards
    purer_log = (work / "logs" / "metatrain" / "tiny" / "purer" / "seed0" / "shot1.log").read_text()
    assert "resuming from results/checkpoints/tiny/purer/seed0/shot1.safetensors at meta-iteration 2" in purer_log
    metrics = json.loads((work / "results" / "metrics.json").read_text())
    assert set(metrics["tiny"]) >= {"purer", "bidfmkd"}
    card = json.loads((work / "results/metatrain/tiny/bidfmkd/seed0/shot1/test1/meta_model.json").read_text())
    assert card["access"] == "black_box" and card["api_queries"] > 0


@pytest.mark.slow
def test_push_then_pull_into_a_fresh_clone_restores_artifacts_snakemake_agrees_with(repo):
    root, work = repo["root"], repo["work"]
    clone = root / "clone"
    run(root, "git", "clone", "-q", str(work), str(clone))
    assert not (clone / "results" / "metatrain").exists()
    assert re.search(r"\d+ files? pushed", repo["pushed"])
    pulled = run(clone, "dvc", "pull")
    assert re.search(r"\d+ files? fetched", pulled) and "up to date" in run(clone, "dvc", "status")
    for path, content in repo["artifacts"].items():
        assert (clone / path).read_bytes() == content, path
    run(clone, "tools/dvc_touch.sh")
    assert "Nothing to be done" in run(clone, "snakemake", "--cores", "1", "-n")


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_a_configs_overrides_make_dvc_write_the_merge_snakemake_reads(config, tmp_path):
    """DVC's own Hydra parser applies the -S overrides of every shipped config: params.yaml then holds exactly
    what `snakemake --configfile` merges (types included: 10.0 stays a float, lists are replaced whole)."""
    from dvc.utils.hydra import apply_overrides

    from dfml.config import deep_merge, hydra_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(REPO_ROOT / "params.yaml", params)
    base, overlay = yaml.safe_load(params.read_text()), yaml.safe_load(config.read_text())
    apply_overrides(params, hydra_overrides(base, overlay))
    assert yaml.safe_load(params.read_text()) == deep_merge(base, overlay)


def test_dvc_experiment_refuses_a_bad_overlay_before_running_dvc():
    from dfml.config import ParamsError

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import dvc_experiment

    with pytest.raises(ParamsError, match=r"metatrain.time_budget"):
        dvc_experiment.main(["run", "--set", "metatrain.time_budget=0", "--params", str(REPO_ROOT / "params.yaml")])
    with pytest.raises(SystemExit, match=r"--set 'episodes': expected key=value"):
        dvc_experiment.main(["print", "--set", "episodes"])


def test_dvc_experiment_save_names_the_git_versioned_outs_a_snakemake_run_leaves_untracked():
    """In a clone where Snakemake made the results, dvc.lock and the report's cache: false outs are untracked;
    `dvc exp save` keeps untracked files out of the experiment unless they are named (-I)."""
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import dvc_experiment

    outs = dvc_experiment.git_versioned_outs(REPO_ROOT / "dvc.yaml")
    assert sorted(outs) == ["results/metrics.json", "results/plots", "results/summary.md"]
