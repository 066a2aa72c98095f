# The exact-answer study (a study with `dataset: gmm` and an `exact` section; docs/gmm-study.md).
# The (row, technique) jobs are dealt into `exact.processes` training groups, one process each, that train
# and score every seed of their techniques (tiny runs: each process start costs torch's import and the
# optimizer's first use); the learned teacher comes from the train_teacher rule. Logic: scm.exact_study.
from scm.exact_study import ExactStudy

EXACT = (
    ExactStudy(config) if config["dataset"] == "gmm" and config.get("exact") else None
)
EXACT_RESULTS = f"{RESULTS}/exact"
EXACT_GROUPS = list(EXACT.groups()) if EXACT else []
EXACT_OUTPUTS = (
    [
        f"{RESULTS}/tables/exact.md",
        f"{RESULTS}/figures/exact_curves.png",
        f"{RESULTS}/figures/exact_map2d.png",
    ]
    if EXACT
    else []
)


wildcard_constraints:
    group=r"part[0-9]+",


rule exact_reference:
    output:
        f"{EXACT_RESULTS}/reference.pt",
    log:
        f"{RESULTS}/logs/exact/reference.log",
    priority: 20
    conda:
        "../envs/scm.yaml"
    threads: 1
    params:
        spec=exact_spec("reference"),
    shell:
        "scm exact reference --spec {params.spec} --out {output} > {log} 2>&1"


rule exact_train:
    input:
        reference=f"{EXACT_RESULTS}/reference.pt",
        teacher=exact_teacher_final,
    output:
        f"{EXACT_RESULTS}/groups/{{group}}.json",
    log:
        f"{RESULTS}/logs/exact/{{group}}.log",
    conda:
        "../envs/scm.yaml"
    threads: 1
    resources:
        mem_mb=1500,
    params:
        spec=exact_spec("group-{group}"),
    shell:
        "scm exact train --spec {params.spec} --reference {input.reference} --out {output} > {log} 2>&1"


rule exact_map2d:
    output:
        report(
            f"{RESULTS}/figures/exact_map2d.png",
            category="Exact study",
            subcategory="2-D variant",
        ),
    log:
        f"{RESULTS}/logs/exact/map2d.log",
    conda:
        "../envs/scm.yaml"
    threads: 1
    params:
        spec=exact_spec("map2d"),
    shell:
        "scm exact map2d --spec {params.spec} --out {output} > {log} 2>&1"


rule exact_report:
    input:
        reference=f"{EXACT_RESULTS}/reference.pt",
        metrics=expand(f"{EXACT_RESULTS}/groups/{{group}}.json", group=EXACT_GROUPS),
    output:
        table=report(
            f"{RESULTS}/tables/exact.md", category="Exact study", subcategory="Table"
        ),
        summary=f"{RESULTS}/tables/exact.json",
        curves=report(
            f"{RESULTS}/figures/exact_curves.png",
            category="Exact study",
            subcategory="Error vs iterations",
        ),
    log:
        f"{RESULTS}/logs/exact/report.log",
    localrule: True
    conda:
        "../envs/scm.yaml"
    params:
        spec=exact_spec("report"),
        results=lambda wc, output: Path(output.table).parents[1],
    shell:
        "scm exact report --spec {params.spec} --reference {input.reference} --metrics {input.metrics} "
        "--out {params.results} > {log} 2>&1"
