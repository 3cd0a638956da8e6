# A study of accuracy against meta-iterations (configs/scaling.yaml, docs/scaling.md): every meta-model kept at
# metatrain.keep_checkpoints is scored plain on meta-test and on meta-val under every protocol; ICFIL at the
# last kept model and at the one meta-val selects among the kept (a checkpoint rule: which one is known only
# after its meta-val scores); the report fits accuracy against log2(iterations). Target: `scaling`. The scoring
# jobs are scripts/metatest.py's, on a kept model and a split. Their input functions: common.smk.

rule score_kept:
    input:
        kept=kept_dir,
        pool=lambda wc: pool_files(wc.scenario),
        stores=scenario_stores,
    output:
        "results/scaling/{scenario}/{method}/{run}/shot{shot}/iter{iteration}/{protocol}/{split}_plain.json",
    wildcard_constraints:
        split="meta_val|meta_test",
        iteration=r"\d+",
    params:
        code=job_code("scripts/metatest.py", lambda wc: metatest_choices(config, wc.method)),
        settings=lambda wc: json_arg(metatest_settings(wc)),
    log:
        "logs/scaling/{scenario}/{method}/{run}/shot{shot}/iter{iteration}/{protocol}_{split}_plain.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/metatest.py --scenario {wildcards.scenario} --method {wildcards.method} "
        "--protocol {wildcards.protocol} --shot {wildcards.shot} --calibrations plain --split {wildcards.split} "
        "--pool results/pool/{wildcards.scenario} --meta-model {input.kept}/iter{wildcards.iteration}/meta_model.safetensors "
        "--out results/scaling/{wildcards.scenario}/{wildcards.method}/{wildcards.run}/shot{wildcards.shot}/iter{wildcards.iteration}/{wildcards.protocol}/"
        "{wildcards.split}_{{calibration}}.json "
        "--threads {threads} --settings-json {params.settings} > {log} 2>&1"


rule score_kept_icfil:
    input:
        kept=kept_dir,
        pool=lambda wc: pool_files(wc.scenario),
        stores=scenario_stores,
    output:
        result="results/scaling/{scenario}/{method}/{run}/shot{shot}/iter{iteration}/{protocol}/meta_test_icfil.json",
        tuning="results/scaling/{scenario}/{method}/{run}/shot{shot}/iter{iteration}/{protocol}/icfil_tuning.json",
    wildcard_constraints:
        iteration=r"\d+",
        protocol=one_of([p for p in PROTOCOLS if calibrated_protocol(p)]),
    params:
        code=job_code("scripts/metatest.py", lambda wc: metatest_choices(config, wc.method)),
        settings=lambda wc: json_arg(metatest_settings(wc)),
    log:
        "logs/scaling/{scenario}/{method}/{run}/shot{shot}/iter{iteration}/{protocol}_meta_test_icfil.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/metatest.py --scenario {wildcards.scenario} --method {wildcards.method} "
        "--protocol {wildcards.protocol} --shot {wildcards.shot} --calibrations icfil "
        "--pool results/pool/{wildcards.scenario} --meta-model {input.kept}/iter{wildcards.iteration}/meta_model.safetensors "
        "--tuning-out {output.tuning} "
        "--out results/scaling/{wildcards.scenario}/{wildcards.method}/{wildcards.run}/shot{wildcards.shot}/iter{wildcards.iteration}/{wildcards.protocol}/"
        "meta_test_{{calibration}}.json "
        "--threads {threads} --settings-json {params.settings} > {log} 2>&1"


checkpoint scaling_selection:
    input:
        lambda wc: scaling_plain_results(wc.scenario, wc.method, wc.run, wc.shot),
    output:
        "results/scaling/{scenario}/{method}/{run}/shot{shot}/selection.json",
    params:
        code=job_code("scripts/scaling.py"),
    log:
        "logs/scaling/{scenario}/{method}/{run}/shot{shot}/selection.log",
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/scaling.py select --results {input} --out {output} > {log} 2>&1"


rule scaling_report:
    input:
        plain=[f for arm in scaling_arms() for f in scaling_plain_results(*arm)],
        selections=[f"results/scaling/{s}/{m}/{r}/shot{k}/selection.json" for s, m, r, k in scaling_arms()
                    if kept_iterations(m, k)],
        icfil=icfil_results,
        pool=[f"results/pool/{s}/member_{i}.json" for s in RUN_SCENARIOS for i in scenario_members(s)],
    output:
        report="results/scaling/report.md",
        numbers="results/scaling/scaling.json",
        figure="results/scaling/scaling.png",
    params:
        code=job_code("scripts/scaling.py"),
        settings=lambda wc: json_arg(config.get("scaling", {})),
    log:
        "logs/scaling/report.log",
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/scaling.py report --plain {input.plain} --icfil {input.icfil} --pool-cards {input.pool} "
        "--settings-json {params.settings} --out-dir results/scaling > {log} 2>&1"


rule scaling:
    input:
        rules.scaling_report.output,
