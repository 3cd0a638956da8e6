# Phase 1: every dataset source becomes a canonical store data/<dataset>/ (images + splits.json).


rule prepare_dataset:
    output:
        images="data/{dataset}/images.safetensors",
        splits="data/{dataset}/splits.json",
    params:
        code=job_code("scripts/prepare_data.py", lambda wc: dataset_choices(config["datasets"][wc.dataset])),
        settings=lambda wc: json_arg(config["datasets"][wc.dataset]),
    log:
        "logs/data/{dataset}.log",
    benchmark:
        "benchmarks/data/{dataset}.tsv"
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
        gpu=0,
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/prepare_data.py --dataset {wildcards.dataset} --out data/{wildcards.dataset} "
        "--settings-json {params.settings} > {log} 2>&1"


rule prepare_data:
    input:
        expand("data/{dataset}/splits.json", dataset=run_datasets()),
