# Training: one rule for teacher, sCT and sCD. The run's resolved config is a file whose rule
# re-runs when the config changes (params), so only the affected runs retrain.


rule run_config:
    conda:
        "../envs/scm.yaml"
    output:
        f"{R}/runs/{{run}}/run.yaml",
    log:
        f"{R}/logs/config/{{run}}.log",
    params:
        cfg=lambda wc: STUDY.config_dict(wc.run),
    localrule: True
    run:
        from scm.study import write_yaml

        write_yaml(params.cfg, output[0])
        Path(log[0]).write_text(f"wrote {output[0]}\n")


rule train:
    wildcard_constraints:
        run=r"(sct|scd)-[A-Za-z]+-[a-z0-9_]+-s\d+",
    conda:
        "../envs/scm.yaml"
    input:
        cfg=f"{R}/runs/{{run}}/run.yaml",
        teacher=teacher_final,
    output:
        f"{R}/runs/{{run}}/final.pt",
    log:
        f"{R}/logs/train/{{run}}.log",
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
