# Phase 2: pretrain the model pool, one job per member, then a summary table per scenario.


rule pretrain_model:
    input:
        stores=member_stores,  # the other datasets' meta-test decides which pool classes leak
    output:
        weights="results/pool/{scenario}/member_{member}.safetensors",
        card="results/pool/{scenario}/member_{member}.json",
    params:
        code=job_code("scripts/pretrain_member.py"),
        settings=lambda wc: json_arg(member_settings(config, wc.scenario, int(wc.member))),
    log:
        "logs/pool/{scenario}/member_{member}.log",
    benchmark:
        "benchmarks/pool/{scenario}/member_{member}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 3000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
        gpu=0,
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/pretrain_member.py --scenario {wildcards.scenario} --member {wildcards.member} "
        "--threads {threads} --settings-json {params.settings} > {log} 2>&1"


rule summarize_pool:
    input:
        members=lambda wc: pool_files(wc.scenario),
    output:
        csv="results/pool/{scenario}/summary.csv",
        markdown="results/pool/{scenario}/summary.md",
    params:
        code=job_code("scripts/pool_summary.py"),
    log:
        "logs/pool/{scenario}/summary.log",
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/pool_summary.py results/pool/{wildcards.scenario} "
        "--csv {output.csv} --markdown {output.markdown} > {log} 2>&1"


rule pool:
    input:
        expand("results/pool/{scenario}/summary.md", scenario=RUN_SCENARIOS),
