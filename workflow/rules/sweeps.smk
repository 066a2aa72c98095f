# Hyperparameter sweeps with Optuna (scm sweep): a study file declares the search space.
SWEEP = config.get("sweep", {})
SWEEP_NAME = Path(SWEEP["file"]).stem if SWEEP.get("enabled") else None
SWEEP_OUTPUTS = [f"{R}/sweeps/{SWEEP_NAME}/best.yaml"] if SWEEP_NAME else []


rule sweep:
    input:
        SWEEP.get("file", []),
    output:
        best=f"{R}/sweeps/{{name}}/best.yaml",
        trials=f"{R}/sweeps/{{name}}/trials.csv",
    log:
        f"{R}/logs/sweeps/{{name}}.log",
    benchmark:
        f"{R}/benchmarks/sweeps/{{name}}.tsv"
    conda:
        "../envs/scm.yaml"
    threads: 2
    params:
        launcher="local" if LAUNCHER == "debug" else LAUNCHER,
        cluster=CLUSTER_ARGS,
    shell:
        "scm sweep --sweep-file {input} --workers {threads} --launcher {params.launcher} {params.cluster} "
        "--out $(dirname {output.best}) > {log} 2>&1"
