# Phase 3: warm-start inversion of each scenario's pool into its learnable pseudo dataset (GPU).


rule invert_pool:
    input:
        pool=lambda wc: pool_files(wc.scenario),
        stores=scenario_stores,
    output:
        pseudo="results/synthetic/{scenario}/seed{seed}/pseudo.safetensors",
        curve="results/synthetic/{scenario}/seed{seed}/inversion_curve.csv",
        summary="results/synthetic/{scenario}/seed{seed}/inversion.json",
        grid=report(
            "results/synthetic/{scenario}/seed{seed}/pseudo_grid.png",
            caption="../report/pseudo_grid.rst",
            category="Pseudo data",
            subcategory="{scenario} seed {seed}",
        ),
    params:
        code=job_code("scripts/invert_pool.py"),
        settings=lambda wc: json_arg(
            {"seed": config["seed"], "training_seed": int(wc.seed), "scenario": config["scenarios"][wc.scenario],
             "inversion": config["inversion"]}
        ),
    log:
        "logs/invert/{scenario}/seed{seed}.log",
    benchmark:
        "benchmarks/invert/{scenario}/seed{seed}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
        gpu=1,
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/invert_pool.py --scenario {wildcards.scenario} --pool results/pool/{wildcards.scenario} "
        "--out results/synthetic/{wildcards.scenario}/seed{wildcards.seed} --threads {threads} --settings-json {params.settings} "
        "> {log} 2>&1"


rule invert:
    input:
        expand("results/synthetic/{scenario}/seed{seed}/pseudo.safetensors", scenario=RUN_SCENARIOS, seed=TRAINING_SEEDS),
