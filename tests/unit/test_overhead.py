"""The pipeline-overhead breakdown (scm.bench.overhead) on a synthetic results folder with known times."""

import json

import pytest

from scm.bench.overhead import breakdown, training_seconds
from scm.cli import main

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(path, seconds):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:00\t1\t1\t1\t1\t0\t0\t0\t{seconds}\n")


def _results(tmp_path):
    res = tmp_path / "results"
    # a run that logged 3 windows: 0.5 kimg at 20 s/kimg, 0.5 at 30, 1.0 at 10 -> 10 + 15 + 10 = 35 s of steps
    run = res / "runs" / "teacher-tS-base-s0"
    run.mkdir(parents=True)
    rows = [{"step": 1, "kimg": 0.5, "sec_per_kimg": 20.0}, {"step": 2, "kimg": 1.0, "sec_per_kimg": 30.0},
            {"step": 4, "kimg": 2.0, "sec_per_kimg": 10.0}]
    (run / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _bench(res / "benchmarks" / "train" / "teacher-tS-base-s0.tsv", 40.0)
    # its evaluation: two entries, 3 + 1 and 2 + 2 seconds of work
    (res / "metrics").mkdir()
    (res / "metrics" / "teacher-tS-base-s0.json").write_text(json.dumps(
        [{"sample_seconds": 3.0, "metric_seconds": 1.0}, {"sample_seconds": 2.0, "metric_seconds": 2.0}]))
    _bench(res / "benchmarks" / "evaluate" / "teacher-tS-base-s0.tsv", 12.0)
    # a config job: all overhead
    _bench(res / "benchmarks" / "run_config" / "teacher-tS-base-s0.tsv", 0.5)
    return res


def test_a_job_of_n_threads_holds_n_cores(tmp_path):
    path = tmp_path / "results" / "benchmarks" / "sweeps" / "s.tsv"
    path.parent.mkdir(parents=True)
    extended = HEADER.rstrip("\n") + "\tjobid\trule_name\tthreads\n"
    path.write_text(extended + "10.0\t0:00:10\t1\t1\t1\t1\t0\t0\t0\t9\t1\tsweep\t2\n")
    assert breakdown(tmp_path / "results", wall_s=10.0, cores=2)["rules"][0]["job_s"] == pytest.approx(20.0)


def test_breakdown_splits_the_wall_into_work_job_overhead_and_idle(tmp_path):
    res = _results(tmp_path)
    assert training_seconds(res / "runs" / "teacher-tS-base-s0") == pytest.approx(35.0)
    b = breakdown(res, wall_s=30.0, cores=2)
    rules = {r["rule"]: r for r in b["rules"]}
    assert rules["train"]["work_s"] == pytest.approx(35.0) and rules["train"]["overhead_s"] == pytest.approx(5.0)
    assert rules["evaluate"]["work_s"] == pytest.approx(8.0) and rules["run_config"]["work_s"] == 0.0
    assert b["work_core_s"] == pytest.approx(43.0)
    assert b["job_overhead_core_s"] == pytest.approx(52.5 - 43.0)
    assert b["idle_core_s"] == pytest.approx(60.0 - 52.5)
    assert b["overhead_share"] == pytest.approx(1 - 43.0 / 60.0)


def test_cli_reads_the_wall_make_run_wrote(tmp_path, capsys):
    res = _results(tmp_path)
    assert main(["bench", "overhead", "--results", str(res)]) == 2
    assert "pipeline-wall.txt" in capsys.readouterr().err
    (res / "benchmarks" / "pipeline-wall.txt").write_text("30 s: wall time of the last complete make run\n")
    assert main(["bench", "overhead", "--results", str(res), "--out", str(tmp_path / "o.json")]) == 0
    assert "overhead: 28.3% of the wall clock" in capsys.readouterr().out
    assert json.loads((tmp_path / "o.json").read_text())["jobs"] == 3


def test_the_extractors_training_and_a_sweeps_scoring_are_work(tmp_path):
    res = tmp_path / "results"
    # the shapes feature network: 30 s of training steps in a 34 s job (its record, as the extractor rule writes it)
    (res / "artifacts").mkdir(parents=True)
    (res / "artifacts" / "shapes-features-data2.json").write_text(json.dumps({"train_seconds": 30.0}))
    _bench(res / "benchmarks" / "extractor" / "data2.tsv", 34.0)
    # a sweep: one trial of 35 s of steps (the run above's windows), scored for 2.5 + 1.5 s (trials.csv)
    sweep = res / "sweeps" / "s"
    (sweep / "trials" / "0").mkdir(parents=True)
    rows = [{"step": 1, "kimg": 0.5, "sec_per_kimg": 20.0}, {"step": 2, "kimg": 1.0, "sec_per_kimg": 30.0},
            {"step": 4, "kimg": 2.0, "sec_per_kimg": 10.0}]
    (sweep / "trials" / "0" / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (sweep / "trials.csv").write_text("number,value,user_attrs_eval_seconds\n0,70.1,2.5\n1,80.2,1.5\n")
    _bench(res / "benchmarks" / "sweeps" / "s.tsv", 45.0)
    rules = {r["rule"]: r for r in breakdown(res, wall_s=50.0, cores=2)["rules"]}
    assert rules["extractor"]["work_s"] == pytest.approx(30.0)
    assert rules["sweeps"]["work_s"] == pytest.approx(35.0 + 4.0)
