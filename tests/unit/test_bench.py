"""Smoke tests of scm.bench and `scm bench ...`: tiny sizes, one repeat, columns and ratios only.

No performance assertions: the numbers themselves are measured by the benchmarks (docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import stat

import pytest

from scm import bench
from scm.cli import main


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fields(cls):
    return [f.name for f in dataclasses.fields(cls)] + ["hardware"]


def test_step_benchmark_rows_ratios_csv_and_plot(tmp_path):
    rows = bench.step_benchmark(["tS"], repeats=1, warmup=0, batches=[2, 3])
    assert [(r.method, r.batch) for r in rows] == [(m, b) for b in (2, 3) for m in ("teacher", "sct", "scd")]
    assert all(r.repeats == 1 and r.min_s <= r.median_s <= r.max_s and r.peak_mem_mb is None for r in rows)
    by = bench.ratios_by_batch(rows)
    assert set(by) == {("tS", 2), ("tS", 3)}
    assert set(by[("tS", 2)]) == {"sCD/teacher", "sCT/teacher"} and by[("tS", 2)]["sCD/teacher"] > 0
    path = bench.write_csv(rows, tmp_path / "step.csv", hw="test machine")
    table = _csv(path)
    assert list(table[0]) == _fields(bench.Timing) and len(table) == 6 and table[0]["hardware"] == "test machine"
    png = bench.plot_timings(rows, tmp_path / "step.png", "step", hw="test machine")
    assert png.stat().st_size > 0


def test_step_peak_memory_in_a_subprocess():
    mib, kind = bench.step_peak_memory("shapes", "tS", "teacher", 2)
    assert mib > 0 and "VmHWM" in kind


def test_jvp_benchmark_and_ratios():
    rows = bench.jvp_benchmark(["tS"], batch=2, repeats=1, warmup=0)
    assert [r.method for r in rows] == list(bench.JVP_METHODS)
    assert set(bench.jvp_ratios(rows)["tS"]) == {"forward_with_tangent/forward", "func.jvp/forward",
                                             "finite_difference/forward"}


def test_attention_benchmark_memory_ratio(tmp_path):
    rows = bench.attention_benchmark([16, 64], heads=1, head_dim=8, block_size=8, repeats=1, warmup=0)
    assert {(r.impl, r.seq) for r in rows} == {(i, n) for i in ("math_forward", "math_jvp", "blockwise_jvp")
                                               for n in (16, 64)}
    n, fused, ratio = bench.attention_memory_ratio(rows)
    assert n == 64 and fused == "blockwise_jvp" and 0 < ratio < 1  # 8 x 8 blocks vs a 64 x 64 matrix
    assert list(_csv(bench.write_csv(rows, tmp_path / "a.csv"))[0]) == _fields(bench.AttentionTiming)
    assert bench.plot_attention(rows, tmp_path / "a.png").exists()


def test_sampling_benchmark_counts_nfe(tmp_path):
    rows = bench.sampling_benchmark("tS", [1, 2], batch=2, repeats=1, warmup=0)
    got = {(r.sampler, r.steps, r.nfe) for r in rows}
    assert got == {("cm", 1, 1), ("cm", 2, 2), ("euler", 1, 1), ("euler", 2, 2), ("dpm2s", 1, 1), ("dpm2s", 2, 3)}
    assert all(r.images_per_s_min <= r.images_per_s <= r.images_per_s_max for r in rows)
    assert bench.plot_sampling(rows, tmp_path / "s.png").exists()


def _script(path, body):
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_dag_benchmark_subtracts_interpreter_start(tmp_path):
    fake = _script(tmp_path / "snakemake", 'case "$1" in --version) echo 9;; *) sleep 0.2;; esac')
    row = bench.dag_benchmark("config/x.yaml", "profiles/p", repeats=2, snakemake=fake, cwd=tmp_path)
    assert row.what == "dag_x" and row.repeats == 2 and 0.1 < row.median_s < 5


def test_dag_benchmark_failure_is_an_error(tmp_path):
    fake = _script(tmp_path / "snakemake", 'case "$1" in --version) echo 9;; *) echo broken >&2; exit 1;; esac')
    with pytest.raises(RuntimeError, match="broken"):
        bench.dag_benchmark("c.yaml", "p", repeats=1, snakemake=fake, cwd=tmp_path)


def test_slurm_latency_skipped_when_cluster_down(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    _script(tmp_path / "bin" / "sinfo", "exit 1")  # a SLURM client whose controller does not answer
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    row = bench.slurm_latency_benchmark(tmp_path / "jobs")
    assert row.median_s is None and "no SLURM controller answers sinfo" in row.note
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "sinfo not on PATH" in bench.slurm_latency_benchmark(tmp_path / "jobs").note
    assert bench.plot_orchestration([row], tmp_path / "o.png").exists()


def test_cli_step_attention_sampling(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "step", "--sizes", "tS", "--batch", "2", "--repeats", "1", "--no-memory",
                 "--out", str(out / "step.csv")]) == 0
    text = capsys.readouterr().out
    assert "sCD/teacher:" in text and "(target <= 1.8)" in text and "sCT/teacher:" in text
    assert (out / "step.png").exists() and len(_csv(out / "step.csv")) == 3
    assert main(["bench", "attention", "--seq", "16", "32", "--heads", "1", "--head-dim", "8", "--block-size", "8",
                 "--repeats", "1", "--out", str(out / "attention.csv")]) == 0
    assert "fused/math peak memory at N=32:" in capsys.readouterr().out
    assert (out / "attention.png").exists()
    assert main(["bench", "sampling", "--nfe", "1", "--batch", "2", "--repeats", "1",
                 "--out", str(out / "sampling.csv")]) == 0
    assert {r["sampler"] for r in _csv(out / "sampling.csv")} == {"cm", "euler", "dpm2s"}


def test_cli_orchestration_with_fake_tools(tmp_path, capsys, monkeypatch):
    fake = _script(tmp_path / "snakemake", "exit 0")
    (tmp_path / "bin").mkdir()
    _script(tmp_path / "bin" / "sinfo", "exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    out = tmp_path / "orc.csv"
    assert main(["bench", "orchestration", "--snakemake", fake, "--repeats", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "imagenet512 DAG:" in text and "(target <= 5)" in text and "skipped" in text
    assert [r["what"] for r in _csv(out)] == ["dag_imagenet512", "slurm_submit_to_start"]
    assert os.path.exists(tmp_path / "orc.png")


def test_thread_layouts_do_the_same_work(tmp_path, capsys):
    """Each layout does mixes x the widest layout's jobs; every row is a positive time of fresh processes."""
    from scm.bench.threads import thread_layouts

    rows = thread_layouts([(2, 1), (1, 2)], size="tS", batch=4, mixes=1, repeats=1)
    assert [r.layout for r in rows] == ["2x1", "1x2"]
    assert all(r.mixes == 2 and r.median_s > 0 and r.mixes_per_s == pytest.approx(2 / r.median_s) for r in rows)
    out = tmp_path / "threads.csv"
    assert main(["bench", "threads", "--layouts", "1x1", "--batch", "4", "--mixes", "1", "--repeats", "1",
                 "--out", str(out)]) == 0
    assert "1x1" in capsys.readouterr().out and out.exists()
    with pytest.raises(SystemExit) as exit_info:  # bad input: one line naming the value, before any work
        main(["bench", "threads", "--layouts", "2by1"])
    assert exit_info.value.code == 2 and "'2by1' is not JxK" in capsys.readouterr().err
