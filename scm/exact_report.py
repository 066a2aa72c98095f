"""Tables and figures of the exact-answer study (scm.exact): the ablation table with seed intervals, the
error-vs-iterations small multiples, and the 2-D picture of the exact ODE map vs the one-step map."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from scm import exact  # noqa: E402
from scm.config import from_dict  # noqa: E402
from scm.seedstats import format_interval, mean_interval, paired_difference  # noqa: E402
from scm.trigflow import consistency_fn  # noqa: E402

log = logging.getLogger(__name__)

ROW_TITLES = {"scd_exact": "sCD, exact teacher", "scd_learned": "sCD, learned teacher", "sct": "sCT"}
# (key in a run's metrics, column title); lower is better for every one of them
METRICS = [("err_T", "one-step error at T"), ("sw_2step", "SW 2-step"), ("tv_2step", "coverage TV 2-step")]


def load_results(paths: list[str | Path]) -> dict[tuple[str, str], dict]:
    """{(row, technique): job result} from the files of `scm exact train` (a group's file holds several jobs)."""
    out = {}
    for path in paths:
        res = json.loads(Path(path).read_text())
        for job in res.get("jobs", [res]):
            out[(job["row"], job["technique"])] = job
    return out


def _per_seed(res: dict, key: str, t_index: int | None = None) -> dict[int, float]:
    if t_index is not None:  # the one-step error at res["times"][t_index]
        return {r["seed"]: r["metrics"]["err"][t_index] for r in res["runs"]}
    return {r["seed"]: r["metrics"][key] for r in res["runs"]}


def _cell(values: dict[int, float]) -> str:
    m = mean_interval(list(values.values()))
    if not math.isfinite(m["lo"]):
        return f"{m['mean']:.3g}"
    return f"{m['mean']:.3g} ± {(m['hi'] - m['lo']) / 2:.2g}"


def summary_rows(results: dict[tuple[str, str], dict], spec: dict) -> list[dict[str, Any]]:
    """One row per (row, technique): mean and t-interval per metric; ablations: the paired difference
    to the full recipe (same seeds) and whether its interval excludes 0 ('outside the seeds' noise')."""
    rows = []
    base = results.get(("scd_exact", "full"))
    for (row, technique), res in results.items():
        entry = {"row": row, "technique": technique, "n": len(res["runs"]), "cells": {}, "diffs": {}}
        times = res["times"]
        for key, _ in METRICS:
            entry["cells"][key] = _per_seed(res, key)
        for i in range(1, len(times)):
            entry["cells"][f"err@{times[i]:.3g}"] = _per_seed(res, "", i)
        if row == "scd_exact" and technique != "full" and base is not None:
            for key, _ in METRICS:
                entry["diffs"][key] = paired_difference(_per_seed(res, key), _per_seed(base, key))
        rows.append(entry)
    order = {r: i for i, r in enumerate(ROW_TITLES)}
    rows.sort(key=lambda e: (e["technique"] != "full", order.get(e["row"], 9), e["technique"]))
    return rows


def table_markdown(rows: list[dict], spec: dict, floors: dict) -> str:
    first = rows[0]["cells"] if rows else {}
    t_cols = [k for k in first if k.startswith("err@")]
    head = (["run", "seeds"] + [title for _, title in METRICS] + [f"error at t={k[4:]}" for k in t_cols]
            + [f"Δ {title} vs full [95% CI]" for _, title in METRICS] + ["outside the noise?"])
    lines = [f"# {spec.get('study', 'gmm')}: exact-answer study (mean ± 95% t-interval half-width over seeds)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in rows:
        name = ROW_TITLES[e["row"]] if e["technique"] == "full" else f"{e['technique']} (sCD, exact teacher)"
        if e["technique"] == "full" and e["row"] == "scd_exact":
            name += " = full recipe"
        cells = [name, str(e["n"])] + [_cell(e["cells"][k]) for k, _ in METRICS]
        cells += [_cell(e["cells"][k]) for k in t_cols]
        if e["diffs"]:
            d = e["diffs"]
            cells += [format_interval(d[k]) for k, _ in METRICS]
            verdict = [f"{title}: {'yes, worse' if d[k]['diff'] > 0 else 'yes, better'}"
                       for k, title in METRICS if d[k]["significant"]]
            cells.append("; ".join(verdict) or "no")
        else:
            cells += [""] * (len(METRICS) + 1)
        lines.append("| " + " | ".join(cells) + " |")
    for name, reason in (spec.get("skip") or {}).items():
        lines.append(f"| {name} | skipped: {reason} |" + " |" * (len(head) - 2))
    lines += ["", "References (the same fixed noises): "
              f"one Euler step of the exact ODE from T to 0: one-step error {floors['err_euler']:.3g}; "
              f"identity map: {floors['err_identity']:.3g}; the data mean for every noise (a CM at init): "
              f"{floors.get('err_mean', float('nan')):.3g}; exact consistency function: 0. "
              f"SW floor (two sets of true samples): {floors['sw_floor']:.3g}; "
              f"coverage TV floor: {floors['tv_floor']:.3g}.", "",
              "Δ: paired over seeds (same seed = same init, data order and noise); 'outside the noise' = the "
              "95% interval of the difference excludes 0 (no correction for the number of techniques)."]
    return "\n".join(lines) + "\n"


def curves_figure(results: dict[tuple[str, str], dict], path: Path) -> Path:
    """Error at T vs training iterations, one panel per technique, mean line and min-max shading over
    seeds; the full recipe in grey in every ablation panel."""
    keys = sorted(results, key=lambda k: (k[1] != "full", k[0] if k[1] == "full" else "", k[1]))
    n = len(keys)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharex=True, sharey=True, squeeze=False)

    def band(res):
        curves = [r["curve"] for r in res["runs"] if r["curve"]]
        if not curves:
            return None
        steps = [c["step"] for c in curves[0]]
        m = min(len(c) for c in curves)
        errs = torch.tensor([[c[i]["err"][0] for i in range(m)] for c in curves], dtype=torch.float64)
        return steps[:m], errs.mean(0), errs.min(0).values, errs.max(0).values

    base = band(results[("scd_exact", "full")]) if ("scd_exact", "full") in results else None
    for ax, key in zip(axes.flat, keys):
        b = band(results[key])
        if key[1] != "full" and base is not None:
            ax.plot(base[0], base[1], color="0.6", lw=1, label="full recipe")
        if b is not None:
            ax.plot(b[0], b[1], color="C0", lw=1.5)
            ax.fill_between(b[0], b[2], b[3], color="C0", alpha=0.25)
        ax.set_title(ROW_TITLES[key[0]] if key[1] == "full" else key[1], fontsize=8)
        ax.tick_params(labelsize=7)
    # a common scale set by where the runs start: a run that blows up leaves the panel at the top
    starts = [b[1][0] for b in map(band, results.values()) if b is not None]
    if starts:
        axes.flat[0].set_ylim(0, 1.15 * max(starts))
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.supxlabel("training iterations", fontsize=8)
    fig.supylabel("one-step error at T (EMA)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_exact_report(spec: dict, metrics: list[str], ref: dict, out: str | Path) -> list[Path]:
    """tables/exact.md, tables/exact.json (the summary) and figures/exact_curves.png under `out`."""
    out = Path(out)
    results = load_results(metrics)
    rows = summary_rows(results, spec)
    md = out / "tables" / "exact.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(table_markdown(rows, spec, ref["floors"]))
    summary = [{"row": e["row"], "technique": e["technique"],
                "mean": {k: mean_interval(list(v.values())) for k, v in e["cells"].items()},
                "diff_vs_full": e["diffs"]} for e in rows]
    js = out / "tables" / "exact.json"
    js.write_text(json.dumps({"floors": ref["floors"], "rows": summary, "skip": spec.get("skip") or {}}, indent=1))
    fig = curves_figure(results, out / "figures" / "exact_curves.png")
    return [md, js, fig]


# ----------------------------------------------------------------------------
# The 2-D variant: the exact ODE map vs the one-step map of a trained sCD student.


def map2d(spec: dict, out: str | Path) -> list[Path]:
    """Train the 2-D run (resumable), then draw noise -> Phi (exact) and noise -> f_theta (one step)."""
    from scm.train import load_final, train

    cfg = from_dict(spec["config"])
    mixture = exact.mixture_of(cfg)
    train(cfg, spec["run_dir"], on_config_change="restart")
    net, _ = load_final(spec["run_dir"], "ema")
    T = exact.t_max(cfg.sigma_d, cfg.sampler.sigma_max)
    g = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    n = int(spec.get("points", 300))
    x_T = cfg.sigma_d * torch.randn(n, 2, generator=g, dtype=torch.float64)
    phi = mixture.consistency(x_T, torch.full((n,), T, dtype=torch.float64), int(spec.get("ode_steps", 400)))
    with torch.no_grad():
        x_in = x_T.float().reshape(n, 2, 1, 1)
        tt = torch.full((n,), T)
        f = consistency_fn(x_in, tt, net(x_in / cfg.sigma_d, tt, None, None), cfg.sigma_d)
    f = f.double().reshape(n, 2)
    err = exact.mean_error(f, phi)
    data = mixture.sample(2000, generator=g)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    for ax, target, title in ((axes[0], phi, "exact PF-ODE map x_T -> Phi(x_T)"),
                              (axes[1], f, "one-step map x_T -> f_theta(x_T, T)")):
        ax.scatter(data[:, 0], data[:, 1], s=2, color="0.8")
        ax.quiver(x_T[:, 0], x_T[:, 1], target[:, 0] - x_T[:, 0], target[:, 1] - x_T[:, 1], angles="xy",
                  scale_units="xy", scale=1, width=0.002, alpha=0.5, color="C0")
        ax.set_title(title, fontsize=9)
    axes[2].scatter(data[:, 0], data[:, 1], s=2, color="0.8")
    for i in range(n):
        axes[2].plot([phi[i, 0], f[i, 0]], [phi[i, 1], f[i, 1]], color="C3", lw=0.5, alpha=0.6)
    axes[2].scatter(phi[:, 0], phi[:, 1], s=5, color="C0", label="Phi (exact)")
    axes[2].scatter(f[:, 0], f[:, 1], s=5, color="C1", label="f_theta (one step)")
    axes[2].legend(fontsize=7)
    axes[2].set_title(f"paired endpoints, mean error {err:.3f}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]
