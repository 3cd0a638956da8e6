# dfml: data-free meta-learning pipeline. Phases and artifacts: see README and DESIGN.md.
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "params.yaml"


from dfml.config import check_method_algorithms, check_moved_keys, check_untrusted_values, integer_seeds

integer_seeds(config)  # --config training_seeds=[0,1,2] passes strings
check_moved_keys(config)  # keys of older params files: say where they went
check_method_algorithms(config)  # methods: a known algorithm and its own settings, said in words
check_untrusted_values(config)  # scenarios' untrusted members: fraction and kinds, said in words
validate(config, "workflow/schemas/params.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pool.smk"
include: "workflow/rules/invert.smk"
include: "workflow/rules/metatrain.smk"
include: "workflow/rules/metatest.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/scaling.smk"


onsuccess:
    if Path("results/summary.md").exists():
        print("\n[dfml] summary: results/summary.md   metrics: results/metrics.json   figures: results/plots/")


rule all:
    default_target: True
    input:
        rules.pool.input,
        rules.report.output.metrics,
