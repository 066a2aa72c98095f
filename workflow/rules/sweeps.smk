# Hyperparameter sweeps with Optuna (scm sweep): a study file declares the search space.
SWEEP = config.get("sweep", {})
SWEEP_NAME = Path(SWEEP["file"]).stem if SWEEP.get("enabled") else None
SWEEP_OUTPUTS = [f"{RESULTS}/sweeps/{SWEEP_NAME}/best.yaml"] if SWEEP_NAME else []


rule sweep:
    input:
        SWEEP.get("file", []),
    output:
        best=f"{RESULTS}/sweeps/{{name}}/best.yaml",
        trials=f"{RESULTS}/sweeps/{{name}}/trials.csv",
    log:
        f"{RESULTS}/logs/sweeps/{{name}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sweeps/{{name}}.tsv"
    conda:
        "../envs/scm.yaml"
    threads: 2
    params:
        launcher="local" if LAUNCHER == "debug" else LAUNCHER,
        cluster=CLUSTER_ARGS,
    shell:
        "scm sweep --sweep-file {input} --workers {threads} --launcher {params.launcher} {params.cluster} "
        "--out $(dirname {output.best}) > {log} 2>&1"
