import pytest
import yaml

from scm.config import (
    PAPER_SIZES,
    ConfigError,
    config_hash,
    field_docs,
    from_dict,
    parse_set,
    resolve,
    resolve_from_dict,
    to_dict,
)


def test_presets_carry_the_papers_hyperparameters():
    # sCM App. G, ImageNet 512: teacher lr 1e-2..6.5e-3, CM lr = teacher lr x 0.01, CM P = (-0.8, 1.6)
    for size, lr in zip(PAPER_SIZES, (1e-2, 9e-3, 8e-3, 7e-3, 6.5e-3)):
        teacher = resolve("imagenet512", size, "teacher")
        scd = resolve("imagenet512", size, "scd")
        assert teacher.optim.lr == pytest.approx(lr)
        assert scd.optim.lr == pytest.approx(lr * 0.01)
        assert (teacher.loss.P_mean, teacher.loss.P_std) == (-0.4, 1.0)
        assert (scd.loss.P_mean, scd.loss.P_std) == (-0.8, 1.6)
        assert scd.run.total_kimg == 200_000 * 2048 / 1000
        assert resolve("imagenet512", size, "sct").run.total_kimg == 100_000 * 2048 / 1000
        assert scd.network.guidance_input and (scd.loss.guidance_min, scd.loss.guidance_max) == (1.0, 2.0)
        assert teacher.network.label_dropout == 0.1 and teacher.optim.lr_ref_iters == 70_000
        assert scd.optim.lr_ref_iters == 0
    cifar_sct, cifar_scd = resolve("cifar10", "S", "sct"), resolve("cifar10", "S", "scd")
    assert cifar_sct.optim.name == "radam" and cifar_sct.optim.lr == pytest.approx(1e-4)
    assert (cifar_sct.optim.beta1, cifar_sct.optim.beta2) == (0.9, 0.99)
    assert (cifar_sct.loss.P_mean, cifar_sct.loss.P_std) == (-1.0, 1.4)
    assert cifar_sct.network.dropout == 0.20 and cifar_scd.network.dropout == 0.0
    assert resolve("cifar10", "S", "teacher").network.dropout == 0.13
    im64 = resolve("imagenet64", "M", "teacher")
    assert im64.optim.eps == 1e-11 and im64.optim.lr_ref_iters == 35_000 and im64.run.batch_size == 2048


def test_overrides_parse_types():
    cfg = resolve(overrides={"loss.tangent_norm": "clip", "loss.tangent_norm_c": "0.5",
                             "loss.adaptive_weighting": "false", "run.batch_size": "32",
                             "network.attn_resolutions": "[8]", "network.channel_mult": "1,2"})
    assert cfg.loss.tangent_norm == "clip" and cfg.loss.tangent_norm_c == 0.5
    assert cfg.loss.adaptive_weighting is False and cfg.run.batch_size == 32
    assert cfg.network.attn_resolutions == [8] and cfg.network.channel_mult == [1, 2]


@pytest.mark.parametrize("key,value,message", [
    ("loss.tangent_nrm", "l2", "unknown config key 'loss.tangent_nrm'"),
    ("nosuch.key", "1", "unknown config key 'nosuch.key'"),
    ("loss.tangent_norm", "l3", "loss.tangent_norm: 'l3' is not allowed; choose one of"),
    ("run.batch_size", "abc", "run.batch_size: expected an integer"),
    ("run.batch_size", "0", "run.batch_size: 0 is below the minimum 1"),
    ("network.dropout", "1.5", "network.dropout: 1.5 is above the maximum"),
    ("loss.adaptive_weighting", "maybe", "loss.adaptive_weighting: expected a boolean"),
    ("loss", "x", "loss is a section"),
    ("run.size", "XXXL", "run.size: 'XXXL' is not a known size"),
])
def test_bad_overrides_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve(overrides={key: value})


def test_unknown_preset_and_bad_set_syntax():
    with pytest.raises(ConfigError, match="no preset for dataset='cifar10' size='XL'"):
        resolve("cifar10", "XL", "teacher")
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_set(["loss.tangent_norm"])


def test_round_trip_and_hash():
    cfg = resolve("shapes", "tM", "sct", {"loss.tangent_norm": "rms"})
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg) and config_hash(again) == config_hash(cfg)
    assert config_hash(resolve("shapes", "tM", "sct")) != config_hash(cfg)
    cfg2 = resolve_from_dict({"dataset": "shapes", "size": "tM", "method": "sct",
                              "loss": {"tangent_norm": "rms"}})
    assert to_dict(cfg2) == to_dict(cfg)


def test_every_field_is_documented():
    # A field made without opt() has no help; a choice the help does not name is undocumented.
    import dataclasses

    from scm.config import Config

    cfg = Config()
    sections = [getattr(cfg, top.name) for top in dataclasses.fields(cfg)]
    leaves = [f for top, sec in zip(dataclasses.fields(cfg), sections, strict=True)
              for f in (dataclasses.fields(sec) if dataclasses.is_dataclass(sec) else [top])]
    rows = field_docs()
    assert len(rows) == len(leaves)
    for row in rows:
        assert len(row.get("help") or "") >= 10, row["key"]
        for choice in row.get("choices") or []:
            assert str(choice) in row["help"], f"{row['key']}: help does not name the choice {choice!r}"


def test_config_fields_lists_every_field(capsys):
    from scm.cli import main

    assert main(["config", "fields"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(field_docs())
    assert any(line.startswith("| `loss.tangent_norm` | str | 'l2' | l2, rms, clip, none |") for line in lines)


def test_own_zip_dataset_has_the_imagenet64_recipe():
    cfg = resolve(dataset="zip", size="S", method="scd", overrides={"data.resolution": 32})
    ref = resolve(dataset="imagenet64", size="S", method="scd")
    assert (cfg.optim.lr, cfg.loss.P_mean, cfg.run.batch_size) == (ref.optim.lr, ref.loss.P_mean, ref.run.batch_size)
    assert cfg.data.resolution == 32 and cfg.data.name == "zip"


@pytest.mark.parametrize("key,value", [("loss.P_std", float("nan")), ("optim.lr", float("nan")),
                                       ("run.total_kimg", float("inf")), ("loss.P_mean", float("-inf")),
                                       ("run.batch_size", float("inf")), ("data.latent_mean", [1.0, float("nan")])])
def test_non_finite_values_are_rejected_on_every_path(tmp_path, key, value):
    # YAML's .nan/.inf arrive as Python floats: study files and sweeps (resolve), run dirs (from_dict), ablations
    from scm.study import load_ablation

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        resolve(overrides={key: value})
    assert e.value.key == key
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict({**to_dict(resolve()), key.split(".")[0]: {key.split(".")[1]: value}})
    section, name = key.split(".")
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text(yaml.safe_dump({section: {name: value}}))  # written as .nan / .inf
    with pytest.raises(ConfigError, match=f"{ablation}: {key}"):
        load_ablation(ablation)


def test_unknown_dataset_method_and_size_name_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"data\.name: 'imagenet' .*\['cifar10', 'gmm', 'imagenet512'") as e:
        resolve("imagenet", "S", "teacher")
    assert e.value.key == "data.name"
    with pytest.raises(ConfigError, match=r"run\.method: 'sctt' is not allowed; choose one of \['teacher', 'sct', "
                                          r"'scd'\]") as e:
        resolve("shapes", "tS", "sctt")
    assert e.value.key == "run.method"
    with pytest.raises(ConfigError, match=r"run\.size: .*sizes for 'shapes': \['tL', 'tM', 'tS', 'tXL', 'tXXL'\]"):
        resolve("shapes", "S", "teacher")


def test_load_yaml_names_the_file_line_and_top_level(tmp_path):
    from scm.config import load_yaml

    f = tmp_path / "a.yaml"
    f.write_text("run:\n  seed: 1\n  size: [tS\n")
    with pytest.raises(ConfigError, match=rf"--x: {f}: YAML syntax error at line 4"):
        load_yaml(f, "--x")
    for text, kind in (("- 1\n- 2\n", "list"), ("word\n", "str"), ("3.5\n", "float")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=rf"--x: {f}: the top level must be a mapping .* got a {kind}"):
            load_yaml(f, "--x")
    f.write_text("")
    assert load_yaml(f, "--x") == {}
    f.write_text("run: {seed: 3}\n")
    assert load_yaml(f, "--x") == {"run": {"seed": 3}}
    with pytest.raises(ConfigError, match=rf"--x: {tmp_path} is a directory"):
        load_yaml(tmp_path, "--x")


def test_later_layers_win_whatever_spelling_picks_the_preset():
    # a file says run.method, an override says method (and the other way round): the override wins
    assert resolve_from_dict({"run": {"method": "teacher"}}, {"method": "sct"}).run.method == "sct"
    assert resolve_from_dict({"method": "teacher"}, {"run.method": "scd"}).run.method == "scd"
    assert resolve_from_dict({"data": {"name": "gmm"}}, {"dataset": "shapes"}).data.name == "shapes"


def test_config_write_round_trips_a_resolved_config(tmp_path, capsys):
    import json

    from scm.cli import main
    from scm.config import load_yaml, to_dict

    cfg = resolve("shapes", "tM", "scd", overrides={"loss.tangent_norm": "rms"})
    out = tmp_path / "run.yaml"
    assert main(["config", "write", "--json", json.dumps(to_dict(cfg)), "--out", str(out)]) == 0
    assert load_yaml(out, "run.yaml") == json.loads(json.dumps(to_dict(cfg)))
    bad = to_dict(cfg)
    bad["loss"]["tangent_normalisation"] = "none"
    assert main(["config", "write", "--json", json.dumps(bad), "--out", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown config key 'loss.tangent_normalisation'" in capsys.readouterr().err
    assert not (tmp_path / "bad.yaml").exists()
