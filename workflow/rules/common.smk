# Shared helpers: wildcard constraints from the configured names, input functions, the code digests of jobs.
# No rules here.
import json
import os
import re
import shlex
from pathlib import Path

from dfml.studies.attack import attack_families
from dfml.codedeps import code_digest, dataset_choices, metatest_choices, metatrain_choices, refresh_digests
from dfml.config import check_references, flow_yaml, method_entry, method_for_shot, method_metatrain
from dfml.layout import run_dir, run_seed
from dfml.methods.base import method_class
from dfml.models.fusion import FUSIONS, baseline_parts, can_fuse
from dfml.pool import member_settings, pool_size

check_references(config)

# Jobs inherit this: spinning OpenMP threads slow torch down many times over on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SCENARIOS = sorted(config["scenarios"])
DATASETS = sorted(config["datasets"])
RUN_SCENARIOS = config["run_scenarios"]
TRAINING_SEEDS = config["training_seeds"]  # replicates of everything after the pool (dfml/layout.py)


def one_of(names):
    """A wildcard constraint matching exactly ``names`` (none: nothing, where an empty pattern would match all)."""
    return "|".join(re.escape(name) for name in names) if names else "(?!)"


wildcard_constraints:
    scenario=one_of(SCENARIOS),
    dataset=one_of(DATASETS),
    member=r"\d+",
    method=one_of(sorted(config["methods"]) + sorted({"random", *FUSIONS, *config["metatest"]["baselines"]})),
    protocol=one_of(sorted(config["evaluation"]["protocols"])),
    shot=r"\d+",
    seed=r"\d+",
    run=r"seed\d+|pool",


def job_code(script, choices=None):
    """A rule's ``params: code``: ``code:<digest>`` of what its jobs run (dfml/codedeps.py), ``script`` and the dfml
    modules it imports, of each registry only the entries ``choices(wildcards)`` names (a job's algorithm,
    fusion, data source). Snakemake does not track imported code; with this param (rerun trigger ``params``,
    on by default) a job reruns when its own code changes, and not on a comment, a docstring or a reformatting,
    nor on another method's code (docs/reruns.md)."""
    root = Path(workflow.basedir)
    if choices is None:
        return f"code:{code_digest(root / script, root)}"
    return lambda wildcards: f"code:{code_digest(root / script, root, choices(wildcards))}"


# DVC's copy of the digests (workflow/code_digests.yaml, params of dvc.yaml's stages) follows the code too.
refresh_digests(Path(workflow.basedir))


def json_arg(obj):
    """A settings dict as one shell-quoted JSON argument (also what Snakemake compares for reruns)."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def scenario_members(scenario):
    """Honest and untrusted members (dfml/untrusted.py)."""
    return list(range(pool_size(config["scenarios"][scenario])))


def scenario_stores(wildcards):
    return [f"data/{name}/splits.json" for name in config["scenarios"][wildcards.scenario]["datasets"]]


def member_stores(wildcards):
    """The scenario's stores, and the source a deceptive_label member is really trained on."""
    settings = member_settings(config, wildcards.scenario, int(wildcards.member))
    source = settings.get("untrusted", {}).get("source")
    return scenario_stores(wildcards) + ([f"data/{source}/splits.json"] if source else [])


def untrusted_sources(scenario):
    entry = config["scenarios"][scenario].get("untrusted")
    return [entry["source"]] if entry and "deceptive_label" in entry["kinds"] else []


def pool_files(scenario):
    return [f"results/pool/{scenario}/member_{i}.{ext}" for i in scenario_members(scenario)
            for ext in ("safetensors", "json")]


def run_datasets():
    """The datasets of the run's scenarios, and those their deceptive_label members are trained on."""
    return sorted({d for s in RUN_SCENARIOS for d in config["scenarios"][s]["datasets"] + untrusted_sources(s)})


METHODS = sorted(config.get("run_methods") or config["methods"])  # the methods this run trains and tests
PROTOCOLS = sorted(config["evaluation"]["protocols"])


def method_algorithm(method):
    """The class of a configured method's algorithm (dfml/methods/base.py): what it declares it needs."""
    return method_class(config["methods"][method]["algorithm"])


PSEUDO_METHODS = [m for m in METHODS if method_algorithm(m).needs_pseudo_data]


def pseudo_data(scenario, seed):
    return f"results/synthetic/{scenario}/seed{seed}/pseudo.safetensors"


def warm_start_record(scenario, seed):
    """invert_pool's inversion.json next to the pseudo data: the warm start's seconds, charged to every method
    that starts from the pseudo data (its time budget and cost)."""
    return str(Path(pseudo_data(scenario, seed)).with_name("inversion.json"))


def metatrain_inputs(wildcards):
    """The pool, and the warm-start pseudo data with the record of its inversion only for a method that declares
    it needs them."""
    inputs = {"pool": pool_files(wildcards.scenario)}
    if method_algorithm(wildcards.method).needs_pseudo_data:
        inputs["pseudo"] = pseudo_data(wildcards.scenario, wildcards.seed)
        inputs["warm_start"] = warm_start_record(wildcards.scenario, wildcards.seed)
    return inputs


def metatrain_pseudo_arg(wildcards):
    if not method_algorithm(wildcards.method).needs_pseudo_data:
        return ""
    scenario, seed = wildcards.scenario, wildcards.seed
    return f"--pseudo {pseudo_data(scenario, seed)} --warm-start {warm_start_record(scenario, seed)}"


def metatrain_settings(wildcards):
    return {
        "seed": config["seed"],
        "training_seed": int(wildcards.seed),
        "scenario": config["scenarios"][wildcards.scenario],
        "inversion": config["inversion"],
        "metatrain": method_metatrain(config["metatrain"], config["methods"][wildcards.method], int(wildcards.shot)),
        "evaluation": evaluation_settings(),
        "method": method_for_shot(config["methods"][wildcards.method], int(wildcards.shot)),
    }


BASELINES = config["metatest"]["baselines"]


def trained_model(scenario, method, seed, shot, protocol):
    """The model meta-val selected under ``protocol`` (one training run, one selection per protocol)."""
    return f"results/metatrain/{scenario}/{method}/seed{seed}/shot{shot}/{protocol}/meta_model.safetensors"


def white_box(scenario):
    return config["scenarios"][scenario].get("access", "white_box") == "white_box"


def trained_methods(scenario):
    """The configured methods a scenario's pool allows: on a black-box pool, only black-box methods."""
    return [m for m in METHODS if white_box(scenario) or method_algorithm(m).access == "black_box"]


def fusion_possible(scenario):
    """The parameter-fusion baselines (average, ota) need the weights of a pool of conv4 members shaped like
    the meta-model."""
    if not white_box(scenario):
        return False
    meta = config["metatrain"]["meta_model"]
    models = [config["models"][name] for name in config["scenarios"][scenario]["architectures"]]
    return can_fuse([(m["arch"], m.get("width")) for m in models], meta["width"], meta["pooling"])


def scenario_methods(scenario):
    baselines = [b for b in BASELINES if baseline_parts(b)[0] not in FUSIONS or fusion_possible(scenario)]
    return trained_methods(scenario) + baselines


def evaluation_settings():
    """The evaluation section as jobs read it: which calibrations a protocol is scored with is not a setting
    of its test-time adaptation, so marking a protocol plain-only reruns no meta-training."""
    evaluation = config["evaluation"]
    protocols = {name: {"test_steps": spec["test_steps"]} for name, spec in evaluation["protocols"].items()}
    return {**evaluation, "protocols": protocols}


def calibrated_protocol(protocol):
    """evaluation.protocols.<name>.plain_only: every method is scored there with plain adaptation only."""
    return not config["evaluation"]["protocols"][protocol].get("plain_only", False)


def method_calibrations(method, protocol=None):
    """Calibrations a method is scored with under ``protocol`` (metatest.plain_only methods and plain-only
    protocols: plain adaptation only; ``protocol`` None: under the calibrated protocols)."""
    if method in config["metatest"]["plain_only"] or (protocol is not None and not calibrated_protocol(protocol)):
        return ["plain"]
    return config["metatest"]["calibrations"]


def is_tuned(method):
    """ICFIL and the steps control are tuned on meta-val for the method itself, in its meta-test job."""
    return bool({"icfil", "steps"} & set(method_calibrations(method)))


def seeded(method):
    """Whether a method's model depends on the training seed: every trained method and a baseline drawn at
    random; a fusion of the pool (average, ota) is one model for every seed (its folder: pool)."""
    return method not in BASELINES or baseline_parts(method)[0] not in FUSIONS


def method_runs(method):
    """The training-seed folders of a method's meta-test results (dfml/layout.py)."""
    return [run_dir(t) for t in TRAINING_SEEDS] if seeded(method) else [run_dir(None)]


def metatest_settings(wildcards):
    seed = run_seed(wildcards.run)
    return {
        "seed": config["seed"],
        **({} if seed is None else {"training_seed": seed}),
        "scenario": config["scenarios"][wildcards.scenario],
        "metatrain": method_metatrain(config["metatrain"], method_entry(config, wildcards.method), int(wildcards.shot)),
        "evaluation": evaluation_settings(),
        # which methods are run is not a job's setting: adding a baseline reruns no other method's test
        "metatest": {k: v for k, v in config["metatest"].items() if k not in ("baselines", "plain_only")},
    }


def metatest_inputs(wildcards):
    inputs = {"pool": pool_files(wildcards.scenario)}
    if wildcards.method not in BASELINES:
        inputs["model"] = trained_model(wildcards.scenario, wildcards.method, run_seed(wildcards.run), wildcards.shot,
                                        wildcards.protocol)
    return inputs


def metatest_results():
    return [
        f"results/metatest/{s}/{m}/{r}/{p}/shot{k}_{c}.json"
        for s in RUN_SCENARIOS
        for m in scenario_methods(s)
        for r in method_runs(m)
        for p in PROTOCOLS
        for k in config["metatrain"]["shots"]
        for c in method_calibrations(m, p)
    ]


def metatrain_curves():
    return [
        f"results/metatrain/{s}/{m}/seed{t}/shot{k}/curve.csv"
        for s in RUN_SCENARIOS
        for m in trained_methods(s)
        for t in TRAINING_SEEDS
        for k in config["metatrain"]["shots"]
    ]


def members_files():
    """members.json of every run of a method without the warm-start pseudo data: the pool members it drew and
    their final sampling probabilities (the attack section of the report reads them)."""
    return [
        f"results/metatrain/{s}/{m}/seed{t}/shot{k}/members.json"
        for s in RUN_SCENARIOS
        for m in trained_methods(s)
        for t in TRAINING_SEEDS
        if not method_algorithm(m).needs_pseudo_data
        for k in config["metatrain"]["shots"]
    ]


def run_scenario_settings():
    """The run scenarios' entries of params `scenarios` (what the report groups into attack families)."""
    return {s: config["scenarios"][s] for s in RUN_SCENARIOS}


def attack_family_names():
    """Attack families among the run scenarios (dfml/studies/attack.py), named by their clean scenario; none by default."""
    return list(attack_families(run_scenario_settings()))


def attack_pool_cards():
    """The pool cards of every scenario of an attack family: their `truth` says which members were untrusted."""
    families = attack_families(run_scenario_settings())
    return [f for members in families.values() for s, _ in members for f in pool_files(s) if f.endswith(".json")]


def purer_picture_scenarios():
    """Where the report pictures PURER's final pseudo data next to real images."""
    return [s for s in RUN_SCENARIOS if "purer" in trained_methods(s)]


def reproduce_command():
    """The command summary.md prints: `make run`, or the snakemake line with this run's --configfile(s) and
    --config values (a benchmark's `--config run_scenarios=[sh]`)."""
    base = "snakemake --cores all --workflow-profile workflow/profiles/local"
    extra = [os.path.relpath(path) for path in workflow.overwrite_configfiles]
    values = [f"{key}={flow_yaml(value)}" for key, value in workflow.config_settings.config.items()]
    if not extra and not values:
        return f"make run   (or: {base})"
    return " ".join([base] + (["--configfile", *extra] if extra else []) + (["--config", *values] if values else []))


# The scaling study (workflow/rules/scaling.smk): the kept models each arm reaches, and ICFIL's targets.
KEEP = config["metatrain"].get("keep_checkpoints", [])


def kept_iterations(method, shot):
    """The kept iterations a (method, shot) run reaches."""
    iterations = method_metatrain(config["metatrain"], config["methods"][method], int(shot))["iterations"]
    return sorted(i for i in KEEP if i <= iterations)


def scaling_arms():
    return [(s, m, f"seed{t}", k) for s in RUN_SCENARIOS for m in trained_methods(s) for t in TRAINING_SEEDS
            for k in config["metatrain"]["shots"]]


def kept_dir(wildcards):
    return f"results/metatrain/{wildcards.scenario}/{wildcards.method}/{wildcards.run}/shot{wildcards.shot}/kept"


def scaling_plain_results(scenario, method, run, shot):
    return [f"results/scaling/{scenario}/{method}/{run}/shot{shot}/iter{i}/{p}/{split}_plain.json"
            for i in kept_iterations(method, shot) for p in PROTOCOLS for split in ("meta_val", "meta_test")]


def icfil_results(wildcards=None):
    """ICFIL at the last kept model and at each calibrated protocol's meta-val-selected one, every arm."""
    from dfml.studies.scaling import selected_iterations

    results = []
    for scenario, method, run, shot in scaling_arms():
        kept = kept_iterations(method, shot)
        if not kept:
            continue
        selection = checkpoints.scaling_selection.get(scenario=scenario, method=method, run=run, shot=shot).output[0]
        selected = selected_iterations(Path(selection).read_text())
        for protocol in PROTOCOLS:
            if calibrated_protocol(protocol):
                for iteration in sorted({kept[-1], selected[protocol]}):
                    results.append(f"results/scaling/{scenario}/{method}/{run}/shot{shot}/iter{iteration}/"
                                   f"{protocol}/meta_test_icfil.json")
    return results
