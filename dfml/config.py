"""params.yaml: loading, schema validation, cross-references, and the values derived from it.

Snakemake validates the same schema at parse time; scripts call :func:`load_params` so that a
direct call (`dfml ...`, DVC, tests) gets the same checks and defaults.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "params.schema.yaml"


class ParamsError(ValueError):
    """An invalid params.yaml value; the message names the key."""


def _key_path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<root>"


MOVED_KEYS = {
    ("metatrain", "test_steps"): "evaluation.protocols.<name>.test_steps",
    ("metatest", "test_steps"): "evaluation.protocols.<name>.test_steps",
    ("metatest", "query"): "evaluation.query",
    ("metatest", "icfil_tuning", "method"): "nothing: ICFIL is now tuned for every method",
}


def integer_seeds(params: dict) -> None:
    """``--config training_seeds=[0,1,2]`` reaches the workflow as strings: digits become the integers meant."""
    seeds = params.get("training_seeds")
    if isinstance(seeds, list):
        params["training_seeds"] = [int(s) if isinstance(s, str) and s.strip().isdigit() else s for s in seeds]


def check_moved_keys(params: dict) -> None:
    """Keys of older params files: say where they went (before the schema's generic message)."""
    for path, where in MOVED_KEYS.items():
        node = params
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            raise ParamsError(f"params.yaml: {'.'.join(path)} is no longer read: one evaluation protocol drives "
                              f"meta-val selection and meta-test; use {where}")


def load_schema(schema_path: Path = SCHEMA_PATH) -> dict:
    with open(schema_path) as handle:
        return yaml.safe_load(handle)


def check_method_algorithms(params: dict, schema_path: Path = SCHEMA_PATH) -> None:
    """Each methods entry names a known algorithm and only that algorithm's settings, valid against that
    algorithm's block of the schema (definitions.algorithms.<algorithm>), whose defaults it fills into the entry
    in place (``methods`` itself gets its schema default first when absent). The blocks are the one place an
    algorithm's settings are written: the schema's ``definitions.method`` only requires an ``algorithm``, so
    Snakemake, which calls this before its own validation, and :func:`validate_schema` apply the block here.
    Errors are said in words, naming the key."""
    import jsonschema

    if not isinstance(params, dict):
        return
    schema = load_schema(schema_path)
    algorithms = schema["definitions"]["algorithms"]
    if "methods" not in params:
        params["methods"] = copy.deepcopy(schema["properties"]["methods"]["default"])
    methods = params["methods"]
    if not isinstance(methods, dict):
        return
    known = ", ".join(sorted(algorithms))
    for name, entry in methods.items():
        key = f"params.yaml: methods.{name}"
        if not isinstance(entry, dict):
            continue
        if "algorithm" not in entry:
            raise ParamsError(f"{key}: no algorithm: name one of {known} (algorithm: <name>)")
        algorithm = entry["algorithm"]
        if algorithm not in algorithms:
            raise ParamsError(f"{key}.algorithm: unknown algorithm {algorithm!r}; known: {known}")
        settings = algorithms[algorithm]["properties"]
        for option in entry:
            if option not in settings:
                raise ParamsError(f"{key}.{option} is not a setting of algorithm {algorithm!r} "
                                  f"(its settings: {', '.join(settings)})")
        block = {"$schema": schema["$schema"], "definitions": schema["definitions"],
                 "$ref": f"#/definitions/algorithms/{algorithm}"}
        errors = sorted(jsonschema.validators.validator_for(block)(block).iter_errors(entry),
                        key=lambda e: list(e.absolute_path))
        if errors:
            path = _key_path(["methods", name, *errors[0].absolute_path])
            raise ParamsError(f"params.yaml: invalid value at '{path}': {errors[0].message}")
        _fill_defaults(entry, algorithms[algorithm], schema)


def untrusted_kinds(schema_path: Path = SCHEMA_PATH) -> list[str]:
    """The kinds of untrusted pool member the schema allows (dfml/untrusted.py builds them)."""
    with open(schema_path) as handle:
        scenario = yaml.safe_load(handle)["properties"]["scenarios"]["additionalProperties"]
    return scenario["properties"]["untrusted"]["properties"]["kinds"]["items"]["enum"]


def check_untrusted_values(params: dict, schema_path: Path = SCHEMA_PATH) -> None:
    """scenarios.<name>.untrusted: the fraction and the kinds, said in words before the schema's generic message."""
    scenarios = params.get("scenarios")
    for name, scenario in (scenarios.items() if isinstance(scenarios, dict) else ()):
        untrusted = scenario.get("untrusted") if isinstance(scenario, dict) else None
        if not isinstance(untrusted, dict):
            continue
        key = f"params.yaml: scenarios.{name}.untrusted"
        fraction = untrusted.get("fraction")
        if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and not 0 <= fraction < 1:
            raise ParamsError(f"{key}.fraction: {fraction} is outside [0, 1): it is the share of the final pool that "
                              f"is untrusted (0 adds none; 1 would leave no room for the honest members)")
        kinds, known = untrusted.get("kinds"), untrusted_kinds(schema_path)
        if kinds == []:
            raise ParamsError(f"{key}.kinds is empty: name one or more of {known}, or leave the key out for all of them")
        for kind in kinds if isinstance(kinds, list) else ():
            if kind not in known:
                raise ParamsError(f"{key}.kinds: unknown kind {kind!r}; known kinds: {known}")


def check_untrusted_source(params: dict) -> None:
    """deceptive_label members are trained on ``source``: a configured dataset none of the scenario's."""
    for name, scenario in params["scenarios"].items():
        untrusted = scenario.get("untrusted")
        if not untrusted:
            continue
        key = f"params.yaml: scenarios.{name}.untrusted.source"
        source = untrusted.get("source")
        others = sorted(set(params["datasets"]) - set(scenario["datasets"]))
        if source is None and "deceptive_label" in untrusted["kinds"]:
            raise ParamsError(f"{key} is missing: deceptive_label members are trained on another dataset's classes; "
                              f"name a configured dataset that is not one of the scenario's ({others})")
        if source is not None and source not in params["datasets"]:
            raise ParamsError(f"{key}: unknown dataset {source!r}; defined datasets: {sorted(params['datasets'])}")
        if source in scenario["datasets"]:
            raise ParamsError(f"{key}: {source!r} is one of the scenario's datasets, so its members would not lie "
                              f"about their classes; name another configured dataset ({others})")


def validate_schema(params: dict, schema_path: Path = SCHEMA_PATH) -> dict:
    """Schema-check ``params`` and return a copy with defaults filled in."""
    import jsonschema

    params = copy.deepcopy(params)
    check_moved_keys(params)
    check_method_algorithms(params, schema_path)
    check_untrusted_values(params, schema_path)
    schema = load_schema(schema_path)
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(params), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        raise ParamsError(f"params.yaml: invalid value at '{_key_path(err.absolute_path)}': {err.message}")
    _fill_defaults(params, schema, schema)
    return params


def _resolve(node: dict, root: dict) -> dict:
    ref = node.get("$ref")
    if not ref:
        return node
    target = root
    for part in ref.lstrip("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _fill_defaults(instance, node: dict, root: dict) -> None:
    node = _resolve(node, root)
    if not isinstance(instance, dict):
        return
    for key, sub in node.get("properties", {}).items():
        sub = _resolve(sub, root)
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub, root)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        for key in instance:
            if key not in node.get("properties", {}):
                _fill_defaults(instance[key], extra, root)
    for branch in node.get("allOf", []):  # if/then: a settings block chosen by the entry's kind
        if "if" in branch and "then" in branch and _matches(instance, branch["if"]):
            _fill_defaults(instance, branch["then"], root)


def _matches(instance: dict, condition: dict) -> bool:
    import jsonschema

    return jsonschema.validators.validator_for(condition)(condition).is_valid(instance)


def check_references(params: dict) -> None:
    """Names used by scenarios must be defined; explain what is allowed otherwise."""
    for name, scenario in params["scenarios"].items():
        for dataset in scenario["datasets"]:
            if dataset not in params["datasets"]:
                raise ParamsError(f"params.yaml: scenarios.{name}.datasets: unknown dataset {dataset!r}; "
                                  f"defined datasets: {sorted(params['datasets'])}")
        for model in scenario["architectures"]:
            if model not in params["models"]:
                raise ParamsError(f"params.yaml: scenarios.{name}.architectures: unknown model {model!r}; "
                                  f"defined models: {sorted(params['models'])}")
    check_untrusted_source(params)
    check_methods(params)
    check_comparisons(params)
    for name in params.get("run_methods", []):
        if name not in params.get("methods", {}):
            raise ParamsError(f"params.yaml: run_methods: unknown method {name!r}; "
                              f"defined methods: {sorted(params.get('methods', {}))}")
    for name in params.get("run_scenarios", []):
        if name not in params["scenarios"]:
            raise ParamsError(f"params.yaml: run_scenarios: unknown scenario {name!r}; "
                              f"defined scenarios: {sorted(params['scenarios'])}")


def check_comparisons(params: dict) -> None:
    """Pre-registered comparisons must name methods the run scores, else they would silently vanish; ``b`` may be
    ``start``: ``a``'s own untrained start, resolved by the report from its cards (dfml.report.start_of)."""
    run = params.get("run_methods") or params.get("methods", {})
    known = set(run) | set(params.get("metatest", {}).get("baselines", []))
    for index, pair in enumerate(params.get("report", {}).get("comparisons", [])):
        unknown = [name for i, name in enumerate(pair) if name not in known and not (i == 1 and name == "start")]
        if unknown or len(pair) != 2 or pair[0] == pair[1]:
            raise ParamsError(f"params.yaml: report.comparisons[{index}] = {pair}: a pair [a, b] of two different "
                              f"methods or baselines of the run is expected ({sorted(known)}; b may be `start`, "
                              "a's own start)" + (f"; unknown: {unknown}" if unknown else ""))


def check_methods(params: dict) -> None:
    """Method options that would silently do nothing are refused, with what to set instead."""
    learner = params.get("metatrain", {}).get("learner")
    for name, method in params.get("methods", {}).items():
        key = f"params.yaml: methods.{name}"
        separate = method.get("adversarial_step") == "separate"
        if separate and "lambda_adv" in method:
            raise ParamsError(f"{key}.lambda_adv has no effect with adversarial_step: separate (the push's own Adam "
                              f"takes a step of the same size whatever the gradient's scale): remove it and set "
                              f"{key}.adversarial_lr, the push's step size, instead")
        if not separate and "adversarial_lr" in method:
            raise ParamsError(f"{key}.adversarial_lr only applies to adversarial_step: separate; the shared step "
                              f"(PURER) is weighted by lambda_adv")
        if method.get("eci", True) and learner == "fomaml":
            raise ParamsError(f"{key}: ECI cannot run with metatrain.learner fomaml: first-order MAML detaches the "
                              f"inner gradients, so the adversarial push cannot reach the support images; use "
                              f"learner maml, or set {key}.eci: false")


def check_params(params: dict) -> dict:
    params = validate_schema(params)
    check_references(params)
    return params


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def flow_yaml(value) -> str:
    """``value`` on one line of YAML flow style ([a, b], {k: 1}), as a command-line value."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=float("inf")).strip()
    return text.removesuffix("...").strip()  # a scalar's document end marker


def hydra_overrides(base: dict, overlay: dict, prefix: tuple[str, ...] = ()) -> list[str]:
    """`dvc exp run -S` arguments that turn params ``base`` into ``deep_merge(base, overlay)``: one per leaf (a
    list is a leaf, replaced whole as Snakemake's --configfile does), Hydra's ``+`` where ``base`` lacks the key.
    Leaves ``base`` already holds are left out: DVC rewrites every value it sets, and writes a small float such
    as 1.0e-05 as ``1e-05``, which YAML 1.1 readers (PyYAML, Snakemake) take for a string."""
    overrides = []
    for key, value in overlay.items():
        path = ".".join((*prefix, str(key)))
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            overrides += hydra_overrides(base[key], value, (*prefix, str(key)))
        elif key not in base or base[key] != value or type(base[key]) is not type(value):
            overrides.append(f"{'' if key in base else '+'}{path}={flow_yaml(value)}")
    return overrides


def load_params(path: str | Path = "params.yaml", overrides: list[str | Path] = ()) -> dict:
    """Load params.yaml, deep-merge override files over it (like snakemake --configfile), validate."""
    with open(path) as handle:
        params = yaml.safe_load(handle) or {}
    for extra in overrides:
        with open(extra) as handle:
            params = deep_merge(params, yaml.safe_load(handle) or {})
    return check_params(params)


def method_for_shot(method: dict, shot: int) -> dict:
    """A method's params entry as its ``shot``-shot jobs read it: a setting given per shot ({shot1: a, shot5: b},
    where the schema allows it: a study whose warm-up scales with each shot's iterations) resolves to that shot's
    value; every other setting is left as it is."""
    def resolve(key, value):
        if key == "iterations" or not _per_shot(value):  # iterations: method_metatrain resolves and says it
            return value
        if f"shot{shot}" not in value:
            raise ParamsError(f"{key} is given for {sorted(value)}, not for shot{shot}")
        return value[f"shot{shot}"]

    return {key: resolve(key, value) for key, value in method.items()}


def _per_shot(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(re.fullmatch(r"shot\d+", str(k)) for k in value)


def method_metatrain(metatrain: dict, method: dict | None, shot: int | None = None) -> dict:
    """``metatrain`` as one method's jobs read it: the method's own ``learner`` when its params entry names one
    (TACO: ProtoNet), else ``metatrain.learner``, and likewise its own ``train_steps`` (the inner steps of its
    meta-training; each algorithm's schema block fills its paper's), ``iterations`` and ``time_budget`` (a
    study's equal budgets; a method's ``time_budget: null`` lifts the budget, to replay pinned iterations);
    without ``shots`` (a job trains and tests one shot). Iterations pinned per shot ({shot1: N, shot5: M})
    resolve for ``shot``. Both its meta-training and its meta-testing adapt with that learner."""
    merged = {k: v for k, v in metatrain.items() if k != "shots"}
    if method is not None:
        merged.update({key: method[key] for key in ("learner", "train_steps", "iterations") if method.get(key)})
        if "time_budget" in method:
            merged["time_budget"] = method["time_budget"]
    if isinstance(merged["iterations"], dict) and shot is not None:
        if f"shot{shot}" not in merged["iterations"]:
            raise ParamsError(f"iterations are pinned for {sorted(merged['iterations'])}, not for shot{shot}")
        merged["iterations"] = merged["iterations"][f"shot{shot}"]
    return merged


def method_entry(params: dict, name: str | None) -> dict | None:
    """The params entry of a configured method, a baseline's (its learner, when its name carries one), or None."""
    if name in params.get("methods", {}):
        return params["methods"][name]
    if name in params.get("metatest", {}).get("baselines", []):
        from dfml.baselines import baseline_method

        return baseline_method(name)
    return None


def add_phase_arguments(parser, settings_help: str) -> None:
    """Arguments every phase script shares: where params come from, the data root, threads."""
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--configfile", action="append", default=[], help="override files merged over --params")
    parser.add_argument("--settings-json", default=None,
                        help=f"{settings_help} as JSON: what Snakemake passes (replaces --params)")
    parser.add_argument("--data-root", default="data", help="folder holding the canonical dataset stores")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def phase_settings(args, sections: tuple[str, ...]) -> dict:
    """The settings a phase job needs: from --settings-json, or {seed, scenario, *sections} of the params, with
    ``metatrain`` as the job's method reads it (:func:`method_metatrain`) when ``args.method`` is configured."""
    import json

    if args.settings_json:
        return json.loads(args.settings_json)
    params = load_params(args.params, args.configfile)
    if args.scenario not in params["scenarios"]:
        raise ParamsError(f"unknown scenario {args.scenario!r}; defined: {sorted(params['scenarios'])}")
    settings = {"seed": params["seed"], "scenario": params["scenarios"][args.scenario],
                **{section: params[section] for section in sections}}
    if "metatrain" in settings:
        settings["metatrain"] = method_metatrain(settings["metatrain"], method_entry(params, getattr(args, "method", None)),
                                                 getattr(args, "shot", None))
    return settings
