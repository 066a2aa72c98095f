# Evaluation per run: FID (and class accuracy, FJD, KID, precision/recall, FD_DINOv2) at each number of
# sampling steps, and a grid. The embedded dataset's feature network is trained once per renderer version
# (deterministic) before any evaluation that needs it; a real dataset's reference statistics are imported
# (eval.ref_stats) or computed once by the `reference` rule. On the slurm launcher `scm evaluate` and
# `scm sample` run as job arrays of eval.shards tasks with the eval cluster profile's GPUs (the rule's
# process waits, then reduces); on debug they run in the rule's process, one shard.


rule extractor:
    output:
        weights=str(shapes_extractor_path("{version}", f"{RESULTS}/artifacts")),
        record=f"{RESULTS}/artifacts/shapes-features-data{{version}}.json",
    log:
        f"{RESULTS}/logs/extractor-data{{version}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/extractor/data{{version}}.tsv"
    wildcard_constraints:
        version=r"\d+",
    conda:
        "../envs/scm.yaml"
    threads: 1
    shell:
        "scm data build-extractor --shapes-version {wildcards.version} --out {output.weights} "
        "--record {output.record} > {log} 2>&1"


rule reference:
    output:
        f"{RESULTS}/ref-stats/{{dataset}}-fid.npz",
    log:
        f"{RESULTS}/logs/ref-stats-{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/reference/{{dataset}}.tsv"
    conda:
        "../envs/scm.yaml"
    threads: 1
    params:
        path=lambda wc: shlex.quote(STUDY.config(RUN_IDS[0]).data.path),
        weights=shlex.quote(EVAL_INPUTS.get("inception", "")),
        cache=f"{RESULTS}/cache/ref-stats",
    shell:
        "scm data ref-stats --dataset {wildcards.dataset} --path {params.path} --extractor-weights {params.weights} "
        "--cache-dir {params.cache} --out {output} > {log} 2>&1"


rule evaluate:
    input:
        run=f"{RESULTS}/runs/{{run}}/final.pt",
        extractor=extractor_of,
        reference=reference_of,
    output:
        f"{RESULTS}/metrics/{{run}}.json",
    log:
        f"{RESULTS}/logs/evaluate/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{run}}.tsv"
    conda:
        "../envs/scm.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        gpu=EVAL_GPUS,
    params:
        run_dir=lambda wc: STUDY.run_dir(wc.run),
        steps=lambda wc: " ".join(str(s) for s in STUDY.eval_steps(wc.run)),
        num=EVAL["num_samples"],
        seed_sets=EVAL["seed_sets"],
        inputs=eval_args,
        launch=EVAL_LAUNCH,
        cache=lambda wc, output: Path(output[0]).parents[1] / "cache" / "ref-stats",
    shell:
        "scm evaluate --run-dir {params.run_dir} --steps {params.steps} --num {params.num} "
        "--seed-sets {params.seed_sets} {params.inputs} --cache-dir {params.cache} "
        "{params.launch} --out {output} > {log} 2>&1"


rule samples:
    input:
        f"{RESULTS}/runs/{{run}}/final.pt",
    output:
        f"{RESULTS}/samples/{{run}}/grid.png",
    log:
        f"{RESULTS}/logs/samples/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/samples/{{run}}.tsv"
    conda:
        "../envs/scm.yaml"
    threads: 1
    resources:
        gpu=EVAL_GPUS,
    params:
        run_dir=lambda wc: STUDY.run_dir(wc.run),
        steps=lambda wc: STUDY.eval_steps(wc.run)[-1],
        num=EVAL["grid_samples"],
        seeds=f"{EVAL['grid_first_seed']}-{EVAL['grid_first_seed'] + EVAL['grid_samples'] - 1}",
        vae=f"--vae {shlex.quote(EVAL_INPUTS['vae'])}" if EVAL_INPUTS.get("vae") else "",
        sampler=lambda wc: sampler_args(parse_run_id(wc.run)),
        launch=f"--launcher {LAUNCHER}"
        + (
            f" --cluster {EVAL_CLUSTER} --clusters {config['clusters']}"
            if LAUNCHER == "slurm"
            else ""
        ),
    shell:
        "scm sample --run-dir {params.run_dir} --steps {params.steps} --num {params.num} --seeds {params.seeds} "
        "{params.vae}"
        "{params.sampler} {params.launch} --out $(dirname {output}) > {log} 2>&1"
