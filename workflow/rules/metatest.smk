# Phase 5: meta-testing on the fixed meta-test episodes, every method with and without ICFIL.
# ICFIL's settings are chosen on meta-val first (tune_icfil), never on meta-test.


rule tune_icfil:
    input:
        model=lambda wc: trained_model(wc.scenario, config["metatest"]["icfil_tuning"]["method"], wc.shot),
        stores=scenario_stores,
        script="scripts/tune_icfil.py",
        code=script_code("scripts/tune_icfil.py"),
    output:
        "results/icfil/{scenario}/shot{shot}.json",
    params:
        settings=lambda wc: json_arg(metatest_settings(wc)),
    log:
        "logs/icfil/{scenario}/shot{shot}.log",
    benchmark:
        "benchmarks/icfil/{scenario}/shot{shot}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
        gpu=1,
    shell:
        "python scripts/tune_icfil.py --scenario {wildcards.scenario} --shot {wildcards.shot} "
        "--meta-model {input.model} --out {output} --threads {threads} --settings-json {params.settings} > {log} 2>&1"


rule metatest:
    input:
        unpack(metatest_inputs),
        stores=scenario_stores,
        script="scripts/metatest.py",
        code=script_code("scripts/metatest.py"),
    output:
        expand(
            "results/metatest/{{scenario}}/{{method}}/shot{{shot}}_{calibration}.json",
            calibration=config["metatest"]["calibrations"],
        ),
    params:
        settings=lambda wc: json_arg(metatest_settings(wc)),
        model_arg=lambda wc, input: f"--meta-model {input.model}" if "model" in input.keys() else "",
        icfil_arg=lambda wc, input: f"--icfil {input.icfil}" if "icfil" in input.keys() else "",
        calibrations=" ".join(config["metatest"]["calibrations"]),
    log:
        "logs/metatest/{scenario}/{method}/shot{shot}.log",
    benchmark:
        "benchmarks/metatest/{scenario}/{method}/shot{shot}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
        gpu=1 if "icfil" in config["metatest"]["calibrations"] else 0,
    shell:
        "python scripts/metatest.py --scenario {wildcards.scenario} --method {wildcards.method} "
        "--shot {wildcards.shot} --calibrations {params.calibrations} --pool results/pool/{wildcards.scenario} "
        "{params.model_arg} {params.icfil_arg} --out results/metatest/{wildcards.scenario}/{wildcards.method}/"
        "shot{wildcards.shot}_{{calibration}}.json --threads {threads} "
        "--settings-json {params.settings} > {log} 2>&1"


rule metatest_all:
    input:
        metatest_results(),
