# Training: one rule for teacher, sCT and sCD. The run's resolved config is a file whose rule
# re-runs when the config changes (params), so only the affected runs retrain.


rule run_config:
    output:
        f"{RESULTS}/runs/{{run}}/run.yaml",
    log:
        f"{RESULTS}/logs/config/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/run_config/{{run}}.tsv"
    localrule: True
    conda:
        "../envs/scm.yaml"
    params:
        cfg=lambda wc: json.dumps(STUDY.config_dict(wc.run), sort_keys=True),
    shell:
        "scm config write --json {params.cfg:q} --out {output} > {log} 2>&1"


rule train:
    input:
        cfg=f"{RESULTS}/runs/{{run}}/run.yaml",
        teacher=teacher_final,
    output:
        f"{RESULTS}/runs/{{run}}/final.pt",
    log:
        f"{RESULTS}/logs/train/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{run}}.tsv"
    wildcard_constraints:
        run=r"(sct|scd)-[A-Za-z]+-[a-z0-9_]+-s\d+",
    # On SLURM a node failure or a job killed outside submitit's requeue re-runs the rule; training resumes.
    retries: 2 if LAUNCHER == "slurm" else 0
    conda:
        "../envs/scm.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        run_dir=lambda wc: STUDY.run_dir(wc.run),
        launcher=LAUNCHER,
        cluster=CLUSTER_ARGS,
    shell:
        "scm train --config {input.cfg} --run-dir {params.run_dir} --launcher {params.launcher} "
        "{params.cluster} --on-config-change restart > {log} 2>&1"


# Teachers gate every sCD run: the same rule for them, scheduled first.
use rule train as train_teacher with:
    wildcard_constraints:
        run=r"teacher-[A-Za-z]+-[a-z0-9_]+-s\d+",
    priority: 10
