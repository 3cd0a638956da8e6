# Phase 6: metrics.json, plot CSVs and figures, summary.md (and `snakemake --report report.html`).


rule report:
    input:
        results=metatest_results(),
        curves=metatrain_curves(),
        members=members_files(),
        pool_cards=attack_pool_cards(),
        pseudo=expand(
            "results/metatrain/{scenario}/purer/seed{seed}/shot{shot}/pseudo_final.safetensors",
            scenario=purer_picture_scenarios(),
            seed=TRAINING_SEEDS[:1],
            shot=config["metatrain"]["shots"][:1],
        ),
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
        # Only when the run scenarios hold an attack family: without one the report is as before.
        attack_csv=expand(
            "results/plots/attack_{table}.csv", table=["accuracy", "weights"] if attack_family_names() else []
        ),
        attack_png=report(
            expand(
                "results/plots/attack_{figure}_{family}.png",
                figure=["accuracy", "weights"],
                family=attack_family_names(),
            ),
            caption="../report/attack.rst",
            category="Untrusted members",
        ),
    params:
        code=job_code("scripts/report.py"),
        reproduce=reproduce_command(),
        comparisons=json.dumps(config["report"]["comparisons"]),
        method_order=json.dumps([*config["methods"], *config["metatest"]["baselines"]]),
        scenarios=json.dumps(run_scenario_settings(), sort_keys=True),
    log:
        "logs/report.log",
    conda:
        "../envs/dfml.yaml"
    shell:
        "python scripts/report.py --results {input.results} --curves {input.curves} --pseudo {input.pseudo} "
        "--out results --metrics {output.metrics} --reproduce {params.reproduce:q} --comparisons-json {params.comparisons:q} "
        "--method-order {params.method_order:q} "
        "--members {input.members} --scenarios-json {params.scenarios:q} --pools-root results/pool > {log} 2>&1 && tail -n 1 {log}"
