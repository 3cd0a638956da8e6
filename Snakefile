# dfml: data-free meta-learning pipeline. Phases and artifacts: see README and DESIGN.md.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "params.yaml"


validate(config, "workflow/schemas/params.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pool.smk"
include: "workflow/rules/invert.smk"
include: "workflow/rules/metatrain.smk"


rule all:
    default_target: True
    input:
        rules.pool.input,
        rules.metatrain_all.input,
