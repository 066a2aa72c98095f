"""Sweeps (scm.sweep): the study file, concurrent workers on one storage, crash/restart, divergence, outputs.

Cheap objectives (a quadratic of the params) run through the same worker entry point as training, so
these tests take seconds; the training objective has its own test in tests/integration/test_sweep.py.
"""

import glob
import math
import multiprocessing
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from scm import sweep, sweep_spec
from scm.config import ConfigError, config_hash, flatten, resolve
from scm.train import DivergedError

ROOT = Path(__file__).resolve().parents[2]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def cheap_spec(n_trials=6, name="cheap", **over) -> sweep_spec.SweepSpec:
    raw = {"base": {"dataset": "shapes", "size": "tS", "method": "sct"},
           "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
                     "loss.P_mean": {"type": "float", "low": -2.0, "high": 0.0}},
           "n_trials": n_trials, "sampler": {"name": "tpe", "seed": 0, "options": {"n_startup_trials": 3}},
           "pruner": {"name": "none"}, **over}
    return sweep_spec.parse_spec(raw, name=name)


# ----------------------------------------------------------------------------
# Objectives for the workers (top level: pickled by reference into worker processes).


class Quadratic:
    """(log10 lr + 2)^2 + (P_mean + 1)^2; each call appends 'pid number' to `log_dir`/calls.txt."""

    def __init__(self, log_dir, sleep=0.0, hang_on=None):
        self.log_dir, self.sleep, self.hang_on = str(log_dir), sleep, hang_on

    def __call__(self, trial):
        p = sweep_spec.suggest(trial, SPACE)
        with open(os.path.join(self.log_dir, "calls.txt"), "a") as f:
            f.write(f"{os.getpid()} {trial.number}\n")
        if trial.number == self.hang_on:  # the crash drill: stay RUNNING until killed
            Path(self.log_dir, "hanging").write_text(str(trial.number))
            time.sleep(600)
        time.sleep(self.sleep)
        return (math.log10(p["optim.lr"]) + 2) ** 2 + (p["loss.P_mean"] + 1) ** 2


SPACE = cheap_spec().space


class Troubled(Quadratic):
    """Trial 1 diverges, trial 2 returns NaN, the others are quadratic."""

    def __call__(self, trial):
        if trial.number == 1:
            raise DivergedError("non-finite loss or gradient at step 7")
        if trial.number == 2:
            sweep_spec.suggest(trial, SPACE)
            return float("nan")
        return super().__call__(trial)


def calls(log_dir) -> list[tuple[int, int]]:
    path = Path(log_dir) / "calls.txt"
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()] if path.exists() else []


def study_of(spec, out):
    return optuna.load_study(study_name=spec.name, storage=sweep.make_storage(sweep.resolve_storage(spec, out), spec))


# ----------------------------------------------------------------------------
# The study file.


def test_default_study_file_resolves():
    spec = sweep_spec.load_spec(ROOT / "config/sweeps/shapes.yaml")
    assert spec.name == "shapes" and spec.n_trials >= 4 and spec.base.method in ("sct", "scd")
    cfg = sweep_spec.base_config(spec, {k: p.low for k, p in spec.space.items()})
    assert cfg.run.eval_kimg > 0 and cfg.run.threads == 1
    assert {"optim.lr", "loss.P_mean", "loss.P_std", "loss.warmup_iters", "loss.tangent_norm_c",
            "ema.sigma_rel"} <= set(spec.space)
    assert sweep.make_sampler(spec).__class__.__name__ == "TPESampler"


@pytest.mark.parametrize("change, message", [
    ({"space": {"optim.lrr": {"type": "float", "low": 0.1, "high": 1.0}}}, "unknown config key 'optim.lrr'"),
    ({"space": {"ema.sigma_rel": {"type": "float", "low": 0.1, "high": 0.5}}}, "above the maximum"),
    ({"space": {"optim.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}}, "log needs low > 0"),
    ({"space": {"optim.lr": {"type": "floaty", "low": 0.1, "high": 1.0}}}, "type 'floaty'"),
    ({"space": {"optim.lr": {"type": "float", "lo": 0.1, "high": 1.0}}}, "unknown keys ['lo']"),
    ({"space": {"run.size": {"type": "categorical", "choices": ["tS", "tM"]}}}, "set it in base"),
    ({"space": {"loss.tangent_norm": {"type": "categorical", "choices": ["l2", "l1"]}}}, "'l1' is not allowed"),
    ({"sampler": {"name": "grid"}}, "every space parameter needs a list of choices"),
    ({"sampler": {"name": "bayes"}}, "sampler.name"),
    ({"pruner": {"name": "median", "options": {"patience": 3}}}, None),
    ({"base": {"method": "scd"}}, "teacher_run_dir"),
    ({"base": {"method": "sct", "overrides": {"run": {"total_kimgs": 1}}}}, "total_kimgs"),
    ({"objectiv": {"steps": 1}}, "unknown keys ['objectiv']"),
])
def test_bad_study_files_name_the_key(change, message):
    if message is None:  # an option the Optuna class does not take: reported when it is built
        with pytest.raises(ConfigError, match="pruner.options"):
            sweep.make_pruner(cheap_spec(**change))
        return
    with pytest.raises(ConfigError) as e:
        cheap_spec(**change)
    assert message in str(e.value)


def test_nested_space_and_grid_budget():
    spec = cheap_spec(n_trials=50, space={"optim": {"lr": {"type": "float", "choices": [0.01, 0.02]}},
                                          "loss.tangent_norm": {"type": "categorical", "choices": ["l2", "rms"]}},
                      sampler={"name": "grid"})
    assert set(spec.space) == {"optim.lr", "loss.tangent_norm"} and spec.n_trials == 4  # the grid's size


def test_samplers_needing_extras_say_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("cmaes", "scipy")
                        else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'scm-bench\[sweeps\]' \(or pip install cmaes\)"):
        sweep.make_sampler(cheap_spec(sampler={"name": "cmaes"}))
    with pytest.raises(ImportError, match="pip install scipy"):
        sweep.make_sampler(cheap_spec(sampler={"name": "gp"}))


BASE_OVERRIDES = {"network": {"model_channels": 8}, "run": {"batch_size": 32, "total_kimg": 2.0, "threads": 1},
                  "data": {"num_images": 256}}


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_best_yaml_reproduces_the_best_trials_config(tmp_path, monkeypatch, method):
    # The trials train the preset, the study's base overrides, then the params: so must `scm train` with
    # best.yaml, the way it reads --config and --overrides (scm.cli.load_config).
    from scm.cli import load_config

    monkeypatch.chdir(tmp_path)  # a relative teacher directory: trials train with its absolute path
    _no_figures(monkeypatch)
    base = {"dataset": "shapes", "size": "tS", "method": method, "overrides": BASE_OVERRIDES,
            "teacher_run_dir": "teacher" if method == "scd" else ""}
    spec = cheap_spec(n_trials=2, base=base)
    sweep.run_sweep(spec, tmp_path / "out", launcher="debug", objective=Quadratic(tmp_path))
    best = study_of(spec, tmp_path / "out").best_trial
    path = tmp_path / "out" / "best.yaml"
    assert path.read_text().startswith("#") and f"trial {best.number}:" in path.read_text()

    # The reference: the config the trial trained with, resolved here from what the test declared.
    teacher = {"run.teacher_run_dir": str(tmp_path / "teacher")} if method == "scd" else {}
    trial_cfg = resolve("shapes", "tS", method, {**flatten(BASE_OVERRIDES), **teacher, **best.params})
    assert trial_cfg.network.model_channels == 8 and trial_cfg.optim.lr == best.params["optim.lr"]
    # what a trial trains
    trained = sweep_spec.base_config(sweep.TrainingObjective(spec, tmp_path / "out").spec, best.params)
    assert config_hash(trained) == config_hash(trial_cfg)
    minimal = tmp_path / "run.yaml"
    minimal.write_text(yaml.safe_dump({"dataset": "shapes", "size": "tS", "method": method}))
    for cfg in (load_config(str(minimal), [str(path)], []), load_config(str(path), [], [])):
        assert config_hash(cfg) == config_hash(trial_cfg)
    assert f"config hash {config_hash(trial_cfg)}" in path.read_text()


# ----------------------------------------------------------------------------
# Concurrency: several worker processes on one storage.


def _check_concurrent_run(spec, out, log_dir, workers):
    """Every trial recorded once (numbers 0..T-1), run by exactly one worker call; the budget holds."""
    study = study_of(spec, out)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))
    assert spec.n_trials <= len(trials) <= spec.n_trials + workers - 1
    assert all(t.state == TrialState.COMPLETE for t in trials), [(t.number, t.state) for t in trials]
    made = calls(log_dir)
    assert sorted(n for _, n in made) == numbers  # none lost, none run twice
    by_worker = {t.user_attrs["worker"] for t in trials}
    assert len(by_worker) >= 2, "the workers did not overlap"
    assert len((out / "trials.csv").read_text().splitlines()) == len(trials) + 1
    assert (out / "best.yaml").exists()


def test_three_local_workers_share_one_journal(tmp_path, monkeypatch):
    # submitit's worker processes unpickle Quadratic from this module: put it on their path.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    spec = cheap_spec(n_trials=12)
    summary = sweep.run_sweep(spec, tmp_path / "out", workers=3, launcher="local", objective=Quadratic(tmp_path, 0.1))
    assert summary["worker_errors"] == [] and summary["complete"] >= 12
    assert len(list((tmp_path / "out" / "workers").glob("*/*_log.err"))) == 3
    _check_concurrent_run(spec, tmp_path / "out", tmp_path, 3)
    # Run again: the budget is spent, no worker starts and nothing changes.
    again = sweep.run_sweep(spec, tmp_path / "out", workers=3, launcher="local", objective=Quadratic(tmp_path, 0.1))
    assert again["trials"] == summary["trials"] and len(calls(tmp_path)) == summary["trials"]


def test_spawned_workers_on_one_journal(tmp_path):
    # The worker entry point itself, three processes started together (no coordinator in between).
    spec = cheap_spec(n_trials=9)
    storage = sweep.resolve_storage(spec, tmp_path)
    sweep.open_study(spec, storage)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=sweep.run_worker, args=(spec, storage, Quadratic(tmp_path, 0.05), i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    sweep.write_outputs(study_of(spec, tmp_path), spec, tmp_path, tmp_path / "figures")
    _check_concurrent_run(spec, tmp_path, tmp_path, 3)


# ----------------------------------------------------------------------------
# Crash and restart; divergence; pruning.


def test_killed_worker_leaves_running_trial_restart_fails_it_and_finishes(tmp_path):
    spec = cheap_spec(n_trials=5)
    storage = sweep.resolve_storage(spec, tmp_path)
    sweep.open_study(spec, storage)
    proc = multiprocessing.get_context("spawn").Process(
        target=sweep.run_worker, args=(spec, storage, Quadratic(tmp_path, hang_on=2), 0))
    proc.start()
    deadline = time.time() + 60
    while not (tmp_path / "hanging").exists() and time.time() < deadline and proc.is_alive():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-trial: no chance to tell the storage
    proc.join(10)
    stale = study_of(spec, tmp_path).trials[2]
    assert stale.state == TrialState.RUNNING

    summary = sweep.run_sweep(spec, tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    trials = study_of(spec, tmp_path).trials
    assert len(trials) == 5 and summary["trials"] == 5
    assert trials[2].state == TrialState.FAIL and trials[2].user_attrs["reason"] == "stale after restart"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 2]
    assert len(retry) == 1 and retry[0].params == stale.params and retry[0].state == TrialState.COMPLETE
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 4


# A torn journal (crash mid-append, full disk), an emptied journal, a worker killed by a signal.


def _no_figures(monkeypatch):
    monkeypatch.setattr(sweep, "write_figures", lambda study, out_dir: [])  # matplotlib takes seconds


def _journal_records(path) -> list[dict]:
    """The file's records, read by Optuna's own reader (which stops at the first undecodable line)."""
    from optuna.storages.journal import JournalFileBackend

    return list(JournalFileBackend(str(path)).read_logs(0))


def test_torn_journal_is_repaired_with_a_backup_and_the_study_continues(tmp_path, monkeypatch, caplog):
    _no_figures(monkeypatch)
    sweep.run_sweep(cheap_spec(n_trials=3), tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    journal = tmp_path / "journal.log"
    before = study_of(cheap_spec(), tmp_path).trials
    data = journal.read_bytes()
    last = data[:-1].rsplit(b"\n", 1)[1]  # the last record: a crash in the middle of writing it
    torn = data[:len(data) - len(last) // 2 - 1]
    journal.write_bytes(torn)

    summary = sweep.run_sweep(cheap_spec(n_trials=5), tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    assert summary["trials"] == 5 and summary["complete"] >= 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "repaired" in r.getMessage()]
    kept = len(last) - len(last) // 2
    assert len(warnings) == 1 and str(journal) in warnings[0] and f"torn record of {kept} bytes" in warnings[0]
    backups = list(tmp_path.glob("journal.log.*.bak"))
    assert len(backups) == 1 and backups[0].read_bytes() == torn and str(backups[0]) in warnings[0]
    after = study_of(cheap_spec(), tmp_path).trials
    assert [(t.params, t.value) for t in after[:2]] == [(t.params, t.value) for t in before[:2]]  # kept
    # Every line is a record again: Optuna reads the whole file, and a third run finds nothing to repair.
    assert len(_journal_records(journal)) == len(journal.read_bytes().splitlines())
    sweep.run_sweep(cheap_spec(n_trials=5), tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    assert len(list(tmp_path.glob("journal.log.*.bak"))) == 1


def test_journal_damaged_by_an_append_after_a_torn_record_is_recovered(tmp_path, monkeypatch):
    # What the old restart did: a torn record, then appends glued to it make the file unreadable for good.
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    _no_figures(monkeypatch)
    sweep.run_sweep(cheap_spec(n_trials=2), tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    journal = tmp_path / "journal.log"
    journal.write_bytes(journal.read_bytes() + b'{"op_code":5,"worker_id":"dead","trial_id":1,"par')
    raw = optuna.load_study(study_name="cheap", storage=JournalStorage(JournalFileBackend(str(journal))))
    raw.set_user_attr("first", 1)  # glued to the torn record
    with pytest.raises(ValueError):
        raw.set_user_attr("second", 2)  # written, then Optuna cannot read the file back

    sweep.run_sweep(cheap_spec(n_trials=3), tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    study = study_of(cheap_spec(), tmp_path)
    assert study.user_attrs["first"] == 1 and study.user_attrs["second"] == 2
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3


@pytest.mark.parametrize("damage", ["garbage line", "not a journal"])
def test_unreadable_journal_is_one_line_naming_the_file(tmp_path, monkeypatch, damage):
    _no_figures(monkeypatch)
    sweep.run_sweep(cheap_spec(n_trials=1), tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    journal = tmp_path / "journal.log"
    lines = journal.read_bytes().splitlines(keepends=True)
    bad = b"".join(lines[:1] + [b"#%$ not json\n"] + lines[1:]) if damage == "garbage line" else b"hello\n"
    journal.write_bytes(bad)
    with pytest.raises(sweep.SweepError) as e:
        sweep.run_sweep(cheap_spec(n_trials=2), tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    assert str(journal) in str(e.value) and "\n" not in str(e.value)
    assert ("line 2" if damage == "garbage line" else "line 1") in str(e.value)
    assert journal.read_bytes() == bad and not list(tmp_path.glob("journal.log.*.bak"))  # left as it was


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_journal_without_the_study_next_to_earlier_outputs_is_refused(tmp_path, monkeypatch, how):
    _no_figures(monkeypatch)
    sweep.run_sweep(cheap_spec(n_trials=2), tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    journal, csv = tmp_path / "journal.log", tmp_path / "trials.csv"
    old_csv, old_best = csv.read_text(), (tmp_path / "best.yaml").read_text()
    journal.write_bytes(b"") if how == "emptied" else journal.unlink()
    with pytest.raises(sweep.SweepError) as e:
        sweep.run_sweep(cheap_spec(n_trials=2), tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    message = str(e.value)
    assert str(journal) in message and "--restart" in message and "trials.csv" in message and "\n" not in message
    assert csv.read_text() == old_csv and len(calls(tmp_path)) == 2  # nothing ran, nothing overwritten

    summary = sweep.run_sweep(cheap_spec(n_trials=2), tmp_path, launcher="debug", objective=Quadratic(tmp_path),
                              restart=True)
    assert summary["trials"] == 2 and len(calls(tmp_path)) == 4
    assert [p.read_text() for p in tmp_path.glob("trials.csv.*.bak")] == [old_csv]
    assert [p.read_text() for p in tmp_path.glob("best.yaml.*.bak")] == [old_best]


def _kill_when_hanging(log_dir, number, sig=signal.SIGKILL, timeout=120):
    """In a thread: SIGKILL the process running trial `number` once it hangs (Quadratic(hang_on=number))."""
    def kill():
        deadline = time.time() + timeout
        while not (Path(log_dir) / "hanging").exists() and time.time() < deadline:
            time.sleep(0.05)
        pids = [pid for pid, n in calls(log_dir) if n == number]
        if pids:
            os.kill(pids[0], sig)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_killed_worker_is_reported_by_signal_and_its_running_trial_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    _no_figures(monkeypatch)
    spec, out = cheap_spec(n_trials=4), tmp_path / "out"
    killer = _kill_when_hanging(tmp_path, 1)
    with pytest.raises(sweep.SweepError) as e:
        sweep.run_sweep(spec, out, workers=2, launcher="local", objective=Quadratic(tmp_path, hang_on=1))
    killer.join()
    killed = [p for p, n in calls(tmp_path) if n == 1][0]
    summary = e.value.summary
    assert summary["running"] == 1 and summary["trials"] == 4 and summary["complete"] == 3
    assert "trials [1] left RUNNING by a killed worker" in str(e.value)
    assert len(summary["worker_errors"]) == 1 and f"(pid {killed} on" in summary["worker_errors"][0]
    assert "killed by SIGKILL" in summary["worker_errors"][0] and summary["worker_errors"][0] in str(e.value)
    assert "RUNNING" in (out / "trials.csv").read_text()

    # The next run fails the stale trial and runs its params again.
    summary = sweep.run_sweep(spec, out, launcher="debug", objective=Quadratic(tmp_path))
    trials = study_of(spec, out).trials
    assert summary["running"] == 0 and trials[1].state == TrialState.FAIL
    assert [t.params for t in trials if t.user_attrs.get("retry_of") == 1] == [trials[1].params]


def test_coordinator_death_ends_local_workers():
    coordinator = subprocess.Popen(["sleep", "60"])
    worker = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom scm.sweep import _exit_with\n"
                               f"_exit_with({coordinator.pid}, 0.1)\ntime.sleep(60)"])
    time.sleep(1.0)
    coordinator.kill()
    coordinator.wait()
    assert worker.wait(timeout=20) == 3


def test_diverged_and_nan_trials_fail_with_their_reason_and_the_study_goes_on(tmp_path):
    spec = cheap_spec(n_trials=5)
    summary = sweep.run_sweep(spec, tmp_path, launcher="debug", objective=Troubled(tmp_path))
    trials = study_of(spec, tmp_path).trials
    assert len(trials) == 5 and summary["complete"] == 3 and summary["fail"] == 2
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["reason"].startswith("diverged: non-finite")
    assert trials[2].state == TrialState.FAIL and "non-finite objective value nan" in trials[2].user_attrs["reason"]
    assert "user_attrs_reason" in (tmp_path / "trials.csv").read_text().splitlines()[0]


def test_pruned_trial_reason(tmp_path):
    class Reporting(Quadratic):
        def __call__(self, trial):
            value = super().__call__(trial)
            trial.report(value + trial.number * 100, 1)  # every later trial is worse than the first
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step 1 (trial {trial.number})")
            return value

    spec = cheap_spec(n_trials=3, pruner={"name": "median", "options": {"n_startup_trials": 1}})
    sweep.run_sweep(spec, tmp_path, launcher="debug", objective=Reporting(tmp_path))
    trials = study_of(spec, tmp_path).trials
    assert trials[0].state == TrialState.COMPLETE
    assert [t.state for t in trials[1:]] == [TrialState.PRUNED] * 2
    assert trials[2].user_attrs["reason"] == "pruned at step 1 (trial 2)"


def test_all_failed_raises_after_writing_trials_csv(tmp_path):
    class Diverging(Quadratic):
        def __call__(self, trial):
            raise DivergedError("boom")

    with pytest.raises(sweep.SweepError, match="no trial completed"):
        sweep.run_sweep(cheap_spec(n_trials=2), tmp_path, launcher="debug", objective=Diverging(tmp_path))
    assert len((tmp_path / "trials.csv").read_text().splitlines()) == 3 and not (tmp_path / "best.yaml").exists()


def test_changed_study_file_is_an_error_unless_restarted(tmp_path):
    spec = cheap_spec(n_trials=2)
    sweep.run_sweep(spec, tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    more = cheap_spec(n_trials=3)  # a larger budget continues the same study
    assert sweep.run_sweep(more, tmp_path, launcher="debug", objective=Quadratic(tmp_path))["trials"] == 3
    other = cheap_spec(n_trials=2, direction="maximize")
    with pytest.raises(ConfigError, match=r"declared with other \['direction'\].*--restart"):
        sweep.run_sweep(other, tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    summary = sweep.run_sweep(other, tmp_path, launcher="debug", objective=Quadratic(tmp_path), restart=True)
    assert summary["trials"] == 2 and len(glob.glob(str(tmp_path / "journal.log.*.bak"))) == 1


def test_grid_sampler_visits_each_point_once(tmp_path):
    spec = cheap_spec(n_trials=10, sampler={"name": "grid", "seed": 0},
                      space={"optim.lr": {"type": "float", "choices": [0.01, 0.1]},
                             "loss.P_mean": {"type": "float", "choices": [-1.0, -0.5, 0.0]}})
    sweep.run_sweep(spec, tmp_path, launcher="debug", objective=Quadratic(tmp_path))
    points = {tuple(sorted(t.params.items())) for t in study_of(spec, tmp_path).trials}
    assert len(points) == 6 == len(study_of(spec, tmp_path).trials)


def test_figures_are_guarded(tmp_path):
    spec = cheap_spec(n_trials=1)
    summary = sweep.run_sweep(spec, tmp_path, launcher="debug", objective=Quadratic(tmp_path), figures=tmp_path / "f")
    names = {Path(f).stem for f in summary["figures"]}
    assert "param_importances" not in names and "history" in names  # importances need >= 2 complete trials
    assert all(Path(f).parent == tmp_path / "f" for f in summary["figures"])


# ----------------------------------------------------------------------------
# The same concurrency test on a real PostgreSQL server (loopback), started by the fixture.


def _pg_bindir():
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    return next((d for d in reversed(dirs) if os.path.exists(f"{d}/initdb") and os.path.exists(f"{d}/pg_ctl")), None)


@pytest.fixture(scope="session")
def postgres_url():
    """SCM_TEST_POSTGRES_URL, or a throwaway cluster (initdb in a temp dir, 127.0.0.1, a free port)."""
    pytest.importorskip("psycopg2", reason="PostgreSQL tests need psycopg2: pip install psycopg2-binary")
    if os.environ.get("SCM_TEST_POSTGRES_URL"):
        yield os.environ["SCM_TEST_POSTGRES_URL"]
        return
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    # PostgreSQL refuses to run as root: as root, run its binaries as the 'postgres' user.
    run_as = []
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        run_as = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="scm-pg-"))
    if run_as:
        os.chown(base, pw.pw_uid, pw.pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    try:
        subprocess.run(run_as + [f"{bindir}/initdb", "-D", str(base / "data"), "-U", "postgres", "--auth=trust",
                                 "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        subprocess.run(run_as + [f"{bindir}/pg_ctl", "-D", str(base / "data"), "-l", str(base / "server.log"),
                                 "-o", opts, "-w", "-t", "60", "start"], check=True, capture_output=True, timeout=90)
    except (subprocess.SubprocessError, OSError) as e:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"could not start PostgreSQL from {bindir}: {e}; {getattr(e, 'stderr', b'')!r} {log[-500:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run_as + [f"{bindir}/pg_ctl", "-D", str(base / "data"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_three_local_workers_share_one_postgres_study(tmp_path, monkeypatch, postgres_url):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    spec = cheap_spec(n_trials=12, name=f"cheap-{os.getpid()}-{time.time_ns()}", storage=postgres_url)
    summary = sweep.run_sweep(spec, tmp_path / "out", workers=3, launcher="local", objective=Quadratic(tmp_path, 0.1))
    assert summary["storage"] == postgres_url and summary["worker_errors"] == []
    assert not (tmp_path / "out" / "journal.log").exists()
    _check_concurrent_run(spec, tmp_path / "out", tmp_path, 3)
