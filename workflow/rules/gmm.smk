# The exact-answer study (a study with `dataset: gmm` and an `exact` section; docs/gmm-study.md).
# One job per (row, technique) trains and scores every seed in one process (tiny runs: process start-up
# would dominate); the learned teacher comes from the train_teacher rule. Logic lives in scm.exact.
from scm.exact import ExactStudy

EXACT = ExactStudy(config) if config["dataset"] == "gmm" and config.get("exact") else None
EX = f"{R}/exact"
EXACT_JOBS = [EXACT.job_name(row, tech) for row, tech in EXACT.jobs()] if EXACT else []
EXACT_OUTPUTS = (
    [f"{R}/tables/exact.md", f"{R}/figures/exact_curves.png", f"{R}/figures/exact_map2d.png"] if EXACT else []
)


wildcard_constraints:
    job=r"(scd_exact|scd_learned|sct)-[a-z0-9_]+",


rule exact_reference:
    conda:
        "../envs/scm.yaml"
    output:
        f"{EX}/reference.pt",
    log:
        f"{R}/logs/exact/reference.log",
    threads: 1
    priority: 20
    params:
        spec=exact_spec("reference"),
    shell:
        "scm exact reference --spec {params.spec} --out {output} > {log} 2>&1"


rule exact_train:
    conda:
        "../envs/scm.yaml"
    input:
        reference=f"{EX}/reference.pt",
        teacher=exact_teacher_final,
    output:
        f"{EX}/jobs/{{job}}.json",
    log:
        f"{R}/logs/exact/{{job}}.log",
    threads: 1
    resources:
        mem_mb=1500,
    params:
        spec=exact_spec("job-{job}"),
    shell:
        "scm exact train --spec {params.spec} --reference {input.reference} --out {output} > {log} 2>&1"


rule exact_map2d:
    conda:
        "../envs/scm.yaml"
    output:
        report(f"{R}/figures/exact_map2d.png", category="Exact study", subcategory="2-D variant"),
    log:
        f"{R}/logs/exact/map2d.log",
    threads: 1
    params:
        spec=exact_spec("map2d"),
    shell:
        "scm exact map2d --spec {params.spec} --out {output} > {log} 2>&1"


rule exact_report:
    conda:
        "../envs/scm.yaml"
    input:
        reference=f"{EX}/reference.pt",
        metrics=expand(f"{EX}/jobs/{{job}}.json", job=EXACT_JOBS),
    output:
        table=report(f"{R}/tables/exact.md", category="Exact study", subcategory="Table"),
        summary=f"{R}/tables/exact.json",
        curves=report(f"{R}/figures/exact_curves.png", category="Exact study", subcategory="Error vs iterations"),
    log:
        f"{R}/logs/exact/report.log",
    localrule: True
    params:
        spec=exact_spec("report"),
        results=lambda wc, output: Path(output.table).parents[1],
    shell:
        "scm exact report --spec {params.spec} --reference {input.reference} --metrics {input.metrics} "
        "--out {params.results} > {log} 2>&1"
