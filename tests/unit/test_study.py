import pytest
import yaml

from scm.config import ConfigError, config_hash, resolve_from_dict
from scm.study import Study, load_ablation, parse_run_id

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def study(**over):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg.update(over)
    return Study(cfg, root=ROOT)


def test_run_ids_round_trip_and_reject_garbage():
    run = parse_run_id("sct-tS-tangent_warmup_off-s1")
    assert (run.method, run.size, run.ablation, run.seed) == ("sct", "tS", "tangent_warmup_off", 1)
    assert run.run_id == "sct-tS-tangent_warmup_off-s1"
    with pytest.raises(ConfigError, match="method-size-ablation-sSEED"):
        parse_run_id("sct_tS_base_0")


def test_default_study_grid():
    s = study()
    ids = s.run_ids()
    assert len(ids) == len(set(ids))
    for m in ("teacher", "scd", "sct"):
        for size in s.cfg["sizes"]:
            assert f"{m}-{size}-base-s0" in ids
    assert {"tS", "tM"} <= set(s.cfg["sizes"])
    ablation_files = sorted(p.stem for p in (ROOT / "ablations").glob("*.yaml"))
    assert len(ablation_files) >= 10
    # sCD (the paper's preferred method), three seeds, the full recipe with the grid's settings
    names = s.cfg["ablations"]["names"] or ablation_files  # the default study runs one per technique
    assert set(names) <= set(ablation_files) and len(names) >= 7
    for name in names + ["full"]:
        assert all(f"scd-tS-{name}-s{seed}" in ids for seed in (0, 1, 2)), name
    grid_kimg = s.cfg["ablations"]["overrides"]["run"]["total_kimg"]
    full, clip = s.config("scd-tS-full-s1"), s.config("scd-tS-tangent_norm_none-s1")
    assert full.run.total_kimg == clip.run.total_kimg == grid_kimg and full.loss.tangent_norm == "l2"
    assert full.run.teacher_run_dir == clip.run.teacher_run_dir == "results/runs/teacher-tS-base-s0"
    # network ablations distill their own teacher: one per ablation (not per seed), the base teacher's budget
    own = sorted(i for i in ids if i.startswith("teacher-tS-") and "-base-" not in i)
    assert own == ["teacher-tS-adagn_plain-s0", "teacher-tS-c_noise_1000t-s0", "teacher-tS-time_embedding_fourier-s0"]
    assert s.config(own[0]).run.total_kimg == s.config("teacher-tS-base-s0").run.total_kimg


def test_overrides_order_and_teacher():
    s = study()
    cfg = s.config("sct-tS-tangent_norm_none-s1")
    assert cfg.loss.tangent_norm == "none" and cfg.run.seed == 1 and cfg.run.method == "sct"
    assert cfg.run.batch_size == 32 and cfg.run.total_kimg == 1.6  # study, method, then ablation-grid overrides
    assert s.config("sct-tS-base-s0").run.total_kimg == 3.2 and cfg.data.shapes_version == 2
    scd = s.config("scd-tM-base-s0")
    assert scd.run.teacher_run_dir == "results/runs/teacher-tM-base-s0"
    # the file written for `scm train --config` resolves to the same config
    assert config_hash(resolve_from_dict(s.config_dict("scd-tM-base-s0"))) == config_hash(scd)


def test_scd_ablations_of_the_network_get_their_own_teacher():
    s = study(ablations={"method": "scd", "size": "tS", "seeds": [0], "names": ["adagn_plain",
                                                                                "attention_blockwise"]})
    ids = s.run_ids()
    assert "teacher-tS-adagn_plain-s0" in ids  # the architecture changed: the teacher must match
    assert "teacher-tS-attention_blockwise-s0" not in ids  # same function: the base teacher serves
    teacher = s.config("teacher-tS-adagn_plain-s0")
    assert teacher.network.adagn == "plain" and teacher.loss.tangent_norm == "l2"


def test_every_ablation_file_only_overrides_known_fields(tmp_path):
    for path in (ROOT / "ablations").glob("*.yaml"):
        assert load_ablation(path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  tangent_normalisation: none\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown config key 'loss.tangent_normalisation'"):
        load_ablation(bad)
    with pytest.raises(ConfigError, match="ablations.names: 'nope' has no file"):
        study(ablations={"names": ["nope"]})


def test_reference_table_holds_the_abstracts_headline_numbers():
    # The paper's abstract: 2-step FID 2.06 (CIFAR-10), 1.48 (ImageNet 64x64), 1.88 (ImageNet 512x512).
    import pandas as pd

    table = pd.read_csv(ROOT / "resources" / "paper-tables.csv")
    two_step = table[table["nfe"] == 2]
    for dataset, fid in (("cifar10", 2.06), ("imagenet64", 1.48), ("imagenet512", 1.88)):
        assert two_step[two_step["dataset"] == dataset]["fid"].min() == pytest.approx(fid), dataset
