# Phase 4: meta-training per scenario x method x shot (PURER with ECI, the EI ablation, BiDf-MKD); one
# training run selects one model per evaluation protocol on meta-val. One job for every algorithm: its inputs
# and outputs follow from what the method declares (dfml/methods/base.py: the pseudo data only when it needs
# it, and then its final state as an output too). `metatrain` serves the methods on the warm-start pseudo data,
# `metatrain_no_pseudo` (the same rule without that output) the others, which instead write members.json: the
# pool members they drew and their final sampling probabilities (the report's attack section reads it).
# Resumable: the checkpoint under results/checkpoints/ survives a killed or preempted job. With
# metatrain.keep_checkpoints (a study of accuracy against iterations), the models of those iterations are an
# output too: kept/iter<N>/ (dfml/kept_models.py).

KEPT = ({"kept": directory("results/metatrain/{scenario}/{method}/seed{seed}/shot{shot}/kept")}
        if config["metatrain"].get("keep_checkpoints") else {})


rule metatrain:
    input:
        unpack(metatrain_inputs),
        stores=scenario_stores,
    output:
        models=expand("results/metatrain/{{scenario}}/{{method}}/seed{{seed}}/shot{{shot}}/{protocol}/meta_model.safetensors",
                      protocol=PROTOCOLS),
        cards=expand("results/metatrain/{{scenario}}/{{method}}/seed{{seed}}/shot{{shot}}/{protocol}/meta_model.json",
                     protocol=PROTOCOLS),
        curve="results/metatrain/{scenario}/{method}/seed{seed}/shot{shot}/curve.csv",
        pseudo="results/metatrain/{scenario}/{method}/seed{seed}/shot{shot}/pseudo_final.safetensors",
        **KEPT,
    wildcard_constraints:
        method=one_of(PSEUDO_METHODS),
    params:
        code=job_code("scripts/metatrain.py", lambda wc: metatrain_choices(metatrain_settings(wc))),
        settings=lambda wc: json_arg(metatrain_settings(wc)),
        pseudo=metatrain_pseudo_arg,
        checkpoint="results/checkpoints/{scenario}/{method}/seed{seed}/shot{shot}.safetensors",
    log:
        "logs/metatrain/{scenario}/{method}/seed{seed}/shot{shot}.log",
    benchmark:
        "benchmarks/metatrain/{scenario}/{method}/seed{seed}/shot{shot}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 6000 * attempt,
        runtime=lambda wc, attempt: 240 * attempt,
        gpu=1,
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/metatrain.py --scenario {wildcards.scenario} --method {wildcards.method} "
        "--shot {wildcards.shot} --pool results/pool/{wildcards.scenario} {params.pseudo} "
        "--out results/metatrain/{wildcards.scenario}/{wildcards.method}/seed{wildcards.seed}/shot{wildcards.shot} "
        "--checkpoint {params.checkpoint} --threads {threads} --settings-json {params.settings} > {log} 2>&1"


use rule metatrain as metatrain_no_pseudo with:
    output:
        models=expand("results/metatrain/{{scenario}}/{{method}}/seed{{seed}}/shot{{shot}}/{protocol}/meta_model.safetensors",
                      protocol=PROTOCOLS),
        cards=expand("results/metatrain/{{scenario}}/{{method}}/seed{{seed}}/shot{{shot}}/{protocol}/meta_model.json",
                     protocol=PROTOCOLS),
        curve="results/metatrain/{scenario}/{method}/seed{seed}/shot{shot}/curve.csv",
        members="results/metatrain/{scenario}/{method}/seed{seed}/shot{shot}/members.json",
        **KEPT,
    wildcard_constraints:
        method=one_of([m for m in METHODS if m not in PSEUDO_METHODS]),


rule metatrain_all:
    input:
        [
            trained_model(s, m, t, k, p)
            for s in RUN_SCENARIOS
            for m in trained_methods(s)
            for t in TRAINING_SEEDS
            for k in config["metatrain"]["shots"]
            for p in PROTOCOLS
        ],
