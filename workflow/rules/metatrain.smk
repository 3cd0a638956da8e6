# Phase 4: meta-training per scenario x method x shot (PURER with ECI, and the EI ablation); one training
# run selects one model per evaluation protocol on meta-val. One rule for every algorithm: its inputs follow
# from what the method declares (dfml/methods/base.py: the pseudo data only when it needs it).
# Resumable: the checkpoint under results/checkpoints/ survives a killed or preempted job.


rule metatrain:
    input:
        unpack(metatrain_inputs),
        stores=scenario_stores,
        script="scripts/metatrain.py",
        code=script_code("scripts/metatrain.py"),
    output:
        models=expand("results/metatrain/{{scenario}}/{{method}}/shot{{shot}}/{protocol}/meta_model.safetensors",
                      protocol=PROTOCOLS),
        cards=expand("results/metatrain/{{scenario}}/{{method}}/shot{{shot}}/{protocol}/meta_model.json",
                     protocol=PROTOCOLS),
        curve="results/metatrain/{scenario}/{method}/shot{shot}/curve.csv",
        pseudo="results/metatrain/{scenario}/{method}/shot{shot}/pseudo_final.safetensors",
    params:
        settings=lambda wc: json_arg(metatrain_settings(wc)),
        pseudo=metatrain_pseudo_arg,
        checkpoint="results/checkpoints/{scenario}/{method}/shot{shot}.safetensors",
    log:
        "logs/metatrain/{scenario}/{method}/shot{shot}.log",
    benchmark:
        "benchmarks/metatrain/{scenario}/{method}/shot{shot}.tsv"
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
        "--out results/metatrain/{wildcards.scenario}/{wildcards.method}/shot{wildcards.shot} "
        "--checkpoint {params.checkpoint} --threads {threads} --settings-json {params.settings} > {log} 2>&1"


rule metatrain_all:
    input:
        expand(
            "results/metatrain/{scenario}/{method}/shot{shot}/{protocol}/meta_model.safetensors",
            scenario=RUN_SCENARIOS,
            method=METHODS,
            shot=config["metatrain"]["shots"],
            protocol=PROTOCOLS,
        ),
