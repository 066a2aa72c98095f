import pytest

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
    # method.md §6, ImageNet 512: teacher lr 1e-2..6.5e-3, CM lr = teacher lr x 0.01, CM P = (-0.8, 1.6)
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
    for row in field_docs():
        assert row["help"], row["key"]
