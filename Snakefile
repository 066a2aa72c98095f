# scm-bench pipeline: teachers, sCD and sCT per size, ablations, sweeps, evaluation, report.
# Thin by design: the run grid and every per-run setting come from scm.study (unit-tested).
from snakemake.utils import min_version, validate

min_version("9.0")


# The embedded default study, unless the command line names a study (--configfile): studies are
# complete files, never merged with the default one.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/sweeps.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/gmm.smk"


# Metrics and sample grids are targets too: deleting one re-creates it, then the report.
# An exact study (dataset gmm with an `exact` section) has its own outputs (workflow/rules/gmm.smk).
rule all:
    default_target: True
    input:
        EXACT_OUTPUTS
        if EXACT
        else [
            rules.report.output,
            rules.report.input.metrics,
            rules.report.input.grids,
        ],
        SWEEP_OUTPUTS,
