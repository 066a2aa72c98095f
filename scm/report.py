"""The study report: the paper's tables and figures regenerated from our runs (and the paper's numbers).

Inputs: metrics JSON files (scm evaluate), each run's stats.jsonl / run.json, sample grids, and the
paper's numbers (results/reference/paper-tables.csv). Outputs under RESULTS/tables and RESULTS/figures.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from scm.study import parse_run_id  # noqa: E402

log = logging.getLogger(__name__)

METHOD_NAMES = {"teacher": "TrigFlow teacher", "sct": "sCT", "scd": "sCD"}
PAPER_DATASETS = {"cifar10", "imagenet64", "imagenet512"}
# Passes of the network per training image, in forward-pass units: forward + backward (2x) for the
# teacher; + the tangent pass for sCT; + the teacher's forward for sCD (our estimate, README).
PASSES_PER_IMAGE = {"teacher": 3, "sct": 4, "scd": 5}


# ----------------------------------------------------------------------------
# Loading.


def load_metrics(paths: list[str | Path]) -> pd.DataFrame:
    """One row per (run, sampling steps) from `scm evaluate` files."""
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        entries = data if isinstance(data, list) else data.get("entries", [data])
        for e in entries:
            run = parse_run_id(e["run_id"])
            m = e.get("metrics", e)
            rows.append({
                "run_id": e["run_id"], "method": run.method, "size": run.size, "ablation": run.ablation,
                "seed": run.seed, "steps": int(e["steps"]), "nfe": int(e["nfe"]),
                "params_m": float(e["params"]) / 1e6,
                "fid": float(m.get("fid_min", m.get("fid"))), "fid_mean": float(m.get("fid_mean", m.get("fid"))),
                "fid_sd": float(m.get("fid_sd", 0.0) or 0.0),
                "path": str(path),
            })
    df = pd.DataFrame(rows)
    if not df.empty:
        df["compute"] = df["params_m"] / 1000 * df["nfe"]  # effective sampling compute (B params x NFE)
    return df


def load_stats(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / "stats.jsonl"
    if not path.exists():
        return pd.DataFrame()
    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def load_reference(path: str | Path) -> pd.DataFrame:
    ref = pd.read_csv(path)
    ref["compute"] = ref["params_m"] / 1000 * ref["nfe"]
    return ref


# ----------------------------------------------------------------------------
# Tables.


def _fmt(mean: float, sd: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.2f}" if sd is None or np.isnan(sd) else f"{mean:.2f} ± {sd:.2f}"


def main_table(df: pd.DataFrame, ref: pd.DataFrame | None, dataset: str) -> pd.DataFrame:
    """Table 2's layout: rows method x NFE, columns sizes; 'ours (paper)' where the paper has a number."""
    base = df[df["ablation"] == "base"]
    sizes = list(dict.fromkeys(base["size"]))
    table = []
    for (method, nfe), g in base.groupby(["method", "nfe"], sort=False):
        row = {"method": METHOD_NAMES[method], "NFE": nfe}
        for size in sizes:
            cell = g[g["size"] == size]
            text = _fmt(cell["fid"].min()) if len(cell) else "-"
            if ref is not None and dataset in PAPER_DATASETS:
                paper_method = "diffusion" if method == "teacher" else method
                p = ref[(ref["dataset"] == dataset) & (ref["method"] == paper_method)
                        & (ref["size"] == size) & (ref["nfe"] == nfe)]
                if len(p):
                    text += f" ({p['fid'].iloc[0]:.2f})"
            row[size] = text
        table.append(row)
    return pd.DataFrame(table)


def ablation_table(df: pd.DataFrame, results: Path) -> pd.DataFrame:
    """Per ablation: 1- and 2-step FID mean ± sd over seeds, divergence, max grad norm, late loss variance."""
    runs = df[df["run_id"].isin(_ablation_run_ids(df))]
    rows = []
    for ablation, g in runs.groupby("ablation", sort=False):
        row = {"ablation": "full recipe" if ablation == "full" else ablation, "seeds": g["seed"].nunique()}
        for steps in sorted(g["steps"].unique()):
            s = g[g["steps"] == steps]["fid"]
            row[f"FID {steps}-step"] = _fmt(s.mean(), s.std(ddof=1) if len(s) > 1 else None)
        diverged, max_grad, loss_var = [], [], []
        for run_id in g["run_id"].unique():
            status = _status(results / "runs" / run_id)
            if status.get("state") == "diverged":
                diverged.append(f"s{parse_run_id(run_id).seed}@{status.get('step')}")
            stats = load_stats(results / "runs" / run_id)
            if len(stats):
                max_grad.append(stats.get("grad_norm_max", stats["grad_norm"]).max())
                tail = stats["loss"].iloc[int(len(stats) * 0.75):]
                loss_var.append(tail.var(ddof=0))
        row["diverged"] = ", ".join(diverged) or "no"
        row["max grad norm"] = f"{max(max_grad):.3g}" if max_grad else "-"
        row["loss var (last 25%)"] = f"{np.mean(loss_var):.3g}" if loss_var else "-"
        rows.append(row)
    return pd.DataFrame(rows)


def _ablation_run_ids(df: pd.DataFrame) -> list[str]:
    """Runs of the ablation grid: every run that is not in the main grid ('base')."""
    return list(df.loc[df["ablation"] != "base", "run_id"].unique())


def _status(run_dir: Path) -> dict:
    path = run_dir / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def cost_table(df: pd.DataFrame, results: Path) -> pd.DataFrame:
    """Every run's training cost (device-hours measured; FLOPs estimated) beside its best FID."""
    rows = []
    for run_id, g in df.groupby("run_id", sort=False):
        run = parse_run_id(run_id)
        stats = load_stats(results / "runs" / run_id)
        kimg = float(stats["kimg"].iloc[-1]) if len(stats) else float("nan")
        seconds = float((stats["sec_per_kimg"] * stats["kimg"].diff().fillna(stats["kimg"])).sum()) if len(stats) else 0
        params = g["params_m"].iloc[0] * 1e6
        flops = _forward_flops_per_image(results / "runs" / run_id, params) * PASSES_PER_IMAGE[run.method] * kimg * 1e3
        rows.append({"run": run_id, "params (M)": f"{params / 1e6:.2f}", "kimg": f"{kimg:.1f}",
                     "device-hours": f"{seconds / 3600:.4f}", "train FLOPs (est.)": f"{flops:.2e}",
                     "best FID": _fmt(g["fid"].min()), "at NFE": int(g.loc[g["fid"].idxmin(), "nfe"])})
    return pd.DataFrame(rows)


def _forward_flops_per_image(run_dir: Path, params: float) -> float:
    """Forward FLOPs of one image, counted with torch's FlopCounterMode on the run's network."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from scm import config as C
    from scm.networks import build_network

    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        return 2 * params
    cfg = C.from_dict(json.loads(cfg_path.read_text()))
    net = build_network(cfg.network, cfg.data, cfg.sigma_d).eval()
    x = torch.zeros(1, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.full((1,), 0.5))
    return float(counter.get_total_flops())


def write_table(df: pd.DataFrame, md: Path, tex: Path | None, title: str) -> None:
    md.parent.mkdir(parents=True, exist_ok=True)
    body = df.to_markdown(index=False) if len(df) else "(no rows)"
    md.write_text(f"# {title}\n\n{body}\n")
    if tex is not None:
        tex.write_text(df.to_latex(index=False, caption=title, escape=True) if len(df) else "% no rows\n")


# ----------------------------------------------------------------------------
# Figures.


def _scatter_compute(ax, data: pd.DataFrame, label_col: str, marker: str, alpha: float = 1.0) -> None:
    for name, g in data.groupby(label_col, sort=False):
        g = g.sort_values("compute")
        ax.plot(g["compute"], g["fid"], marker=marker, linestyle="-" if len(g) > 1 else "", label=name, alpha=alpha)


def figure1_paper(ref: pd.DataFrame, path: Path) -> None:
    """Figure 1 from the paper's Table 2 alone: effective sampling compute vs FID, ImageNet 512x512."""
    d = ref[(ref["dataset"] == "imagenet512") & ref["params_m"].notna()].copy()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ladder = d["size"].notna()  # methods with a size ladder are curves; the others single points
    for (model, nfe), g in d[ladder].groupby(["model", "nfe"], sort=False):
        g = g.sort_values("compute")
        ax.plot(g["compute"], g["fid"], marker="o", label=f"{model}, {nfe} NFE")
    base = d[~ladder]
    ax.scatter(base["compute"], base["fid"], marker="x", color="gray", label="other methods")
    for _, r in base.iterrows():
        ax.annotate(r["model"], (r["compute"], r["fid"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="effective sampling compute (billion params x NFE)", ylabel="FID",
           title="ImageNet 512x512 (paper, Table 2)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def compute_vs_fid(df: pd.DataFrame, ref: pd.DataFrame | None, dataset: str, path: Path) -> None:
    d = df[df["ablation"] == "base"].copy()
    d["curve"] = d["method"].map(METHOD_NAMES) + ", " + d["nfe"].astype(str) + " NFE"
    d = d.groupby(["curve", "size"], as_index=False, sort=False).agg(compute=("compute", "first"), fid=("fid", "min"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _scatter_compute(ax, d, "curve", "o")
    if ref is not None and dataset in PAPER_DATASETS:
        p = ref[(ref["dataset"] == dataset) & ref["params_m"].notna()].copy()
        p["curve"] = "paper: " + p["model"] + ", " + p["nfe"].astype(str) + " NFE"
        _scatter_compute(ax, p, "curve", "x", alpha=0.6)
    ax.set(xscale="log", xlabel="effective sampling compute (billion params x NFE)", ylabel="FID",
           title=f"{dataset}: sampling compute vs FID")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fid_vs_size(df: pd.DataFrame, path: Path) -> None:
    d = df[df["ablation"] == "base"].copy()
    d["curve"] = d["method"].map(METHOD_NAMES) + ", " + d["steps"].astype(str) + " step(s)"
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=d, x="params_m", y="fid", hue="curve", marker="o", ax=ax, errorbar=None)
    ax.set(xscale="log", xlabel="parameters (M)", ylabel="FID", title="FID vs model size")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def ablation_curves(df: pd.DataFrame, results: Path, path: Path) -> None:
    frames = []
    for run_id in _ablation_run_ids(df):
        s = load_stats(results / "runs" / run_id)
        if len(s):
            run = parse_run_id(run_id)
            frames.append(s.assign(ablation="full recipe" if run.ablation == "full" else run.ablation, seed=run.seed))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if frames:
        d = pd.concat(frames, ignore_index=True)
        sns.lineplot(data=d, x="kimg", y="loss", hue="ablation", ax=axes[0], errorbar=None, linewidth=1)
        sns.lineplot(data=d, x="kimg", y="grad_norm", hue="ablation", ax=axes[1], errorbar=None, linewidth=1,
                     legend=False)
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=6, ncol=2)
    axes[0].set_title("training loss")
    axes[1].set_title("gradient norm")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def sample_montage(grids: list[Path], path: Path) -> None:
    grids = [g for g in grids if Path(g).exists()]
    cols = min(3, max(1, len(grids)))
    rows = max(1, math.ceil(len(grids) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, g in zip(axes.flat, grids):
        ax.imshow(plt.imread(g))
        ax.set_title(Path(g).parent.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------


def build_report(metrics: list[str | Path], results: str | Path, dataset: str,
                 reference: str | Path | None = None) -> list[Path]:
    """Write every table and figure; returns the paths written."""
    results = Path(results)
    tables, figures = results / "tables", results / "figures"
    tables.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    df = load_metrics(metrics)
    ref = load_reference(reference) if reference else None
    paper_note = " (paper in parentheses)" if dataset in PAPER_DATASETS else ""
    write_table(main_table(df, ref, dataset), tables / "main.md", tables / "main.tex",
                f"{dataset}: FID by method, NFE and size{paper_note}")
    write_table(ablation_table(df, results), tables / "ablations.md", tables / "ablations.tex",
                f"{dataset}: ablations (mean ± sd over seeds)")
    write_table(cost_table(df, results), tables / "cost.md", None, f"{dataset}: training cost and FID per run")
    if ref is not None:
        figure1_paper(ref, figures / "figure1_paper.png")
    compute_vs_fid(df, ref, dataset, figures / "compute_vs_fid.png")
    fid_vs_size(df, figures / "fid_vs_size.png")
    ablation_curves(df, results, figures / "ablation_curves.png")
    grids = [results / "samples" / r / "grid.png" for r in df[df["ablation"] == "base"]["run_id"].unique()]
    sample_montage(grids, figures / "samples.png")
    return sorted(tables.iterdir()) + sorted(figures.iterdir())
