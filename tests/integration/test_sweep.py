"""A real sweep end to end: the `scm sweep` command, two local workers, the training objective (tiny runs)."""

import json

import pandas as pd
import pytest
import yaml

from scm import extractors
from scm.cli import load_config, main
from scm.config import config_hash, from_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_extractor(tmp_path_factory):
    """A quickly trained shapes feature network (the real one takes ~30 s)."""
    path = tmp_path_factory.mktemp("extractor") / "shapes-features.pt"
    extractors.train_shapes_extractor(path, steps=60, batch=64, train_images=1024, test_images=256)
    return path


def test_two_workers_real_objective_write_trials_csv_and_best_yaml(tmp_path, quick_extractor):
    study = {
        "name": "tiny", "n_trials": 2, "direction": "minimize",
        "base": {"dataset": "shapes", "size": "tS", "method": "sct",
                 "overrides": {"network": {"model_channels": 8}, "data": {"num_images": 256},
                               "run": {"batch_size": 16, "total_kimg": 0.32, "eval_kimg": 0.16, "threads": 1,
                                       "checkpoint_kimg": 100.0, "log_kimg": 0.16}}},
        "space": {"optim.lr": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True},
                  "loss.warmup_iters": {"type": "int", "low": 0, "high": 10}},
        "objective": {"steps": 1, "num_samples": 64, "eval_num_samples": 32, "batch": 64,
                      "extractor_weights": str(quick_extractor), "cache_dir": str(tmp_path / "cache")},
        "sampler": {"name": "tpe", "seed": 0}, "pruner": {"name": "none"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "sweep dir"  # a space in the path on purpose
    assert main(["sweep", "--sweep-file", str(path), "--workers", "2", "--launcher", "local", "--out", str(out)]) == 0

    df = pd.read_csv(out / "trials.csv")
    assert len(df) == 2 and set(df["state"]) == {"COMPLETE"} and df["value"].notna().all()
    assert {"params_optim.lr", "params_loss.warmup_iters", "user_attrs_run_dir"} <= set(df.columns)
    for number in df["number"]:
        run = out / "trials" / str(number)
        assert (run / "final.pt").exists() and '"completed"' in (run / "status.json").read_text()
        assert len((run / "stats.jsonl").read_text().splitlines()) == 2  # 20 steps, a line every 10
    # best.yaml is the best trial's whole config: `scm train --config best.yaml` trains its run config again.
    best_run = out / "trials" / str(df.loc[df["value"].idxmin(), "number"])
    run_cfg = from_dict(json.loads((best_run / "config.json").read_text()))
    cfg = load_config(str(out / "best.yaml"), [], [])
    assert config_hash(cfg) == config_hash(run_cfg) and cfg.network.model_channels == 8
    assert cfg.optim.lr == pytest.approx(df.loc[df["value"].idxmin(), "params_optim.lr"])
    assert (out / "figures" / "history.png").exists()
    # Running the command again finds the budget spent: no new trial.
    assert main(["sweep", "--sweep-file", str(path), "--launcher", "debug", "--out", str(out)]) == 0
    assert len(pd.read_csv(out / "trials.csv")) == 2
