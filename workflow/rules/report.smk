# The report: the paper's tables and figures for this study, next to the paper's numbers.


rule report:
    conda:
        "../envs/scm.yaml"
    input:
        metrics=expand(f"{R}/metrics/{{run}}.json", run=RUN_IDS),
        grids=expand(f"{R}/samples/{{run}}/grid.png", run=[r.run_id for r in STUDY.main_runs()]),
        reference="results/reference/paper-tables.csv",
    output:
        main_md=report(f"{R}/tables/main.md", category="Tables"),
        main_tex=f"{R}/tables/main.tex",
        ablations_md=report(f"{R}/tables/ablations.md", category="Tables"),
        ablations_tex=f"{R}/tables/ablations.tex",
        cost_md=report(f"{R}/tables/cost.md", category="Tables"),
        compute_fid=report(f"{R}/figures/compute_vs_fid.png", category="Figures"),
        figure1=report(f"{R}/figures/figure1_paper.png", category="Figures"),
        fid_size=report(f"{R}/figures/fid_vs_size.png", category="Figures"),
        curves=report(f"{R}/figures/ablation_curves.png", category="Figures"),
        samples=report(f"{R}/figures/samples.png", category="Figures"),
    log:
        f"{R}/logs/report.log",
    localrule: True
    params:
        dataset=config["dataset"],
        results=lambda wc, output: Path(output.main_md).parents[1],
    shell:
        "scm report --dataset {params.dataset} --results {params.results} --reference {input.reference} "
        "--metrics {input.metrics} > {log} 2>&1"
