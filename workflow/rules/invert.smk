# Phase 3: warm-start inversion of each scenario's pool into its learnable pseudo dataset (GPU).


rule invert_pool:
    input:
        pool=lambda wc: pool_files(wc.scenario),
        stores=scenario_stores,
        script="scripts/invert_pool.py",
        code=script_code("scripts/invert_pool.py"),
    output:
        pseudo="results/synthetic/{scenario}/pseudo.safetensors",
        curve="results/synthetic/{scenario}/inversion_curve.csv",
        summary="results/synthetic/{scenario}/inversion.json",
        grid=report(
            "results/synthetic/{scenario}/pseudo_grid.png",
            caption="../report/pseudo_grid.rst",
            category="Pseudo data",
            subcategory="{scenario}",
        ),
    params:
        settings=lambda wc: json_arg(
            {"seed": config["seed"], "scenario": config["scenarios"][wc.scenario], "inversion": config["inversion"]}
        ),
    log:
        "logs/invert/{scenario}.log",
    benchmark:
        "benchmarks/invert/{scenario}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
        gpu=1,
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/invert_pool.py --scenario {wildcards.scenario} --pool results/pool/{wildcards.scenario} "
        "--out results/synthetic/{wildcards.scenario} --threads {threads} --settings-json {params.settings} "
        "> {log} 2>&1"


rule invert:
    input:
        expand("results/synthetic/{scenario}/pseudo.safetensors", scenario=RUN_SCENARIOS),
