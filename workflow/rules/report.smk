# The report: the paper's tables and figures for this study, next to the paper's numbers.
# `snakemake --report` groups them: main results (numbers beside sample grids), ablations, cost.


rule report:
    input:
        metrics=expand(f"{RESULTS}/metrics/{{run}}.json", run=RUN_IDS),
        grids=expand(
            f"{RESULTS}/samples/{{run}}/grid.png",
            run=[r.run_id for r in STUDY.main_runs()],
        ),
        reference="resources/paper-tables.csv",
    output:
        main_md=report(
            f"{RESULTS}/tables/main.md",
            caption="../report/main.rst",
            category="1. Main results",
            subcategory="Tables",
        ),
        main_tex=f"{RESULTS}/tables/main.tex",
        samples=report(
            f"{RESULTS}/figures/samples.png",
            caption="../report/samples.rst",
            category="1. Main results",
            subcategory="Samples beside their numbers",
        ),
        compute_fid=report(
            f"{RESULTS}/figures/compute_vs_fid.png",
            caption="../report/figures.rst",
            category="1. Main results",
            subcategory="Figures",
        ),
        figure1=report(
            f"{RESULTS}/figures/figure1_paper.png",
            caption="../report/figures.rst",
            category="1. Main results",
            subcategory="Figures",
        ),
        fid_size=report(
            f"{RESULTS}/figures/fid_vs_size.png",
            caption="../report/figures.rst",
            category="1. Main results",
            subcategory="Figures",
        ),
        ablations_md=report(
            f"{RESULTS}/tables/ablations.md",
            caption="../report/ablations.rst",
            category="2. Ablations",
            subcategory="Table",
        ),
        ablations_tex=f"{RESULTS}/tables/ablations.tex",
        effects=report(
            f"{RESULTS}/figures/ablation_effects.png",
            caption="../report/ablation_effects.rst",
            category="2. Ablations",
            subcategory="Effects",
        ),
        curves=report(
            f"{RESULTS}/figures/ablation_curves.png",
            caption="../report/ablation_curves.rst",
            category="2. Ablations",
            subcategory="Training curves",
        ),
        cost_md=report(
            f"{RESULTS}/tables/cost.md",
            caption="../report/cost.rst",
            category="3. Cost",
        ),
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/report.tsv"
    localrule: True
    conda:
        "../envs/scm.yaml"
    params:
        dataset=config["dataset"],
        results=lambda wc, output: Path(output.main_md).parents[1],
    shell:
        "scm report --dataset {params.dataset} --results {params.results} --reference {input.reference} "
        "--metrics {input.metrics} > {log} 2>&1"
