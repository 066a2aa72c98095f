# Evaluation per run: FID (and class accuracy, FJD, KID, precision/recall) at each number of sampling steps,
# and a grid. The embedded dataset's feature network is trained once per renderer version (deterministic)
# before any evaluation that needs it.


rule extractor:
    conda:
        "../envs/scm.yaml"
    output:
        str(shapes_extractor_path("{version}", f"{R}/artifacts")),
    log:
        f"{R}/logs/extractor-data{{version}}.log",
    wildcard_constraints:
        version=r"\d+",
    threads: 1
    shell:
        "scm data build-extractor --shapes-version {wildcards.version} --out {output} > {log} 2>&1"


rule evaluate:
    conda:
        "../envs/scm.yaml"
    input:
        run=f"{R}/runs/{{run}}/final.pt",
        extractor=extractor_of,
    output:
        f"{R}/metrics/{{run}}.json",
    log:
        f"{R}/logs/evaluate/{{run}}.log",
    threads: 1
    resources:
        mem_mb=2000,
    params:
        run_dir=lambda wc: STUDY.run_dir(wc.run),
        steps=lambda wc: " ".join(str(s) for s in STUDY.eval_steps(wc.run)),
        num=config["eval"]["num_samples"],
        seed_sets=config["eval"]["seed_sets"],
        extractor=lambda wc, input: f"--extractor-weights {input.extractor}" if input.extractor else "",
        cache=lambda wc, output: Path(output[0]).parents[1] / "cache" / "ref-stats",
    shell:
        "scm evaluate --run-dir {params.run_dir} --steps {params.steps} --num {params.num} "
        "--seed-sets {params.seed_sets} {params.extractor} --cache-dir {params.cache} --threads 1 "
        "--out {output} > {log} 2>&1"


rule samples:
    conda:
        "../envs/scm.yaml"
    input:
        f"{R}/runs/{{run}}/final.pt",
    output:
        f"{R}/samples/{{run}}/grid.png",
    log:
        f"{R}/logs/samples/{{run}}.log",
    threads: 1
    params:
        run_dir=lambda wc: STUDY.run_dir(wc.run),
        steps=lambda wc: STUDY.eval_steps(wc.run)[-1],
    shell:
        "scm sample --run-dir {params.run_dir} --steps {params.steps} --num 64 --seeds 0-63 "
        "--out $(dirname {output}) > {log} 2>&1"
