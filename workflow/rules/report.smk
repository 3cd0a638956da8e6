# Phase 6: metrics.json, plot CSVs and figures, summary.md (and `snakemake --report report.html`).


rule report:
    input:
        results=metatest_results(),
        curves=metatrain_curves(),
        pseudo=expand(
            "results/metatrain/{scenario}/purer/shot{shot}/pseudo_final.safetensors",
            scenario=purer_picture_scenarios(),
            shot=config["metatrain"]["shots"][:1],
        ),
        script="scripts/report.py",
        code=script_code("scripts/report.py"),
    output:
        metrics="results/metrics.json",
        summary=report("results/summary.md", caption="../report/summary.rst", category="Summary"),
        accuracy_csv="results/plots/accuracy.csv",
        curves_csv="results/plots/metaval_curves.csv",
        comparisons_csv="results/plots/comparisons.csv",
        accuracy_png=report("results/plots/accuracy.png", caption="../report/accuracy.rst", category="Accuracy"),
        curves_png=report(
            "results/plots/metaval_curves.png", caption="../report/metaval_curves.rst", category="Meta-training"
        ),
        pseudo_png=report(
            expand("results/plots/pseudo_vs_real_{scenario}.png", scenario=purer_picture_scenarios()),
            caption="../report/pseudo_vs_real.rst",
            category="Pseudo data",
        ),
    params:
        reproduce=reproduce_command(),
        comparisons=json.dumps(config["report"]["comparisons"]),
    log:
        "logs/report.log",
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/report.py --results {input.results} --curves {input.curves} --pseudo {input.pseudo} "
        "--out results --metrics {output.metrics} --reproduce {params.reproduce:q} --comparisons-json {params.comparisons:q} > {log} 2>&1 && tail -n 1 {log}"
