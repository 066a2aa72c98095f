"""The study report: the paper's tables and figures regenerated from our runs (and the paper's numbers).

Inputs: metrics JSON files (scm evaluate), each run's stats.jsonl / run.json, sample grids, and the
paper's numbers (resources/paper-tables.csv). Outputs under RESULTS/tables and RESULTS/figures.
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

from scm.seedstats import mean_interval, paired_difference  # noqa: E402
from scm.study import parse_run_id  # noqa: E402

log = logging.getLogger(__name__)

METHOD_NAMES = {"teacher": "TrigFlow teacher", "sct": "sCT", "scd": "sCD"}
PAPER_DATASETS = {"cifar10", "imagenet64", "imagenet512"}
# Passes of the network per training image, in forward-pass units: forward + backward (2x) for the
# teacher; + the tangent pass for sCT; + the teacher's forward for sCD (our estimate, README).
PASSES_PER_IMAGE = {"teacher": 3, "sct": 4, "scd": 5}


# ----------------------------------------------------------------------------
# Loading.


def _scalar(m: dict, key: str) -> float:
    """A metric as one number: its mean over seed sets where given (key_mean), else the value itself."""
    v = m.get(f"{key}_mean", m.get(key))
    if isinstance(v, list):
        v = float(np.mean(v)) if v else None
    return float(v) if v is not None else math.nan


def load_metrics(paths: list[str | Path]) -> pd.DataFrame:
    """One row per (run, sampling steps) from `scm evaluate` files.

    fid is the minimum over seed sets (the paper's report); fid_mean its mean (what seed statistics
    use); class_accuracy the mean over seed sets, NaN where the metrics file has none.
    """
    rows = []
    for path in paths:
        entries = json.loads(Path(path).read_text())
        if not isinstance(entries, list):  # scm.evaluate.write_metrics writes a list of flat entries
            raise ValueError(f"{path}: not a metrics file of scm evaluate (expected a JSON list of entries)")
        for m in entries:
            run = parse_run_id(m["run_id"])
            rows.append({
                "run_id": m["run_id"], "method": run.method, "size": run.size, "ablation": run.ablation,
                "seed": run.seed, "steps": int(m["steps"]), "nfe": int(m["nfe"]),
                "params_m": float(m["params"]) / 1e6,
                "fid": float(m["fid_min"]), "fid_mean": _scalar(m, "fid"),
                "fid_sd": float(m.get("fid_sd", 0.0) or 0.0),
                "class_accuracy": _scalar(m, "class_accuracy"),
                # what the evaluation cost (the cost table's eval GPU-/CPU-hours)
                "sample_seconds": m.get("sample_seconds"), "metric_seconds": m.get("metric_seconds"),
                "eval_gpus": m.get("eval_gpus"), "eval_threads": m.get("eval_threads"),
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
    """Table 2's layout: rows method x NFE, columns sizes; 'ours (paper)' where the paper has a number;
    then the samples' class accuracy per size (mean over seed sets) where the metrics files have it."""
    base = df[df["ablation"] == "base"]
    sizes = list(dict.fromkeys(base["size"]))
    with_accuracy = bool(len(base)) and bool(base["class_accuracy"].notna().any())
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
        for size in sizes if with_accuracy else []:
            acc = g.loc[g["size"] == size, "class_accuracy"].mean()
            row[f"{size} class acc"] = f"{acc:.3f}" if math.isfinite(acc) else "-"
        table.append(row)
    return pd.DataFrame(table)


def _status(run_dir: Path) -> dict:
    """status.json as the trainer would see it: a 'running' run whose trainer is gone reads 'dead'."""
    from scm.checkpoint import read_status

    return read_status(run_dir)


# ----------------------------------------------------------------------------
# Ablations: each technique of the paper switched off against the full recipe, same seeds.

# The paper's seven techniques (sCM Sec. 4.1-4.2 and 5.1) and the config keys that switch them; the
# table and figure keep this order. Anything else (discrete time, App. E; attention kernels) is "other".
TECHNIQUES: dict[str, tuple[str, ...]] = {
    "tangent warmup": ("loss.tangent_warmup", "loss.warmup_iters"),
    "c_noise = t": ("network.c_noise",),
    "positional time embedding": ("network.time_embedding", "network.time_embedding_scale"),
    "adaptive double normalization": ("network.adagn",),
    "tangent normalization": ("loss.tangent_norm", "loss.tangent_norm_c"),
    "adaptive weighting": ("loss.adaptive_weighting",),
    "JVP rearrangement": ("loss.jvp_rearrangement",),
    "JVP engine (not a technique of the paper)": ("loss.jvp_impl", "loss.jvp_fd_step"),
}
OTHER = "other"
FULL = "full recipe"
# Keys that differ between the runs of one recipe (seed, its teacher's folder), not between recipes.
_PER_RUN_KEYS = {"run.seed", "run.teacher_run_dir"}
# Which direction is better, per metric column (FID: lower; class accuracy: higher).
_METRICS = {"FID": ("fid_mean", -1), "class acc": ("class_accuracy", +1)}


def run_config(run_dir: Path) -> dict:
    """A run's resolved config as flat dotted keys (run.json from training, else run.yaml); {} if none."""
    from scm.config import flatten, load_yaml

    run_dir = Path(run_dir)
    if (run_dir / "run.json").exists():
        return flatten(json.loads((run_dir / "run.json").read_text()).get("config", {}))
    if (run_dir / "run.yaml").exists():
        return flatten(load_yaml(run_dir / "run.yaml", "run config"))
    return {}


def technique_of(ablation: str, changed: set[str]) -> str:
    """The technique an ablation switches: from the config keys it changes, else from its name."""
    for technique, keys in TECHNIQUES.items():
        if changed & set(keys):
            return technique
    if not changed:  # no configs to compare (runs not on disk): the ablation file's name tells
        for technique, keys in TECHNIQUES.items():
            if any(k.split(".")[-1] in ablation for k in keys[:1]):
                return technique
    return OTHER


def _ablation_grid(df: pd.DataFrame) -> pd.DataFrame:
    """Metrics rows of the ablation grid: the method and size of the full-recipe runs, every ablation."""
    full = df[df["ablation"] == "full"] if len(df) else df
    if not len(full):
        return df.iloc[0:0]
    method, size = full["method"].iloc[0], full["size"].iloc[0]
    return df[(df["method"] == method) & (df["size"] == size) & (df["ablation"] != "base")]


def _variants(grid: pd.DataFrame, results: Path) -> dict[str, str]:
    """{ablation: technique}, the full recipe first, then in TECHNIQUES order, then by name."""
    full_cfg = next((c for r in grid.loc[grid["ablation"] == "full", "run_id"].unique()
                     if (c := run_config(results / "runs" / r))), {})
    out = {}
    for ablation, g in grid.groupby("ablation", sort=True):
        if ablation == "full":
            continue
        cfg = run_config(results / "runs" / g["run_id"].iloc[0])
        changed = {k for k in set(cfg) | set(full_cfg) if k not in _PER_RUN_KEYS and cfg.get(k) != full_cfg.get(k)}
        out[ablation] = technique_of(ablation, changed if cfg and full_cfg else set())
    order = list(TECHNIQUES) + [OTHER]
    return {"full": FULL, **dict(sorted(out.items(), key=lambda kv: (order.index(kv[1]), kv[0])))}


def _verdict(d: dict, sign: int) -> str:
    if not math.isfinite(d["lo"]):
        return "too few seeds"
    if d["lo"] == d["hi"]:  # every seed moved by the same amount (e.g. a coarse metric): no spread to judge by
        return "no seed spread"
    if not d["significant"]:
        return "within noise"
    return "better" if d["diff"] * sign > 0 else "worse"


def ablation_effects(df: pd.DataFrame, results: Path) -> pd.DataFrame:
    """Per (ablation, steps, metric): mean and 95% t-interval over seeds, and the difference to the
    full recipe with a paired 95% interval over the shared seeds (scm.seedstats)."""
    grid = _ablation_grid(df)
    variants = _variants(grid, Path(results)) if len(grid) else {}
    rows = []
    for steps in sorted(grid["steps"].unique()) if len(grid) else []:
        at = grid[grid["steps"] == steps]
        full = at[at["ablation"] == "full"]
        for metric, (col, sign) in _METRICS.items():
            base = dict(zip(full["seed"], full[col]))
            if not any(math.isfinite(v) for v in base.values()):
                continue  # metric not in these metrics files (e.g. no class accuracy)
            for ablation, technique in variants.items():
                values = dict(zip(at.loc[at["ablation"] == ablation, "seed"], at.loc[at["ablation"] == ablation, col]))
                m = mean_interval(list(values.values()))
                row = {"ablation": ablation, "technique": technique, "steps": int(steps), "metric": metric,
                       "n": m["n"], "mean": m["mean"], "sd": m["sd"], "lo": m["lo"], "hi": m["hi"],
                       "diff": math.nan, "diff_lo": math.nan, "diff_hi": math.nan, "p": math.nan,
                       "significant": False, "verdict": ""}
                if ablation != "full":
                    d = paired_difference(values, base)
                    row.update(diff=d["diff"], diff_lo=d["lo"], diff_hi=d["hi"], p=d["p"],
                               significant=d["significant"], verdict=_verdict(d, sign))
                rows.append(row)
    return pd.DataFrame(rows)


def run_stability(run_dir: Path) -> dict:
    """Stability of one run: divergence (status.json), gradient-norm spikes (max over the logged windows'
    maxima / median of the windows' means, stats.jsonl) and the loss variance over the last half."""
    status = _status(Path(run_dir))
    out = {"diverged": status.get("state") == "diverged", "state": status.get("state"), "step": status.get("step"),
           "spike": math.nan, "loss_var": math.nan}
    stats = load_stats(Path(run_dir))
    if len(stats) and "grad_norm" in stats:
        peak = stats["grad_norm_max"] if "grad_norm_max" in stats else stats["grad_norm"]
        median = float(stats["grad_norm"].median())
        out["spike"] = float(peak.max()) / median if median > 0 else math.nan
    if len(stats) and "loss" in stats:
        late = stats[stats["kimg"] >= stats["kimg"].max() / 2] if "kimg" in stats else stats
        out["loss_var"] = float(late["loss"].var(ddof=0))
    return out


def _stability_cells(results: Path, method: str, size: str, ablation: str) -> dict[str, str]:
    """Stability columns of one table row, over every run folder of the ablation (diverged ones included)."""
    dirs = sorted((results / "runs").glob(f"{method}-{size}-{ablation}-s*"))
    runs = {parse_run_id(d.name).seed: run_stability(d) for d in dirs if (d / "status.json").exists()
            or (d / "stats.jsonl").exists()}
    if not runs:
        return {"diverged": "-", "grad spikes (max/median)": "-", "loss var (last half)": "-"}
    # A run that died or failed is named beside the divergences: its numbers are not a finished run's.
    diverged = [f"s{s}@{r['step']}" for s, r in sorted(runs.items()) if r["diverged"]]
    diverged += [f"s{s} {r['state']}" for s, r in sorted(runs.items()) if r["state"] in ("dead", "failed")]
    spikes = [r["spike"] for r in runs.values() if math.isfinite(r["spike"])]
    var = [r["loss_var"] for r in runs.values() if math.isfinite(r["loss_var"])]
    n_diverged = sum(r["diverged"] for r in runs.values())
    return {"diverged": f"{n_diverged}/{len(runs)}" + (f" ({', '.join(diverged)})" if diverged else ""),
            "grad spikes (max/median)": f"{np.mean(spikes):.1f} (worst {max(spikes):.1f})" if spikes else "-",
            "loss var (last half)": f"{np.mean(var):.3g}" if var else "-"}


def _teacher_cell(df: pd.DataFrame, size: str, ablation: str) -> str:
    """sCD: which teacher a row distilled, and that teacher's FID (mean over seed sets, most steps)."""
    own = df[(df["method"] == "teacher") & (df["size"] == size) & (df["ablation"] == ablation)]
    which = "own" if len(own) else "base"
    t = own if len(own) else df[(df["method"] == "teacher") & (df["size"] == size) & (df["ablation"] == "base")]
    if not len(t):
        return which
    t = t[t["steps"] == t["steps"].max()]
    return f"{which} (FID {t['fid_mean'].mean():.2f})"


def _interval_text(mean: float, lo: float, hi: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "-"
    if not math.isfinite(lo):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(hi - lo) / 2:.{digits}f}"


def ablation_table(df: pd.DataFrame, results: Path, steps: int | None = None,
                   stability: bool = True) -> pd.DataFrame:
    """One row per ablation at `steps` (default: the most sampling steps), grouped by technique:
    metric mean ± 95% t-interval over seeds, the paired difference to the full recipe with its 95%
    interval and verdict ('within noise' when it contains 0), stability signals and (sCD) the teacher."""
    results = Path(results)
    effects = ablation_effects(df, results)
    if not len(effects):
        return pd.DataFrame()
    steps = int(effects["steps"].max()) if steps is None else steps
    grid = _ablation_grid(df)
    method, size = grid["method"].iloc[0], grid["size"].iloc[0]
    rows, last_technique = [], None
    for ablation, e in effects[effects["steps"] == steps].groupby("ablation", sort=False):
        technique = e["technique"].iloc[0]
        row = {"technique": technique if technique != last_technique else "",
               "ablation": FULL if ablation == "full" else ablation, "seeds": int(e["n"].max())}
        last_technique = technique
        for _, r in e.iterrows():
            digits = 2 if r["metric"] == "FID" else 3
            row[r["metric"]] = _interval_text(r["mean"], r["lo"], r["hi"], digits)
            if ablation == "full" or not math.isfinite(r["diff"]):
                row[f"Δ{r['metric']} vs full (95% CI)"] = "-"
            elif math.isfinite(r["diff_lo"]):
                row[f"Δ{r['metric']} vs full (95% CI)"] = (f"{r['diff']:+.{digits}f} [{r['diff_lo']:+.{digits}f}, "
                                                         f"{r['diff_hi']:+.{digits}f}] {r['verdict']}")
            else:
                row[f"Δ{r['metric']} vs full (95% CI)"] = f"{r['diff']:+.{digits}f} ({r['verdict']})"
        if stability:
            row.update(_stability_cells(results, method, size, ablation))
            if method == "scd":
                row["teacher"] = _teacher_cell(df, size, ablation)
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_header(df: pd.DataFrame, results: Path) -> str:
    """The budget of the ablation grid, from its runs' configs: method, size, kimg, seeds, precision,
    and how it compares with the main runs; then the full recipe's own spread over seeds."""
    results = Path(results)
    grid = _ablation_grid(df)
    if not len(grid):
        return "No ablation runs."
    method, size = grid["method"].iloc[0], grid["size"].iloc[0]
    seeds = sorted(grid.loc[grid["ablation"] == "full", "seed"].unique())
    cfg = run_config(results / "runs" / f"{method}-{size}-full-s{seeds[0]}")
    parts = [METHOD_NAMES[method], size]
    if cfg:
        kimg, batch = float(cfg["run.total_kimg"]), int(cfg["run.batch_size"])
        parts += [f"{kimg:g} kimg ({round(kimg * 1000 / batch)} iterations at batch {batch})"]
    parts += [f"{len(seeds)} seeds ({', '.join(str(s) for s in seeds)})"]
    if cfg:
        parts += [cfg.get("run.precision", "fp32")]
    text = ", ".join(parts)
    short = []
    main = run_config(results / "runs" / f"{method}-{size}-base-s0")
    if cfg and main:
        short.append(f"the main {METHOD_NAMES[method]} {size} run trains {float(main['run.total_kimg']):g} kimg")
    teacher = run_config(results / "runs" / f"teacher-{size}-base-s0")
    if method == "scd" and teacher:
        short.append(f"its teacher {float(teacher['run.total_kimg']):g} kimg")
    if short:
        text += "; short runs: " + ", ".join(short) + " (compare rows with each other, not with the main table)"
    effects = ablation_effects(df, results)
    full = effects[(effects["ablation"] == "full") & (effects["metric"] == "FID")]
    spread = []
    for _, r in full.iterrows():
        vals = grid[(grid["ablation"] == "full") & (grid["steps"] == r["steps"])]["fid_mean"]
        sd = f", sd {r['sd']:.2f}" if math.isfinite(r["sd"]) else ""
        spread.append(f"{r['steps']}-step FID {_interval_text(r['mean'], r['lo'], r['hi'], 2)}{sd} "
                      f"(range {vals.min():.2f}-{vals.max():.2f})")
    if spread:
        text += ".\n\nThe full recipe's own seeds: " + "; ".join(spread) + "."
    return text


def ablation_notes(df: pd.DataFrame, results: Path) -> list[str]:
    """What a reader needs to read the table: the statistics, and techniques that cannot matter here."""
    results = Path(results)
    grid = _ablation_grid(df)
    notes = ["FID is the mean over evaluation seed sets per run, then mean ± half-width of the 95% t-interval "
             "over training seeds. Δ is the ablation minus the full recipe, paired by training seed (the same "
             "seed shares initialization and data order) with a 95% t-interval; 'within noise' = the interval "
             "contains 0, 'worse'/'better' = it excludes 0 (lower FID, higher class accuracy is better); 'no seed "
             "spread' = every seed moved by exactly the same amount, so the seeds cannot tell signal from noise.",
             "Grad spikes: per run the largest gradient norm over the median of the logged windows' mean norms, "
             "averaged over seeds (worst seed in parentheses); loss var: variance of the logged training loss "
             "over the last half of training, averaged over seeds. Loss scales differ where the ablation changes "
             "the loss (tangent normalization, adaptive weighting)."]
    if not len(grid):
        return notes
    variants = _variants(grid, results)
    configs = [run_config(results / "runs" / r) for r in grid["run_id"].unique()]
    precisions = {c.get("run.precision", "fp32") for c in configs if c}
    devices = sorted({c.get("run.device", "auto") for c in configs if c} - {"auto"})
    on = f" on {', '.join(devices)}" if devices else ""
    if "JVP rearrangement" in variants.values() and precisions <= {"fp32"}:
        notes.append("JVP rearrangement cannot matter here: it keeps the tangent finite in fp16/bf16 near t -> 0 "
                     f"and t -> pi/2 (sCM Sec. 4.1); these runs are fp32{on}, where both forms compute the same "
                     "tangent up to round-off, so any difference is seed noise.")
    if any(a.startswith("attention") for a in variants):
        notes.append("Blockwise attention computes the same function as math attention (online softmax, sCM "
                     "Sec. 5.1): it changes memory, not quality, so its row measures round-off only.")
    if grid["method"].iloc[0] == "scd":
        notes.append("sCD: ablations that change the network function (c_noise, time embedding, AdaGN) distill "
                     "their own teacher, trained like the base teacher with only that change (the CM starts from "
                     "its teacher's weights, sCM Sec. 5); the teacher column gives that teacher's FID.")
    return notes


def write_ablation_tables(df: pd.DataFrame, results: Path, md: Path, tex: Path | None, title: str) -> None:
    """ablations.md: the budget header, one table per number of sampling steps (stability in the first,
    the most steps), the notes; ablations.tex: the same tables."""
    results = Path(results)
    md.parent.mkdir(parents=True, exist_ok=True)
    effects = ablation_effects(df, results)
    steps = sorted(effects["steps"].unique(), reverse=True) if len(effects) else []
    tables = [(int(s), ablation_table(df, results, int(s), stability=(i == 0))) for i, s in enumerate(steps)]
    text = [f"# {title}", "", ablation_header(df, results), ""]
    for s, table in tables:
        text += [f"## {s}-step sampling", "", table.to_markdown(index=False, disable_numparse=True), ""]
    if not tables:
        text += ["(no rows)", ""]
    text += ["## Notes", ""] + [f"- {n}" for n in ablation_notes(df, results)]
    md.write_text("\n".join(text) + "\n")
    if tex is not None:
        body = [t.to_latex(index=False, caption=f"{title}, {s}-step sampling", escape=True) for s, t in tables]
        tex.write_text("\n".join(body) if body else "% no rows\n")


def eval_hours(g: pd.DataFrame) -> tuple[float | None, float | None]:
    """(GPU-hours, CPU-hours) of a run's evaluations (its metrics rows): the seconds its tasks ran (sampling,
    features and metrics, summed over shards) x the GPUs each held, or on the CPU x its torch threads."""
    gpu = cpu = None
    for _, e in g.iterrows():
        seconds = float(e.get("sample_seconds") or 0) + float(e.get("metric_seconds") or 0)
        gpus = int(e["eval_gpus"]) if "eval_gpus" in e and pd.notna(e["eval_gpus"]) else 0
        threads = int(e["eval_threads"]) if "eval_threads" in e and pd.notna(e["eval_threads"]) else 1
        if gpus:
            gpu = (gpu or 0.0) + seconds * gpus / 3600
        else:
            cpu = (cpu or 0.0) + seconds * threads / 3600
    return gpu, cpu


def cost_table(df: pd.DataFrame, results: Path) -> pd.DataFrame:
    """Every run's training cost (device-hours measured; FLOPs estimated) and evaluation cost (GPU-hours, or
    CPU-hours for CPU evaluations) beside its best FID."""
    rows = []
    for run_id, g in df.groupby("run_id", sort=False):
        run = parse_run_id(run_id)
        stats = load_stats(results / "runs" / run_id)
        kimg = float(stats["kimg"].iloc[-1]) if len(stats) else float("nan")
        seconds = float((stats["sec_per_kimg"] * stats["kimg"].diff().fillna(stats["kimg"])).sum()) if len(stats) else 0
        params = g["params_m"].iloc[0] * 1e6
        flops = _forward_flops_per_image(results / "runs" / run_id, params) * PASSES_PER_IMAGE[run.method] * kimg * 1e3
        gpu_h, cpu_h = eval_hours(g)
        rows.append({"run": run_id, "params (M)": f"{params / 1e6:.2f}", "kimg": f"{kimg:.1f}",
                     "device-hours": f"{seconds / 3600:.4f}", "train FLOPs (est.)": f"{flops:.2e}",
                     "eval GPU-hours": "-" if gpu_h is None else f"{gpu_h:.4f}",
                     "eval CPU-hours": "-" if cpu_h is None else f"{cpu_h:.4f}",
                     "best FID": _fmt(g["fid"].min()), "at NFE": int(g.loc[g["fid"].idxmin(), "nfe"])})
    return pd.DataFrame(rows)


def _forward_flops_per_image(run_dir: Path, params: float) -> float:
    """Forward FLOPs of one image, counted with torch's FlopCounterMode on the run's network."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from scm.config import from_dict
    from scm.networks import build_network

    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        return 2 * params
    cfg = from_dict(json.loads(cfg_path.read_text()))
    net = build_network(cfg.network, cfg.data, cfg.sigma_d).eval()
    x = torch.zeros(1, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.full((1,), 0.5))
    return float(counter.get_total_flops())


def write_table(df: pd.DataFrame, md: Path, tex: Path | None, title: str) -> None:
    md.parent.mkdir(parents=True, exist_ok=True)
    body = df.to_markdown(index=False, disable_numparse=True) if len(df) else "(no rows)"
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


def _band(ax, stats: list[pd.DataFrame], key: str, color, label: str) -> None:
    """Mean over seeds as a line, min..max over seeds as a band (the seeds log at the same kimg)."""
    d = pd.concat([s[["kimg", key]] for s in stats if key in s], ignore_index=True)
    if not len(d):
        return
    g = d.groupby("kimg")[key].agg(["mean", "min", "max"]).reset_index()
    ax.plot(g["kimg"], g["mean"], color=color, linewidth=1.2, label=label)
    ax.fill_between(g["kimg"], g["min"], g["max"], color=color, alpha=0.2, linewidth=0)


def ablation_curves(df: pd.DataFrame, results: Path, path: Path) -> list[str]:
    """Small multiples: one column per technique, its ablations against the full recipe (black);
    training loss (top) and gradient norm (bottom), mean over seeds with a min..max band.
    Returns the techniques, one per column."""
    results = Path(results)
    grid = _ablation_grid(df)
    variants = _variants(grid, results) if len(grid) else {}
    stats = {a: [s for r in grid.loc[grid["ablation"] == a, "run_id"].unique()
                 if len(s := load_stats(results / "runs" / r))] for a in variants}
    techniques = list(dict.fromkeys(t for a, t in variants.items() if a != "full"))
    cols = max(1, len(techniques))
    fig, axes = plt.subplots(2, cols, figsize=(2.9 * cols + 0.6, 5.4), sharex=True, squeeze=False)
    for col, technique in enumerate(techniques):
        mine = [a for a, t in variants.items() if t == technique]
        for row, (key, ylabel) in enumerate((("loss", "training loss"), ("grad_norm", "gradient norm"))):
            ax = axes[row][col]
            _band(ax, stats.get("full", []), key, "black", FULL)
            for i, ablation in enumerate(mine):
                _band(ax, stats.get(ablation, []), key, f"C{i}", ablation)
            if row == 0:
                ax.set_title(technique, fontsize=9)
                ax.legend(fontsize=6, loc="upper right")
            else:
                ax.set_yscale("log")
                ax.set_xlabel("kimg", fontsize=8)
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(which="both", labelsize=7)
    if not techniques:
        axes[0][0].text(0.5, 0.5, "no ablation runs", ha="center", va="center")
    fig.suptitle("Ablations against the full recipe (black): mean over seeds, band = min..max", fontsize=10)
    fig.subplots_adjust(left=0.9 / fig.get_figwidth(), right=0.99, top=0.88, bottom=0.1, wspace=0.3, hspace=0.12)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return techniques


def ablation_effects_figure(df: pd.DataFrame, results: Path, path: Path) -> None:
    """The table at a glance: each ablation's paired difference to the full recipe with its 95%
    interval, grouped by technique; grey = within noise, red = worse, green = better."""
    effects = ablation_effects(df, results)
    effects = effects[effects["ablation"] != "full"] if len(effects) else effects
    steps = int(effects["steps"].max()) if len(effects) else None
    metrics = list(dict.fromkeys(effects["metric"])) if len(effects) else ["FID"]
    n_rows = int(effects["ablation"].nunique()) if len(effects) else 1
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics) + 2, 0.35 * max(4, n_rows) + 1.5),
                             squeeze=False)
    colors = {"within noise": "0.5", "worse": "tab:red", "better": "tab:green"}  # else light grey
    for ax, metric in zip(axes[0], metrics):
        e = effects[(effects["metric"] == metric) & (effects["steps"] == steps)] if len(effects) else effects
        labels, y, last = [], 0.0, None
        for _, r in e.iterrows():
            if last is not None and r["technique"] != last:
                y += 0.6  # a gap between techniques
            last = r["technique"]
            lo = r["diff_lo"] if math.isfinite(r["diff_lo"]) else r["diff"]
            hi = r["diff_hi"] if math.isfinite(r["diff_hi"]) else r["diff"]
            ax.errorbar(r["diff"], -y, xerr=[[r["diff"] - lo], [hi - r["diff"]]], fmt="o", capsize=3,
                        color=colors.get(r["verdict"], "0.75"))
            labels.append((-y, f"{r['technique']}: {r['ablation']}"))
            y += 1
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks([p for p, _ in labels], [t for _, t in labels], fontsize=7)
        better = "lower is better" if metric == "FID" else "higher is better"
        ax.set_xlabel(f"Δ{metric} vs full recipe, {steps}-step\n({better}; 95% paired CI over seeds)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        if not labels:
            ax.text(0.5, 0.5, "no ablation runs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_montage(df: pd.DataFrame, results: Path, path: Path) -> list[str]:
    """Each main run's sample grid beside its numbers (rows: methods, columns: sizes), so that a reader
    sees what a FID and a class accuracy look like. Numbers at the run's most sampling steps, the
    step count its grid is drawn with (the pipeline's `samples` rule samples the last evaluated).
    Returns the panels' titles."""
    results = Path(results)
    base = df[df["ablation"] == "base"]
    methods = [m for m in ("teacher", "scd", "sct") if m in set(base["method"])]  # teacher, then its students
    sizes = list(dict.fromkeys(base["size"]))
    fig, axes = plt.subplots(max(1, len(methods)), max(1, len(sizes)),
                             figsize=(3.6 * max(1, len(sizes)), 4.1 * max(1, len(methods))), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    titles = []
    for i, method in enumerate(methods):
        for j, size in enumerate(sizes):
            runs = base[(base["method"] == method) & (base["size"] == size)]
            if not len(runs):
                continue
            run_id = runs["run_id"].iloc[0]
            r = runs[(runs["run_id"] == run_id) & (runs["steps"] == runs["steps"].max())].iloc[0]
            grid = results / "samples" / run_id / "grid.png"
            if grid.exists():
                axes[i][j].imshow(plt.imread(grid))
            acc = f", class acc {r['class_accuracy']:.2f}" if math.isfinite(r["class_accuracy"]) else ""
            titles.append(f"{METHOD_NAMES[method]} {size}, {r['steps']} step(s) (NFE {r['nfe']})\n"
                          f"FID {r['fid']:.2f}{acc}")  # the main table's FID (min over seed sets)
            axes[i][j].set_title(titles[-1], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return titles


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
    write_ablation_tables(df, results, tables / "ablations.md", tables / "ablations.tex", f"{dataset}: ablations")
    write_table(cost_table(df, results), tables / "cost.md", None,
                f"{dataset}: training and evaluation cost and FID per run")
    if ref is not None:
        figure1_paper(ref, figures / "figure1_paper.png")
    compute_vs_fid(df, ref, dataset, figures / "compute_vs_fid.png")
    fid_vs_size(df, figures / "fid_vs_size.png")
    ablation_curves(df, results, figures / "ablation_curves.png")
    ablation_effects_figure(df, results, figures / "ablation_effects.png")
    sample_montage(df, results, figures / "samples.png")
    return sorted(tables.iterdir()) + sorted(figures.iterdir())
