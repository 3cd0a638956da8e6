"""The shipped override files (configs/*.yaml) stay valid against the params schema."""

import json
import re
import shutil
from collections import Counter

import pytest
import yaml

from conftest import REPO_ROOT, copy_project, params_for_own_methods, run_snakemake
from dfml.config import ParamsError, check_params, load_params

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {path.name for path in CONFIGS} >= {"omniglot.yaml", "eci_study.yaml", "icfil_control.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_each_config_merges_over_params_and_validates(config):
    params = load_params(REPO_ROOT / "params.yaml", [config])
    assert set(params["run_scenarios"]) <= set(params["scenarios"])
    assert {"purer", "purer_ei"} <= set(params["methods"])
    # a study names its own scenarios and methods: params.yaml's (the default run's) change with the demo
    assert {"run_methods", "run_scenarios"} <= set(yaml.safe_load(config.read_text())) or \
        config.name == "attack_weights.yaml"  # merged over attack.yaml, which names them


def params_with(methods: dict) -> dict:
    base = params_for_own_methods()
    return check_params({**base, "methods": methods})


def test_every_method_names_a_known_algorithm():
    with pytest.raises(ParamsError, match=r"methods.p.algorithm: unknown algorithm 'fre'; known: bidfmkd, free, purer, "
                                          r"taco, tgr$"):
        params_with({"p": {"algorithm": "fre"}})
    with pytest.raises(ParamsError, match=r"methods.p: no algorithm: name one of bidfmkd, free, purer, taco, tgr"):
        params_with({"p": {"eci": True}})


def test_a_setting_the_algorithm_does_not_have_is_refused_naming_it():
    with pytest.raises(ParamsError, match=r"methods.p.q_directions is not a setting of algorithm 'purer' "
                                          r"\(its settings: .*eci.*lambda_adv"):
        params_with({"p": {"algorithm": "purer", "q_directions": 100}})


def test_the_schema_fills_each_algorithms_defaults():
    methods = params_with({"p": {"algorithm": "purer"}, "b": {"algorithm": "bidfmkd", "q": 8}})["methods"]
    assert methods["p"] == {"algorithm": "purer", "eci": True, "warmup": 4000, "patience": 6,
                            "adversarial_step": "shared", "train_steps": 1}
    paper = {"q": 100, "mu": 0.005, "recovery_steps": 200, "support_per_class": 30, "query_per_class": 30,
             "kd_steps": 10, "boundary_start": 4000, "generate_interval": 200, "train_steps": 5,
             "boundary_through_student": False, "flip": False}  # BiDf-MKD's (METHODS.md 4.1, 4.5)
    assert methods["b"]["q"] == 8 and {k: methods["b"][k] for k in paper if k != "q"} == \
        {k: v for k, v in paper.items() if k != "q"}


def test_a_setting_of_another_algorithm_is_refused_naming_the_right_ones():
    with pytest.raises(ParamsError, match=r"methods.b.eci is not a setting of algorithm 'bidfmkd' "
                                          r"\(its settings: .*q, mu"):
        params_with({"b": {"algorithm": "bidfmkd", "eci": True}})


def test_a_misspelt_option_in_an_override_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods:\n  purer: {adversarial_stepp: separate}\n")
    with pytest.raises(ParamsError, match="methods.purer.adversarial_stepp is not a setting of algorithm 'purer'"):
        load_params(REPO_ROOT / "params.yaml", [bad])


# ----------------------------------------------------------------------------- configs/cifarfs_paper.yaml

PAPER = REPO_ROOT / "configs" / "cifarfs_paper.yaml"


def test_cifarfs_paper_config_holds_purers_settings():
    """PURER's full CIFAR-FS run (METHODS.md 1.2-1.5, 2.2-2.5): validated and deep-merged over params.yaml."""
    params = load_params(REPO_ROOT / "params.yaml", [PAPER])
    assert params["run_scenarios"] == ["cifarfs_ss", "cifarfs_sh"]
    assert params["seed"] == 2022
    ss, sh = params["scenarios"]["cifarfs_ss"], params["scenarios"]["cifarfs_sh"]
    assert (ss["members_per_dataset"], ss["architectures"], ss["image_size"], ss["channels"]) == (13, ["conv4"], 32, 3)
    assert (sh["members_per_dataset"], sh["architectures"]) == (13, ["conv4", "resnet10", "resnet18"])
    assert params["models"] == {"conv4": {"arch": "conv4", "width": 32}, "resnet10": {"arch": "resnet10", "width": 64},
                                "resnet18": {"arch": "resnet18", "width": 64}}
    pre = params["pretrain"]
    assert (pre["epochs"], pre["batch_size"], pre["heldout_fraction"], pre["grad_clip"]) == (60, 128, 0.2, 50.0)
    assert pre["conv4"].items() >= {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0, "milestones": [30, 40, 50],
                                    "gamma": 0.2}.items()  # (the schema fills a momentum Adam does not read)
    assert pre["resnet"].items() >= {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005,
                                     "milestones": [30, 40, 50], "gamma": 0.2}.items()
    inv = params["inversion"]
    assert (inv["lr"], inv["warm_start_steps"]) == (0.25, 0)
    assert inv["slots_per_class"] >= max(params["metatrain"]["shots"]) + params["metatrain"]["query"]
    assert inv["weights"] == {"ce": 1.0, "bn": 0.01, "first_bn_multiplier": 1.0, "tv": 1e-4, "l2": 1e-5, "jitter": 2,
                              "flip": False}
    mt = params["metatrain"]
    assert {k: mt[k] for k in ("shots", "way", "query", "learner", "inner_lr", "train_steps", "meta_batch", "outer_lr",
                               "iterations", "eval_every", "val_episodes", "init")} == {
        "shots": [1, 5], "way": 5, "query": 15, "learner": "maml", "inner_lr": 0.01, "train_steps": 1,
        "meta_batch": 4, "outer_lr": 0.001, "iterations": 60000, "eval_every": 2000, "val_episodes": 600,
        "init": "auto"}
    assert mt["meta_model"] == {"width": 32, "pooling": "flatten"}
    assert 0 < mt["checkpoint_every"] <= 1000 and mt["eval_every"] % mt["checkpoint_every"] == 0
    assert params["run_methods"] == ["purer", "purer_ei"]
    purer = params["methods"]["purer"]
    assert (purer["eci"], purer["lambda_adv"], purer["warmup"], purer["patience"]) == (True, 10.0, 4000, 6)
    assert params["methods"]["purer_ei"]["eci"] is False
    assert params["evaluation"] == {"query": 15, "protocols": {"test1": {"test_steps": 1}}}
    test = params["metatest"]
    assert test["episodes"] == 600 and {"plain", "icfil"} <= set(test["calibrations"])
    assert test["icfil_tuning"]["episodes"] == 600  # ICFIL tuned on 600 meta-val episodes (METHODS 1.5)
    assert (test["icfil"]["n_hat"], test["icfil"]["inv_steps"], test["icfil"]["tau"], test["icfil"]["cal_steps"]) == (
        5, 200, 0.1, 5)
    assert set(test["baselines"]) == {"random", "average", "ota"}
    header = PAPER.read_text().split("\nrun_scenarios:")[0]
    assert "snakemake --workflow-profile workflow/profiles/slurm --configfile configs/cifarfs_paper.yaml" in header


def dry_run_jobs(output: str) -> list[dict]:
    """The jobs `snakemake -n` prints: rule, wildcards, resources and the --settings-json of each."""
    jobs, job = [], None
    for line in output.splitlines():
        if match := re.fullmatch(r"(?:local)?(?:rule|checkpoint) (\w+):", line.strip()):
            job = {"rule": match.group(1), "wildcards": {}, "resources": {}, "settings": None}
            jobs.append(job)
        elif job is not None and line.startswith("    ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            if key in ("wildcards", "resources"):
                job[key] = dict(item.split("=", 1) for item in value.split(", "))
        elif job is not None and line.startswith("Shell command:"):
            if settings := re.search(r"--settings-json '(\{.*?\})'", line):
                job["settings"] = json.loads(settings.group(1))
    return jobs


@pytest.mark.slow
def test_cifarfs_paper_dry_run_with_the_slurm_profile_plans_the_paper_jobs(tmp_path):
    """`snakemake -n --workflow-profile workflow/profiles/slurm --configfile configs/cifarfs_paper.yaml` in a copy
    of the project (no data, no results: every job is planned; a dry run submits nothing, so no cluster)."""
    project = copy_project(tmp_path)
    (project / "configs").mkdir()
    shutil.copy(PAPER, project / "configs" / PAPER.name)
    proc = run_snakemake(project, "-n", "--workflow-profile", "workflow/profiles/slurm",
                         "--configfile", "configs/cifarfs_paper.yaml", timeout=600)
    jobs = dry_run_jobs(proc.stdout + proc.stderr)
    counts = Counter(job["rule"] for job in jobs)
    assert counts == {"prepare_dataset": 1, "pretrain_model": 26, "summarize_pool": 2, "invert_pool": 2,
                      "metatrain": 8, "metatest": 12, "metatest_plain": 4, "report": 1, "all": 1}, counts

    members = [job for job in jobs if job["rule"] == "pretrain_model"]
    for scenario in ("cifarfs_ss", "cifarfs_sh"):  # 13 pool members per scenario, one job each
        assert sorted(int(j["wildcards"]["member"]) for j in members
                      if j["wildcards"]["scenario"] == scenario) == list(range(13))
    for job in members:
        settings = job["settings"]
        assert settings["pretrain"]["epochs"] == 60 and settings["pretrain"]["batch_size"] == 128
        assert settings["width"] == (32 if settings["arch"] == "conv4" else 64)
        expected = "conv4" if job["wildcards"]["scenario"] == "cifarfs_ss" else [
            "conv4", "resnet10", "resnet18"][settings["index"] % 3]
        assert settings["arch"] == expected
        assert job["resources"]["gpu"] == "0" and job["resources"]["slurm_partition"] == "cpu"

    trainings = [job for job in jobs if job["rule"] == "metatrain"]
    planned = sorted((j["wildcards"]["scenario"], j["wildcards"]["method"], j["wildcards"]["shot"]) for j in trainings)
    assert planned == [(s, m, k) for s in ("cifarfs_sh", "cifarfs_ss") for m in ("purer", "purer_ei") for k in "15"]
    for job in trainings:  # the profile's GPU request, and PURER's numbers reach the job
        assert job["resources"]["gpu"] == "1" and job["resources"]["slurm_partition"] == "gpu"
        settings = job["settings"]
        assert settings["metatrain"]["iterations"] == 60000 and settings["metatrain"]["val_episodes"] == 600
        assert settings["metatrain"]["eval_every"] == 2000
        if job["wildcards"]["method"] == "purer":
            assert settings["method"]["warmup"] == 4000 and settings["method"]["lambda_adv"] == 10.0

    tests = [job for job in jobs if job["rule"] in ("metatest", "metatest_plain")]
    planned = {(j["wildcards"]["scenario"], j["wildcards"]["method"]) for j in tests}
    assert planned == {("cifarfs_ss", m) for m in ("purer", "purer_ei", "random", "average", "ota")} | {
        ("cifarfs_sh", m) for m in ("purer", "purer_ei", "random")}  # fusions only where the pool is conv4
    assert all(j["settings"]["metatest"]["episodes"] == 600 for j in tests)


def test_run_methods_must_name_configured_methods_and_studies_keep_their_own():
    base = params_for_own_methods()
    with pytest.raises(ParamsError, match=r"run_methods: unknown method 'tacoo'; defined methods: \['bidfmkd', 'free', "
                                          r"'purer', 'purer_ei', 'taco', 'tgr'\]"):
        check_params({**base, "run_methods": ["purer", "tacoo"]})
    for config in CONFIGS:  # a method added to params.yaml (taco, free, tgr) does not join a study written before it
        params = load_params(REPO_ROOT / "params.yaml", [config])
        if not config.name.startswith(("heterogeneity", "benchmark")):  # FREE and TGR's study, the benchmark
            assert not {"free", "tgr"} & set(params["run_methods"]), config.name
        if not config.name.startswith(("attack", "heterogeneity", "benchmark")):  # they run TACO on purpose
            assert "taco" not in params["run_methods"], config.name
        if not config.name.startswith(("bidfmkd", "attack", "heterogeneity", "benchmark")):  # BiDf-MKD joined params.yaml last
            assert "bidfmkd" not in params["run_methods"], config.name
    follow_up = load_params(REPO_ROOT / "params.yaml", [REPO_ROOT / "configs" / n for n in ("attack.yaml",
                                                                                         "attack_weights.yaml")])
    assert follow_up["run_methods"] == ["taco_rw_pseudo_events", "taco_rw_metaval_events"]


def test_the_default_runs_short_taco_trigger_stays_out_of_the_studies():
    """params.yaml's TACO fires a generation event after 3 flat iterations (its 24-iteration demo); a study deep-merges
    over params.yaml, so each one that runs TACO names its own trigger: the paper's 10 (the attack study's 20)."""
    assert load_params(REPO_ROOT / "params.yaml")["methods"]["taco"]["generate_interval"] == 3
    runs_taco = 0
    for config in CONFIGS:  # (a study's own TACO entries under other names set their trigger themselves)
        params = load_params(REPO_ROOT / "params.yaml", [config])
        if "taco" in params["run_methods"]:
            runs_taco += 1
            assert params["methods"]["taco"]["generate_interval"] >= 10, config.name
    assert runs_taco == 3  # attack, benchmark, heterogeneity


def test_a_method_trains_and_tests_with_its_own_learner():
    from dfml.config import method_metatrain

    params = load_params(REPO_ROOT / "params.yaml")
    metatrain = params["metatrain"]
    assert params["methods"]["taco"]["learner"] == "protonet"  # the schema's default for TACO
    assert method_metatrain(metatrain, params["methods"]["taco"])["learner"] == "protonet"
    assert method_metatrain(metatrain, params["methods"]["purer"])["learner"] == metatrain["learner"] == "maml"
    assert method_metatrain(metatrain, None)["learner"] == "maml"  # a baseline: metatrain's
    assert "shots" not in method_metatrain(metatrain, None)


def test_a_method_can_train_for_its_own_number_of_iterations_or_time_budget():
    """A study gives methods of different cost per iteration the same wall time: a time budget, pinned to the
    iterations it reached for an exact replay."""
    from dfml.config import method_metatrain

    base = params_for_own_methods()
    metatrain = base["metatrain"]
    for algorithm in ("purer", "bidfmkd", "taco", "tgr", "free"):
        params = check_params({**base, "methods": {"m": {"algorithm": algorithm, "iterations": 7,
                                                          "time_budget": 60}}})
        assert method_metatrain(metatrain, params["methods"]["m"])["iterations"] == 7
        assert method_metatrain(metatrain, params["methods"]["m"])["time_budget"] == 60
    assert method_metatrain(metatrain, {"algorithm": "purer"})["iterations"] == metatrain["iterations"]
    with pytest.raises(ParamsError, match="methods.m.iterations"):
        check_params({**base, "methods": {"m": {"algorithm": "free", "iterations": 0}}})
    # the replay of a time-budgeted run: each shot's iterations pinned, the budget lifted
    budgeted = {**metatrain, "time_budget": 120}
    replay = check_params({**base, "methods": {"m": {"algorithm": "tgr", "iterations": {"shot1": 31, "shot5": 27},
                                                        "time_budget": None}}})["methods"]["m"]
    assert method_metatrain(budgeted, replay, shot=5)["iterations"] == 27
    assert method_metatrain(budgeted, replay, shot=1) == {**method_metatrain(budgeted, None), "iterations": 31,
                                                          "time_budget": None, "train_steps": 5}
    with pytest.raises(ParamsError, match=r"iterations are pinned for \['shot1', 'shot5'\], not for shot10"):
        method_metatrain(budgeted, replay, shot=10)
    for bad in ({"1": 31}, {"shot1": 0}, {}):
        with pytest.raises(ParamsError, match="methods.m.iterations"):
            check_params({**base, "methods": {"m": {"algorithm": "purer", "iterations": bad}}})
    with pytest.raises(ParamsError, match="metatrain.time_budget"):
        check_params({**base, "metatrain": {**metatrain, "time_budget": 0}})


def test_each_method_meta_trains_with_its_papers_inner_steps_unless_its_entry_says_otherwise():
    """PURER's scripts take 1 inner step, BiDf-MKD's, TACO's, FREE's and TGR's 5 (METHODS.md 4.5): the schema fills
    them per algorithm, and a metatrain job's learner adapts with them."""
    from argparse import Namespace

    from dfml.config import method_metatrain
    from dfml.metatrain import job_settings
    from dfml.evaluation.protocol import make_learner

    base = params_for_own_methods()
    papers = {"purer": 1, "bidfmkd": 5, "taco": 5, "tgr": 5, "free": 5}
    for algorithm, steps in papers.items():
        entry = check_params({**base, "methods": {"m": {"algorithm": algorithm}}})["methods"]["m"]
        assert method_metatrain({**base["metatrain"], "train_steps": 3}, entry)["train_steps"] == steps, algorithm
        entry = check_params({**base, "methods": {"m": {"algorithm": algorithm, "train_steps": 2}}})["methods"]["m"]
        assert method_metatrain(base["metatrain"], entry)["train_steps"] == 2, algorithm
    assert method_metatrain({**base["metatrain"], "train_steps": 3}, None)["train_steps"] == 3  # a baseline
    with pytest.raises(ParamsError, match="methods.m.train_steps"):
        check_params({**base, "methods": {"m": {"algorithm": "tgr", "train_steps": 0}}})
    for method, steps in (("purer", 1), ("free", 5), ("tgr", 5)):  # what run_job builds its learner from
        args = Namespace(params=str(REPO_ROOT / "params.yaml"), configfile=[], settings_json=None, scenario="ss",
                         method=method, shot=1)
        settings = job_settings(args)
        assert make_learner(method_metatrain(settings["metatrain"], settings["method"], 1)).train_steps == steps


def test_a_baseline_can_be_scored_with_another_learner():
    from dfml.models.fusion import baseline_parts

    assert baseline_parts("average") == ("average", None)
    assert baseline_parts("average_protonet") == ("average", "protonet")
    assert baseline_parts("random_anil") == ("random", "anil")
    for bad in ("avg", "average_svm"):
        with pytest.raises(ValueError, match=f"unknown baseline '{bad}': expected one of random, average, ota, "
                                             "optionally followed by _<learner>"):
            baseline_parts(bad)
    base = params_for_own_methods()
    check_params({**base, "metatest": {**base["metatest"], "baselines": ["random", "average_protonet"]}})
    with pytest.raises(ParamsError, match="metatest.baselines"):
        check_params({**base, "metatest": {**base["metatest"], "baselines": ["average_svm"]}})


@pytest.mark.slow
def test_the_protonet_average_is_planned_and_tested_with_protonet(tmp_path):
    """TACO meta-tests with ProtoNet: average_protonet gives it a baseline scored the same way, next to the
    MAML-scored average, on SS only (a fusion)."""
    params = params_for_own_methods()
    params["metatest"]["baselines"] = ["random", "average", "average_protonet"]
    project = copy_project(tmp_path, params)
    proc = run_snakemake(project, "-n", "-p", "--cores", "1", timeout=600)
    tests = {(j["wildcards"]["scenario"], j["wildcards"]["method"]): j for j in dry_run_jobs(proc.stdout + proc.stderr)
             if j["rule"] in ("metatest", "metatest_plain") and j["wildcards"]["shot"] == "1"}
    assert {s for s, m in tests if m == "average_protonet"} == {"ss"}  # a fusion: homogeneous pools only
    assert tests[("ss", "average_protonet")]["settings"]["metatrain"]["learner"] == "protonet"
    assert tests[("ss", "average")]["settings"]["metatrain"]["learner"] == "maml"
    assert tests[("ss", "taco")]["settings"]["metatrain"]["learner"] == "protonet"


@pytest.mark.slow
def test_a_plain_only_protocol_scores_every_method_plain_and_retrains_nothing(tmp_path):
    """ICFIL at the 1-step protocol only (the benchmark's choice, for time): under a plain_only protocol every
    method takes metatest_plain, untouched by tuning, and meta-training reads the same settings as without."""
    params = params_for_own_methods()
    params.update(run_scenarios=["ss"], run_methods=["purer"])
    params["metatrain"]["shots"] = [1]
    params["metatest"].update(baselines=["random", "average"], calibrations=["plain", "icfil"])
    params["evaluation"]["protocols"] = {"test1": {"test_steps": 1}, "test10": {"test_steps": 10, "plain_only": True}}
    jobs = dry_run_jobs(run_snakemake(copy_project(tmp_path, params), "-n", "-p", timeout=600).stdout)
    tests = sorted((j["rule"], j["wildcards"]["method"], j["wildcards"]["protocol"]) for j in jobs
                   if j["rule"].startswith("metatest") and j["rule"] != "metatest_all")
    assert tests == [("metatest", "average", "test1"), ("metatest", "purer", "test1"),
                     ("metatest_plain", "average", "test10"), ("metatest_plain", "purer", "test10"),
                     ("metatest_plain", "random", "test1"), ("metatest_plain", "random", "test10")]
    training = next(j for j in jobs if j["rule"] == "metatrain")
    assert training["settings"]["evaluation"]["protocols"] == {"test1": {"test_steps": 1},
                                                                "test10": {"test_steps": 10}}


def test_a_protocols_plain_only_must_be_a_boolean():
    base = params_for_own_methods()
    with pytest.raises(ParamsError, match=r"evaluation.protocols.test10.plain_only"):
        check_params({**base, "evaluation": {**base["evaluation"],
                                             "protocols": {"test10": {"test_steps": 10, "plain_only": "yes"}}}})


def test_pin_iterations_writes_the_overlay_that_replays_a_budgeted_benchmark(tmp_path):
    """Each shot's reached iterations (from its curve), the budget lifted; layered over the benchmark it
    validates and gives each job its own count."""
    import sys

    from dfml.config import method_metatrain

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import pin_iterations

    for method, seed, shot, reached in (("purer", 0, 1, 3), ("purer", 0, 5, 2), ("bidfmkd", 0, 1, 4),
                                        ("purer", 1, 1, 7)):
        curve = tmp_path / "ss" / method / f"seed{seed}" / f"shot{shot}" / "curve.csv"
        curve.parent.mkdir(parents=True)
        rows = ["iteration,meta_loss,seconds,val_test1", "0,,,0.25"] + [f"{i},1.0,40.5," for i in range(1, reached + 1)]
        curve.write_text("\n".join(rows) + "\n")
    pins = tmp_path / "pins.yaml"
    pin_iterations.main(["--scenario", "ss", "--metatrain", str(tmp_path), "--out", str(pins)])
    assert yaml.safe_load(pins.read_text()) == {"training_seeds": [0], "methods": {
        "bidfmkd": {"iterations": {"shot1": 4}, "time_budget": None},
        "purer": {"iterations": {"shot1": 3, "shot5": 2}, "time_budget": None}}}
    pin_iterations.main(["--scenario", "ss", "--metatrain", str(tmp_path), "--seed", "1", "--out", str(pins)])
    assert yaml.safe_load(pins.read_text()) == {"training_seeds": [1],
                                                "methods": {"purer": {"iterations": {"shot1": 7}, "time_budget": None}}}
    pin_iterations.main(["--scenario", "ss", "--metatrain", str(tmp_path), "--out", str(pins)])
    params = load_params(REPO_ROOT / "params.yaml", [REPO_ROOT / "configs" / "benchmark.yaml", pins])
    replay = method_metatrain(params["metatrain"], params["methods"]["purer"], shot=5)
    assert replay["iterations"] == 2 and replay["time_budget"] is None and params["metatrain"]["time_budget"] == 120
    assert params["methods"]["bidfmkd"]["q"] == 20  # the benchmark's settings stay
    with pytest.raises(SystemExit, match="no meta-training curve under"):
        pin_iterations.main(["--scenario", "sh", "--metatrain", str(tmp_path)])


@pytest.mark.parametrize("pins", sorted((REPO_ROOT / "configs" / "benchmark_pins").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_each_benchmark_pin_file_replays_every_method_of_its_run(pins):
    """configs/benchmark_pins/<scenario>.yaml (a one-seed run) or <scenario>_seed<t>.yaml (training seed t of a
    seeded run, which it selects), layered over the benchmark, pins the iterations of every method its recorded
    run trained (docs/benchmark_results/<scenario>.json), for every shot, and lifts the budget: the replay of a
    published run (methods the benchmark gained since, purer_equal, are not in it)."""
    from dfml.config import method_metatrain

    params = load_params(REPO_ROOT / "params.yaml", [REPO_ROOT / "configs" / "benchmark.yaml", pins])
    scenario, _, seed = pins.stem.partition("_seed")
    recorded = json.loads((REPO_ROOT / "docs" / "benchmark_results" / f"{scenario}.json").read_text())
    if seed:
        assert params["training_seeds"] == [int(seed)], params["training_seeds"]
    trained = sorted({m for protocols in recorded.values() for m in protocols} & set(params["methods"]))
    assert trained and set(trained) <= set(yaml.safe_load(pins.read_text())["methods"]), trained
    for method in trained:
        for shot in params["metatrain"]["shots"]:
            replay = method_metatrain(params["metatrain"], params["methods"][method], shot)
            assert replay["time_budget"] is None and isinstance(replay["iterations"], int), (method, shot)


def test_training_seeds_default_to_one_and_bad_ones_are_refused_naming_the_key():
    from dfml.config import integer_seeds

    base = params_for_own_methods()
    assert check_params(base)["training_seeds"] == [0]
    assert check_params({**base, "training_seeds": [0, 1, 2]})["training_seeds"] == [0, 1, 2]
    for bad in ([], [0, 0], [-1], ["one"]):
        with pytest.raises(ParamsError, match=r"'training_seeds"):
            check_params({**base, "training_seeds": bad})
    cli = {"training_seeds": ["0", "1", "x"]}  # what --config training_seeds=[0,1,x] passes
    integer_seeds(cli)
    assert cli["training_seeds"] == [0, 1, "x"]  # digits become seeds, the rest is left for the schema to refuse


def test_a_comparison_may_name_the_methods_own_start_and_nothing_else_unknown():
    from dfml.config import check_comparisons

    base = params_for_own_methods()
    check_comparisons({**base, "report": {"comparisons": [["taco", "start"]]}})
    with pytest.raises(ParamsError, match=r"unknown: \['start'\]"):
        check_comparisons({**base, "report": {"comparisons": [["start", "taco"]]}})


def test_a_method_setting_given_per_shot_resolves_for_each_shots_jobs_and_a_missing_shot_is_named():
    from dfml.config import ParamsError, method_for_shot

    entry = {"algorithm": "purer", "warmup": {"shot1": 213, "shot5": 427}, "iterations": {"shot1": 3200}}
    assert method_for_shot(entry, 1) == {"algorithm": "purer", "warmup": 213, "iterations": {"shot1": 3200}}
    assert method_for_shot(entry, 5)["warmup"] == 427
    with pytest.raises(ParamsError, match=r"warmup is given for \['shot1', 'shot5'\], not for shot10"):
        method_for_shot(entry, 10)
    params = params_for_own_methods()
    params["methods"]["purer"]["warmup"] = {"shot1": 2, "shot5": -1}
    with pytest.raises(ParamsError, match="methods.purer.warmup"):
        check_params(params)


def test_purer_takes_a_member_weighting_of_its_own_and_refuses_an_unknown_one():
    params = params_for_own_methods()
    params["methods"]["purer_equal"] = {"algorithm": "purer", "member_weighting": "equal"}
    assert check_params(params)["methods"]["purer_equal"]["member_weighting"] == "equal"
    assert "member_weighting" not in check_params(params_for_own_methods())["methods"]["purer"]  # no default: inversion's
    params["methods"]["purer_equal"]["member_weighting"] = "uniform"
    with pytest.raises(ParamsError, match="methods.purer_equal.member_weighting"):
        check_params(params)


@pytest.mark.slow
def test_the_scaling_study_dry_runs_keeping_and_scoring_every_doubling(tmp_path):
    """`snakemake -n --configfile configs/scaling.yaml scaling` (docs/scaling.md) in a copy of the project: the
    paper's pretraining, four arms with their iterations and per-shot warm-ups, every kept model scored on both
    splits under both protocols (ICFIL follows the meta-val selection, a checkpoint: not in a dry run)."""
    project = copy_project(tmp_path)
    (project / "configs").mkdir()
    shutil.copy(REPO_ROOT / "configs" / "scaling.yaml", project / "configs" / "scaling.yaml")
    proc = run_snakemake(project, "-n", "-p", "scaling", "--configfile", "configs/scaling.yaml", timeout=600)
    jobs = dry_run_jobs(proc.stdout + proc.stderr)
    counts = Counter(job["rule"] for job in jobs)
    assert counts == {"prepare_dataset": 1, "pretrain_model": 13, "invert_pool": 1, "metatrain": 4,
                      "score_kept": 2 * (7 + 6) * 2 * 2, "scaling_selection": 4, "scaling_report": 1, "scaling": 1}
    assert all(j["settings"]["pretrain"]["epochs"] == 60 for j in jobs if j["rule"] == "pretrain_model")
    for job in (j for j in jobs if j["rule"] == "metatrain"):
        shot, settings = int(job["wildcards"]["shot"]), job["settings"]
        assert settings["metatrain"]["iterations"] == {1: 3200, 5: 6400}[shot]
        assert settings["metatrain"]["keep_checkpoints"] == [100, 200, 400, 800, 1600, 3200, 6400]
        assert settings["inversion"]["warm_start_steps"] == 0 and settings["metatrain"]["val_episodes"] == 300
        if job["wildcards"]["method"] == "purer":
            assert settings["method"]["warmup"] == {1: 213, 5: 427}[shot]  # 4 000 / 60 000 of the run
    scored = Counter((j["wildcards"]["method"], j["wildcards"]["shot"], int(j["wildcards"]["iteration"]))
                     for j in jobs if j["rule"] == "score_kept")
    assert {k for (_, shot, k) in scored if shot == "1"} == {100, 200, 400, 800, 1600, 3200}
    assert {k for (_, shot, k) in scored if shot == "5"} == {100, 200, 400, 800, 1600, 3200, 6400}
    assert set(scored.values()) == {4}  # meta-val and meta-test under test1 and test10
