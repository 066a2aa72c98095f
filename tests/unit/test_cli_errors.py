"""Bad input to the `scm` command: one line `scm: error: ...` on stderr naming the key, file or value, exit
status 2, before any work (no run directory, no status.json, no sampling)."""

import os
import subprocess
import sys

import pytest
import yaml

from scm.cli import main

TINY = {"dataset": "shapes", "size": "tS", "method": "teacher", "data": {"num_images": 64},
        "network": {"model_channels": 8}, "run": {"batch_size": 16, "total_kimg": 0.016, "threads": 1}}


def _yaml(path, obj):
    path.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj))
    return path


def _one_line_error(capsys, argv, *needles):
    """Run the CLI; it must exit 2 with exactly one line `scm: error: ...` on stderr containing every needle."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("scm: error: "), err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


def _train(tmp_path, config, *extra):
    return ["train", "--config", config, "--run-dir", tmp_path / "run", *extra]


# ----------------------------------------------------------------------------
# scm train: the config file, override files and --set


@pytest.mark.parametrize("how", ["file", "set"])
def test_misspelled_method_names_the_key_and_the_choices(tmp_path, capsys, how):
    cfg = _yaml(tmp_path / "run.yaml", {**TINY, "method": "sctt"} if how == "file" else TINY)
    extra = ["--set", "method=sctt"] if how == "set" else []
    _one_line_error(capsys, _train(tmp_path, cfg, *extra), "run.method", "'sctt'", "'teacher'", "'sct'", "'scd'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--config", "--overrides"])
def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys, flag):
    bad = _yaml(tmp_path / "bad.yaml", "dataset: shapes\nloss:\n  P_std: [1.4\n  P_mean: -1\n")
    cfg = bad if flag == "--config" else _yaml(tmp_path / "run.yaml", TINY)
    extra = ["--overrides", bad] if flag == "--overrides" else []
    err = _one_line_error(capsys, _train(tmp_path, cfg, *extra), flag, bad, "YAML syntax error", "line 4")
    assert "--set" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,kind", [("- dataset: shapes\n- size: tS\n", "list"), ("just a string\n", "str"),
                                       ("42\n", "int")])
def test_yaml_top_level_must_be_a_mapping(tmp_path, capsys, text, kind):
    cfg = _yaml(tmp_path / "run.yaml", text)
    _one_line_error(capsys, _train(tmp_path, cfg), cfg, "mapping", kind)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,value", [("network.channel_mult", "1,a"), ("network.attn_resolutions", "[8,"),
                                       ("data.latent_mean", "1.0,x"), ("network.channel_mult", "1,,2e")])
def test_list_parse_errors_name_the_key_and_value(tmp_path, capsys, key, value):
    cfg = _yaml(tmp_path / "run.yaml", TINY)
    _one_line_error(capsys, _train(tmp_path, cfg, "--set", f"{key}={value}"), key, repr(value), "--set")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,value", [("loss.P_std", "nan"), ("optim.lr", "nan"), ("run.total_kimg", "inf"),
                                       ("loss.P_mean", "-inf"), ("sampler.sigma_max", "NaN"),
                                       ("data.latent_std", "[1.0, NaN]"), ("run.batch_size", "1e999")])
def test_non_finite_numbers_are_rejected_from_set(tmp_path, capsys, key, value):
    cfg = _yaml(tmp_path / "run.yaml", TINY)
    _one_line_error(capsys, _train(tmp_path, cfg, "--set", f"{key}={value}"), key, "--set")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section,key,text", [("loss", "P_std", ".nan"), ("optim", "lr", ".NaN"),
                                              ("run", "total_kimg", ".inf")])
def test_non_finite_numbers_are_rejected_from_yaml(tmp_path, capsys, section, key, text):
    body = yaml.safe_dump({k: v for k, v in TINY.items() if k != section}) + f"{section}:\n  {key}: {text}\n"
    cfg = _yaml(tmp_path / "run.yaml", body)
    _one_line_error(capsys, _train(tmp_path, cfg), f"{section}.{key}", "finite", cfg)
    assert not (tmp_path / "run").exists()


def test_set_errors_name_set_and_override_errors_name_the_override_file(tmp_path, capsys):
    cfg = _yaml(tmp_path / "run.yaml", TINY)
    ablation = _yaml(tmp_path / "ablation.yaml", {"loss": {"tangent_norm": "l3"}})
    err = _one_line_error(capsys, _train(tmp_path, cfg, "--set", "loss.tangent_norm=l3"), "loss.tangent_norm",
                          "--set")
    assert str(cfg) not in err
    err = _one_line_error(capsys, _train(tmp_path, cfg, "--overrides", ablation), "loss.tangent_norm", ablation)
    assert str(cfg) not in err and "--set" not in err
    # a later --set fixes the override file's value; a bad --set key wins over a good file
    err = _one_line_error(capsys, _train(tmp_path, cfg, "--overrides", ablation, "--set", "loss.tangent_nrm=x",
                                         "loss.tangent_norm=clip", "--dry-run"), "loss.tangent_nrm", "--set")
    assert str(ablation) not in err and str(cfg) not in err
    _one_line_error(capsys, _train(tmp_path, cfg, "--set", "loss.tangent_norm"), "--set", "key=value")
    assert not (tmp_path / "run").exists()


def test_config_and_override_paths_must_be_files(tmp_path, capsys):
    cfg = _yaml(tmp_path / "run.yaml", TINY)
    folder = tmp_path / "folder"
    folder.mkdir()
    _one_line_error(capsys, _train(tmp_path, folder), "--config", folder, "directory")
    _one_line_error(capsys, _train(tmp_path, cfg, "--overrides", folder), "--overrides", folder, "directory")
    _one_line_error(capsys, _train(tmp_path, tmp_path / "missing.yaml"), "--config", "not found")
    assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file_is_refused(tmp_path, capsys):
    cfg = _yaml(tmp_path / "run.yaml", TINY)
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(capsys, ["train", "--config", cfg, "--run-dir", afile], "--run-dir", afile, "not a directory")
    _one_line_error(capsys, ["train", "--config", cfg, "--run-dir", afile / "run"], "--run-dir", afile,
                    "not a directory")
    for command in (["sample", "--steps", "1", "--num", "4", "--out", tmp_path / "s"],
                    ["evaluate", "--steps", "1", "--out", tmp_path / "m.json"]):
        _one_line_error(capsys, [command[0], "--run-dir", afile, *command[1:]], "--run-dir", afile,
                        "not a directory")
    assert afile.read_text() == "x" and not (tmp_path / "s").exists() and not (tmp_path / "m.json").exists()


def test_unreadable_run_dir_is_refused(tmp_path, capsys, monkeypatch):
    cfg = _yaml(tmp_path / "run.yaml", TINY)
    run_dir = tmp_path / "locked"
    run_dir.mkdir()
    run_dir.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the permission check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(run_dir)
                            else real(p, mode, **kw))
    try:
        _one_line_error(capsys, ["train", "--config", cfg, "--run-dir", run_dir], "--run-dir", run_dir,
                        "permission")
        _one_line_error(capsys, ["evaluate", "--run-dir", run_dir, "--steps", "1", "--out", tmp_path / "m.json"],
                        "--run-dir", run_dir, "permission")
    finally:
        run_dir.chmod(0o755)
    assert list(run_dir.iterdir()) == []


def test_errors_are_one_line_from_the_real_command(tmp_path):
    # the installed entry point as a user runs it: no traceback, no log lines, nothing created
    bad = _yaml(tmp_path / "bad.yaml", "dataset: shapes\nmethod: [sct\n")
    proc = subprocess.run([sys.executable, "-m", "scm.cli", "train", "--config", str(bad), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("scm: error: --config: ") and str(bad) in proc.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------
# scm sample / scm evaluate: counts and --out are checked before any sampling


@pytest.fixture
def no_work(monkeypatch):
    """sample_run/evaluate_run must not be reached by bad input."""
    from scm import evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("sampling started despite bad input")

    monkeypatch.setattr(evaluate, "sample_run", refuse)
    monkeypatch.setattr(evaluate, "evaluate_run", refuse)


@pytest.mark.parametrize("args,needles", [
    (["--num", "-3"], ["--num", "-3"]),
    (["--num", "4", "--steps", "0"], ["--steps", "0"]),
    (["--num", "4", "--batch", "0"], ["--batch", "0"]),
    (["--seeds", "0-9", "--num", "-1"], ["--num", "-1"]),
    (["--num", "4", "--guidance", "nan"], ["--guidance", "nan"]),
])
def test_sample_counts_are_checked(tmp_path, capsys, no_work, args, needles):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    base = ["sample", "--run-dir", run_dir, "--out", tmp_path / "out"]
    if "--steps" not in args:
        base += ["--steps", "1"]
    _one_line_error(capsys, [*base, *args], *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needles", [
    (["--seed-sets", "0"], ["--seed-sets", "0"]),
    (["--num", "0"], ["--num", "0"]),
    (["--num", "-5"], ["--num", "-5"]),
    (["--steps", "1", "0"], ["--steps", "0"]),
    (["--batch", "0"], ["--batch", "0"]),
    (["--first-seed", "-1"], ["--first-seed", "-1"]),
    (["--kid-subsets", "0"], ["--kid-subsets", "0"]),
    (["--guidance", "inf"], ["--guidance", "inf"]),
    (["--guidance", "-1"], ["--guidance", "-1"]),
])
def test_evaluate_counts_are_checked(tmp_path, capsys, no_work, args, needles):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    base = ["evaluate", "--run-dir", run_dir, "--out", tmp_path / "m.json"]
    if "--steps" not in args:
        base += ["--steps", "1"]
    _one_line_error(capsys, [*base, *args], *needles)
    assert not (tmp_path / "m.json").exists()


def test_evaluate_and_sample_out_is_checked_before_any_work(tmp_path, capsys, no_work):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    ev = ["evaluate", "--run-dir", run_dir, "--steps", "1", "--out"]
    _one_line_error(capsys, [*ev, afile / "metrics.json"], "--out", afile, "not a directory")
    _one_line_error(capsys, [*ev, afile / "deeper" / "metrics.json"], "--out", afile, "not a directory")
    _one_line_error(capsys, [*ev, folder], "--out", folder, "is a directory")
    sm = ["sample", "--run-dir", run_dir, "--steps", "1", "--num", "4", "--out"]
    _one_line_error(capsys, [*sm, afile], "--out", afile, "not a directory")
    _one_line_error(capsys, [*sm, afile / "pngs"], "--out", afile, "not a directory")
    assert afile.read_text() == "x" and list(folder.iterdir()) == []


# ----------------------------------------------------------------------------
# Datasets: every place a dataset name is accepted lists the valid ones


def test_unknown_dataset_lists_the_valid_ones(tmp_path, capsys):
    valid = ["'shapes'", "'cifar10'", "'imagenet64'", "'imagenet512'"]
    cfg = _yaml(tmp_path / "run.yaml", {**TINY, "dataset": "imagenet"})
    _one_line_error(capsys, _train(tmp_path, cfg), "data.name", "'imagenet'", *valid)
    cfg = _yaml(tmp_path / "run.yaml", TINY)
    _one_line_error(capsys, _train(tmp_path, cfg, "--set", "data.name=cifar"), "data.name", "'cifar'", "--set",
                    *valid)
    assert not (tmp_path / "run").exists()
    _one_line_error(capsys, ["info", "sizes", "--dataset", "imagenet"], "--dataset", "'imagenet'", *valid)
    metrics = tmp_path / "m.json"
    metrics.write_text("[]")
    _one_line_error(capsys, ["report", "--metrics", metrics, "--dataset", "imagenet", "--results",
                             tmp_path / "results"], "--dataset", "'imagenet'", *valid)
    _one_line_error(capsys, ["report", "--metrics", tmp_path / "nope.json", "--dataset", "shapes", "--results",
                             tmp_path / "results"], "--metrics", tmp_path / "nope.json", "not found")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("text,needle", [("name: x\nspace: [a\n", "YAML syntax error at line 3"),
                                         ("- a\n- b\n", "mapping")])
def test_study_and_cluster_files_are_read_by_the_same_strict_loader(tmp_path, capsys, text, needle):
    bad = _yaml(tmp_path / "bad.yaml", text)
    _one_line_error(capsys, ["sweep", "--sweep-file", bad, "--out", tmp_path / "sweep"], "--sweep-file", bad, needle)
    assert not (tmp_path / "sweep").exists()
    cfg = _yaml(tmp_path / "run.yaml", TINY)
    _one_line_error(capsys, [*_train(tmp_path, cfg), "--cluster", "c", "--clusters", bad, "--dry-run"],
                    "--clusters", bad, needle)


@pytest.mark.parametrize("argv,needles", [
    (["data", "fetch", "imagenet", "--root", "x"], ["invalid choice: 'imagenet'", "'cifar10'"]),
    (["data", "ref-stats", "--dataset", "imagenet", "--out", "x.npz"], ["invalid choice: 'imagenet'", "'shapes'"]),
    (["sample", "--run-dir", "r", "--steps", "two", "--out", "o"], ["--steps", "'two'"]),
])
def test_argument_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, needles):
    # argparse's own checks (choices, types) follow the same rule: one line naming the argument and value
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("scm: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert list(tmp_path.iterdir()) == []
