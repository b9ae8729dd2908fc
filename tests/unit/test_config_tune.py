"""The Tune side of the config: trial configs from sampled dotted fields, the Ray Tune
search space, concurrency from resources, and the checks that run before any trial."""

from __future__ import annotations

import pytest

from raydc.config import ConfigError, from_dict, load_config
from raydc.pipeline import CONFIG_DIR
from raydc.tune import (
    check_space,
    format_table,
    max_concurrent,
    param_space,
    trial_config,
    trial_resources,
)


def _cfg(**tune):
    return from_dict(
        {
            "weights": {"preset": "discord", "tau": 2.0},
            "train": {"val_share": 0.1, "num_workers": 2, "cpus_per_worker": 0.9},
            "tune": {"enabled": True, "space": {"weights.tau": [0.5, 1.0]}, **tune},
        }
    )


def test_trial_config_applies_dotted_fields_and_turns_tune_off():
    cfg = trial_config(_cfg(), {"weights.tau": 0.5, "train.lr": 3e-4, "weights.sign": -1})
    assert cfg.weights.tau == 0.5 and cfg.weights.sign == -1 and cfg.train.lr == 3e-4
    assert cfg.weights.transform == "sigmoid"
    assert cfg.tune.enabled is False


def test_a_sampled_preset_replaces_the_weights_then_other_fields_apply():
    cfg = trial_config(_cfg(), {"weights.preset": "tis"})
    assert cfg.weights.transform == "exp_clip" and cfg.weights.w_max == 2.0
    assert cfg.weights.tau == 1.0  # the base's tau=2 belongs to the replaced section
    cfg = trial_config(_cfg(), {"weights.preset": "iw_seq", "weights.w_max": 4.0})
    assert cfg.weights.granularity == "sequence_mean" and cfg.weights.w_max == 4.0


def test_an_invalid_sampled_combination_raises_a_config_error():
    with pytest.raises(ConfigError, match="w_min"):
        trial_config(_cfg(), {"weights.preset": "tis", "weights.w_min": 3.0})


def test_check_space_names_the_field_of_a_bad_value():
    cfg = _cfg(space={"weights.floor": {"type": "uniform", "low": 0.0, "high": 1.5}})
    with pytest.raises(ConfigError, match=r"tune\.space\.weights\.floor: value 1\.5"):
        check_space(cfg)
    cfg = _cfg(space={"weights.preset": ["discord", "nope"]})
    with pytest.raises(ConfigError, match=r"tune\.space\.weights\.preset: value 'nope'"):
        check_space(cfg)
    check_space(load_config(CONFIG_DIR / "tune.yaml"))


def test_check_space_needs_what_the_metric_needs():
    with pytest.raises(ConfigError, match=r"tune\.space: empty"):
        check_space(from_dict({"train": {"val_share": 0.1}}))  # e.g. `raydc tune` on default
    cfg = from_dict(
        {"tune": {"enabled": True, "metric": "val_nll", "space": {"weights.tau": [1.0]}}}
    )
    with pytest.raises(ConfigError, match=r"train\.val_share"):
        check_space(cfg)
    # The default metric (val_accuracy) needs graded held-out problems.
    cfg = from_dict(
        {"train": {"val_share": 0.1}, "tune": {"enabled": True, "space": {"weights.tau": [1.0]}}}
    )
    with pytest.raises(ConfigError, match=r"tune\.metric=val_accuracy: needs eval\.path"):
        check_space(cfg)


def test_param_space_maps_each_spec_to_a_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = _cfg(
        space={
            "weights.tau": {"type": "loguniform", "low": 0.25, "high": 4.0},
            "weights.floor": {"type": "uniform", "low": 0.0, "high": 0.5},
            "train.warmup_steps": {"type": "randint", "low": 0, "high": 4},
            "weights.sign": [1, -1],
            "weights.preset": {"type": "grid", "values": ["discord", "das_token"]},
        }
    )
    space = param_space(cfg)
    assert isinstance(space["weights.tau"], Float) and space["weights.tau"].lower == 0.25
    assert isinstance(space["weights.floor"], Float)
    assert isinstance(space["train.warmup_steps"], Integer)
    assert isinstance(space["weights.sign"], Categorical)
    assert space["weights.sign"].categories == [1, -1]
    # Optuna samples: a grid entry becomes a choice there ...
    assert isinstance(space["weights.preset"], Categorical)
    # ... and search_alg=grid enumerates every list exhaustively.
    grid = param_space(_cfg(search_alg="grid", space={"weights.sign": [1, -1]}))
    assert grid["weights.sign"] == {"grid_search": [1, -1]}


def test_concurrency_follows_the_trial_resources():
    cfg = _cfg()
    assert trial_resources(cfg) == {"CPU": pytest.approx(1.81)}
    assert max_concurrent(cfg, {"CPU": 2.0}) == 1  # this laptop: one trial at a time
    assert max_concurrent(cfg, {"CPU": 8.0}) == 3  # 1 CPU kept for Ray Data's listing
    assert max_concurrent(cfg, {"CPU": 1.0}) == 1  # never 0
    half = from_dict({"train": {"num_workers": 2, "cpus_per_worker": 0.49, "val_share": 0.1}})
    assert max_concurrent(half, {"CPU": 2.0}) == 1  # 0.99 a trial, but a CPU stays free
    assert max_concurrent(half, {"CPU": 3.0}) == 2
    gpu = from_dict({"train": {"use_gpu": True, "num_workers": 4, "val_share": 0.1}})
    assert max_concurrent(gpu, {"CPU": 64.0, "GPU": 8.0}) == 2
    assert max_concurrent(_cfg(max_concurrent_trials=3), {"CPU": 2.0}) == 3


def test_format_table_aligns_columns_and_drops_empty_ones():
    rows = [
        {"trial_id": "a", "val_nll": 1.23456, "x": None},
        {"trial_id": "bb", "val_nll": 2.0, "x": None},
    ]
    text = format_table(rows, ["trial_id", "val_nll", "x"])
    lines = text.splitlines()
    assert lines[0].split() == ["trial_id", "val_nll"]
    assert lines[1].split() == ["a", "1.235"] and len(lines) == 3
