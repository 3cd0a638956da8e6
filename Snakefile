# dfml: data-free meta-learning pipeline. Phases and artifacts: see README and DESIGN.md.
import os
import sys
from pathlib import Path

# This checkout's dfml, for the Snakefile and for every job (a plain `python scripts/...` puts scripts/, not the
# checkout, on sys.path): an environment shared by two clones has its editable install pointing at one of them,
# and a job of the other would silently run that one's code.
sys.path.insert(0, workflow.basedir)
os.environ.update(PYTHONPATH=os.pathsep.join([workflow.basedir, *filter(None, [os.environ.get("PYTHONPATH")])]))

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
