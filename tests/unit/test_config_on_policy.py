"""The on_policy config section: defaults, the rounds' weighting, errors naming the field."""

from __future__ import annotations

import pytest

from raydc.config import ConfigError, OnPolicyConfig, from_dict


def test_defaults_validate_and_weights_are_the_opd_preset():
    cfg = from_dict({})
    op = cfg.on_policy
    assert isinstance(op, OnPolicyConfig) and not op.enabled
    w = op.weights()
    assert (w.transform, w.sign, w.normalization) == ("advantage", -1, "none")
    assert (w.c, w.w_min, w.w_max, w.baseline) == (1.0, 0.0, 2.0, "none")


def test_yaml_section_and_overrides_reach_the_weights():
    cfg = from_dict(
        {"on_policy": {"enabled": True, "rounds": 3, "train": {"lr": 1e-5}}},
        [
            "on_policy.advantage_coef=0.5",
            "on_policy.ratio_min=0.5",
            "on_policy.ratio_max=3",
            "on_policy.baseline=batch_mean",
        ],
    )
    op = cfg.on_policy
    assert op.rounds == 3 and op.train == {"lr": 1e-5}
    w = op.weights()
    assert (w.c, w.w_min, w.w_max, w.baseline) == (0.5, 0.5, 3.0, "batch_mean")


@pytest.mark.parametrize(
    "over,field",
    [
        ({"rounds": 0}, "on_policy.rounds=0"),
        ({"steps_per_round": -1}, "on_policy.steps_per_round=-1"),
        ({"temperature": 0.0}, "on_policy.temperature=0.0"),
        ({"n_samples": 0}, "on_policy.n_samples=0"),
        ({"max_new_tokens": 4096}, "on_policy.max_new_tokens=4096"),
        ({"top_p": 0.0}, "on_policy.top_p=0.0"),
        ({"advantage_coef": 0.0}, "on_policy.advantage_coef=0.0"),
        ({"advantage_coef": float("inf")}, "on_policy.advantage_coef=inf"),
        ({"ratio_min": -0.1}, "on_policy.ratio_min=-0.1"),
        ({"ratio_max": 0.0}, "on_policy.ratio_max=0.0"),
        ({"ratio_min": 3.0, "ratio_max": 2.0}, "on_policy.ratio_min=3.0"),
        ({"eos_rate_min": 1.5}, "on_policy.eos_rate_min=1.5"),
        ({"mean_length_min": -1.0}, "on_policy.mean_length_min=-1.0"),
        ({"mean_length_max": 0.0}, "on_policy.mean_length_max=0.0"),
        ({"mean_length_min": 50.0, "mean_length_max": 10.0}, "on_policy.mean_length_min=50.0"),
        ({"start": "scratch"}, "on_policy.start='scratch'"),
        ({"baseline": "median"}, "on_policy.baseline='median'"),
        ({"prompts_per_round": 0}, "on_policy.prompts_per_round=0"),
        ({"engine": {"batch_size": 0}}, "on_policy.engine.batch_size=0"),
        ({"train": {"lr": -1.0}}, "on_policy.train.lr=-1.0"),
        ({"train": {"nonsense": 1}}, "on_policy.train.nonsense"),
        ({"train": {"rescore_every": 2}}, "on_policy.train.rescore_every=2"),
        ({"train": {"max_steps": 5}}, "on_policy.train.max_steps: set by each round"),
        ({"train": {"init_checkpoint": "x"}}, "on_policy.train.init_checkpoint: set by"),
    ],
)
def test_errors_name_the_field(over, field):
    with pytest.raises(ConfigError) as e:
        from_dict({"on_policy": over})
    assert field in str(e.value)


def test_unknown_key_names_the_section():
    with pytest.raises(ConfigError, match=r"on_policy\.samples"):
        from_dict({"on_policy": {"samples": 3}})
