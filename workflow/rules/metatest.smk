# Phase 5: meta-testing on the fixed meta-test episodes, every method with and without ICFIL, under every
# evaluation protocol. In the same job, before the meta-test episodes are touched, ICFIL's settings (and the
# steps control's step count) are tuned on meta-val for this method, protocol and shot: never on meta-test.
# Plain-only methods and plain-only protocols take metatest_plain; where both rules could make a plain result
# (a calibrated method under a calibrated protocol), the ruleorder gives it to metatest with the others.

CALIBRATED = [m for m in sorted(config["methods"]) + BASELINES if is_tuned(m)]
CALIBRATED_PROTOCOLS = [p for p in PROTOCOLS if calibrated_protocol(p)]
CALIBRATIONS = config["metatest"]["calibrations"]


ruleorder: metatest > metatest_plain


rule metatest:
    input:
        unpack(metatest_inputs),
        stores=scenario_stores,
    output:
        expand(
            "results/metatest/{{scenario}}/{{method}}/{{run}}/{{protocol}}/shot{{shot}}_{calibration}.json",
            calibration=CALIBRATIONS,
        ),
        tuning="results/icfil/{scenario}/{method}/{run}/{protocol}/shot{shot}.json",
    wildcard_constraints:
        method=one_of(CALIBRATED),
        protocol=one_of(CALIBRATED_PROTOCOLS),
    params:
        code=job_code("scripts/metatest.py", lambda wc: metatest_choices(config, wc.method)),
        settings=lambda wc: json_arg(metatest_settings(wc)),
        model_arg=lambda wc, input: f"--meta-model {input.model}" if "model" in input.keys() else "",
        calibrations=" ".join(CALIBRATIONS),
    log:
        "logs/metatest/{scenario}/{method}/{run}/{protocol}/shot{shot}.log",
    benchmark:
        "benchmarks/metatest/{scenario}/{method}/{run}/{protocol}/shot{shot}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
        gpu=1 if "icfil" in CALIBRATIONS else 0,
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/metatest.py --scenario {wildcards.scenario} --method {wildcards.method} "
        "--protocol {wildcards.protocol} --shot {wildcards.shot} --calibrations {params.calibrations} "
        "--pool results/pool/{wildcards.scenario} {params.model_arg} --tuning-out {output.tuning} "
        "--out results/metatest/{wildcards.scenario}/{wildcards.method}/{wildcards.run}/{wildcards.protocol}/"
        "shot{wildcards.shot}_{{calibration}}.json --threads {threads} "
        "--settings-json {params.settings} > {log} 2>&1"


rule metatest_plain:
    input:
        unpack(metatest_inputs),
        stores=scenario_stores,
    output:
        "results/metatest/{scenario}/{method}/{run}/{protocol}/shot{shot}_plain.json",
    params:
        code=job_code("scripts/metatest.py", lambda wc: metatest_choices(config, wc.method)),
        settings=lambda wc: json_arg(metatest_settings(wc)),
        model_arg=lambda wc, input: f"--meta-model {input.model}" if "model" in input.keys() else "",
    log:
        "logs/metatest/{scenario}/{method}/{run}/{protocol}/shot{shot}.log",
    benchmark:
        "benchmarks/metatest/{scenario}/{method}/{run}/{protocol}/shot{shot}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
        gpu=0,
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/metatest.py --scenario {wildcards.scenario} --method {wildcards.method} "
        "--protocol {wildcards.protocol} --shot {wildcards.shot} --calibrations plain "
        "--pool results/pool/{wildcards.scenario} {params.model_arg} "
        "--out results/metatest/{wildcards.scenario}/{wildcards.method}/{wildcards.run}/{wildcards.protocol}/"
        "shot{wildcards.shot}_{{calibration}}.json --threads {threads} "
        "--settings-json {params.settings} > {log} 2>&1"


rule metatest_all:
    input:
        metatest_results(),
