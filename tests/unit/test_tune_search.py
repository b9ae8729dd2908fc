"""What a Tune trial is judged on and what a space may hold: several training seeds per
trial (their mean, sd and per-seed values), a minimum of validation problems, entropy-aware
weight fields and whole presets in the space, and a baseline point the sweep keeps unless
a trial beats it beyond the seeds' noise. No Ray Tune run: the pure parts, and the
per-seed driver with its training and Tune's report stubbed."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc.config import ConfigError, from_dict
from raydc.method.weights import preset
from raydc.tune import (
    check_entropy,
    check_space,
    check_val_size,
    choose,
    eval_problems,
    gating_fields,
    held_out_prompts,
    judge,
    judged_eval,
    paired_stderr,
    param_space,
    reports_per_trial,
    results_table,
    scored_prompt_keys,
    trial_config,
    trial_seeds,
)


def _cfg(space=None, train=None, score=None, weights=None, evals=None, **tune):
    return from_dict(
        {
            "weights": weights or {"preset": "discord"},
            "score": score or {},
            "eval": evals or {},
            "train": {"val_share": 0.1, **(train or {})},
            "tune": {"enabled": True, "space": space or {"weights.tau": [0.5, 1.0]}, **tune},
        }
    )


def _jsonl(path, n):
    path.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": "1"}) + "\n" for i in range(n))
    )
    return str(path)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "tune, field",
    [
        ({"seeds": 0}, r"tune\.seeds=0: must be > 0"),
        ({"val_problems": 0}, r"tune\.val_problems=0: must be > 0"),
        ({"min_val_problems": -1}, r"tune\.min_val_problems=-1: must be >= 0"),
        # val_nll is measured on train.val_share's held-out prompts, not on eval problems
        (
            {"metric": "val_nll", "val_problems": 300},
            r"tune\.val_problems=300: sets the problems of the eval",
        ),
        (
            {"metric": "val_nll", "val_path": "val.jsonl"},
            r"tune\.val_path='val\.jsonl': sets the problems",
        ),
        (
            {"metric": "val_accuracy", "val_problems": 100, "min_val_problems": 300},
            r"tune\.val_problems=100: below tune\.min_val_problems=300",
        ),
        # the default minimum is 300
        ({"val_problems": 100}, r"tune\.val_problems=100: below tune\.min_val_problems=300"),
        (
            {"seeds": 2, "space": {"train.seed": [0, 1]}},
            r"tune\.space\.train\.seed: with tune\.seeds=2",
        ),
        ({"baseline_margin": -0.5}, r"tune\.baseline_margin=-0\.5: must be >= 0"),
    ],
)
def test_tune_fields_are_checked_when_the_config_loads(tune, field):
    with pytest.raises(ConfigError, match=field):
        _cfg(**tune)


def test_the_defaults_judge_a_trial_on_300_graded_problems_and_two_seeds_to_the_end(tmp_path):
    """The quality benchmark's finding (docs/tuning.md): graded accuracy on >= 300 held-out
    problems, two training seeds, no early stopping; the example tune.yaml is a smoke of the
    sweep's mechanics and keeps its cheap settings explicitly."""
    tc = _cfg().tune
    assert (tc.num_samples, tc.metric, tc.resolved_mode, tc.scheduler) == (
        8, "val_accuracy", "max", "none"
    )  # fmt: skip
    assert (tc.seeds, tc.val_path, tc.val_problems, tc.min_val_problems) == (2, "", None, 300)
    assert tc.baseline == {} and tc.baseline_margin == 1.0
    assert trial_seeds(_cfg(train={"seed": 7})) == [7, 8]
    # the default minimum refuses an eval of fewer problems before any trial
    short = _jsonl(tmp_path / "short.jsonl", 299)
    with pytest.raises(ConfigError, match=r"tune\.min_val_problems=300: .* on 299 validation"):
        check_space(_cfg(evals={"path": short}))
    check_space(_cfg(evals={"path": _jsonl(tmp_path / "eval.jsonl", 300)}))

    from raydc.config import load_config
    from raydc.pipeline import CONFIG_DIR

    smoke = load_config(CONFIG_DIR / "tune.yaml").tune
    assert (smoke.num_samples, smoke.metric, smoke.scheduler) == (4, "val_nll", "asha")
    assert (smoke.seeds, smoke.min_val_problems) == (1, 0)


SPACE = {
    "weights.preset": ["sft", "discord"],
    "weights.tau": {"type": "loguniform", "low": 0.5, "high": 2.0},
    "train.warmup_steps": {"type": "randint", "low": 0, "high": 4},
}


@pytest.mark.parametrize(
    "baseline, error",
    [
        ({"weights.preset": "sft", "weights.tau": 1.0}, r"tune\.baseline: names no value .*warmup"),
        (
            {"weights.preset": "sft", "weights.tau": 1.0, "train.warmup_steps": 0, "train.lr": 1},
            r"tune\.baseline\.train\.lr: not a key of tune\.space",
        ),
        (
            {"weights.preset": "dft", "weights.tau": 1.0, "train.warmup_steps": 0},
            r"tune\.baseline\.weights\.preset='dft': not one of",
        ),
        (
            {"weights.preset": "sft", "weights.tau": 4.0, "train.warmup_steps": 0},
            r"tune\.baseline\.weights\.tau=4\.0: outside \[0\.5, 2\.0\]",
        ),
        (
            {"weights.preset": "sft", "weights.tau": 1.0, "train.warmup_steps": 4},
            r"tune\.baseline\.train\.warmup_steps=4: randint draws integers in \[low, high\)",
        ),
    ],
)
def test_a_baseline_names_one_value_of_the_space_per_key(baseline, error):
    with pytest.raises(ConfigError, match=error):
        _cfg(space=SPACE, baseline=baseline)
    ok = _cfg(
        space=SPACE,
        baseline={"weights.preset": "sft", "weights.tau": 1.0, "train.warmup_steps": 0},
        metric="val_nll",  # judged on train.val_share: no eval problems to count
    )
    check_space(ok)


def test_a_baseline_that_is_invalid_as_a_whole_fails_before_the_sweep():
    space = {"weights.preset": ["tis", "iw_seq"], "weights.w_min": [0.0, 3.0]}
    cfg = _cfg(space=space, baseline={"weights.preset": "tis", "weights.w_min": 3.0})
    with pytest.raises(ConfigError, match=r"tune\.baseline: .* invalid config: .*w_min"):
        check_space(cfg)


# ----------------------------------------------------------------------------- the space


ENTROPY_SPACE = {
    "weights.preset": ["sft", "eaft", "das_token_mix"],
    "weights.nll_mix": {"type": "uniform", "low": 0.0, "high": 1.0},
    "weights.gate": ["none", "conflict", "entropy_power"],
    "weights.gate_h": {"type": "loguniform", "low": 0.25, "high": 4.0},
    "weights.sign": [1, -1],
}


def test_entropy_gate_nll_mix_and_presets_are_searchable():
    from ray.tune.search.sample import Categorical, Float

    cfg = _cfg(space=ENTROPY_SPACE, train={"student_ref": "current"}, metric="val_nll")
    check_space(cfg)
    space = param_space(cfg)
    assert space["weights.preset"].categories == ["sft", "eaft", "das_token_mix"]
    assert space["weights.gate"].categories == ["none", "conflict", "entropy_power"]
    assert isinstance(space["weights.nll_mix"], Float) and space["weights.nll_mix"].upper == 1.0
    assert isinstance(space["weights.gate_h"], Float) and isinstance(
        space["weights.sign"], Categorical
    )
    # grid enumerates the lists, presets included
    grid = param_space(_cfg(space={"weights.preset": ["sft", "eaft"]}, search_alg="grid"))
    assert grid["weights.preset"] == {"grid_search": ["sft", "eaft"]}


def test_a_preset_choice_expands_then_the_other_dotted_fields_apply():
    cfg = _cfg(space=ENTROPY_SPACE, train={"student_ref": "current"})
    for name in ("sft", "eaft", "das_token_mix"):
        assert trial_config(cfg, {"weights.preset": name}).weights == preset(name)
    sample = {"weights.preset": "das_token_mix", "weights.gate": "conflict", "weights.gate_h": 0.5}
    got = trial_config(cfg, sample).weights
    assert got == preset("das_token_mix", gate="conflict", gate_h=0.5)
    # nll_mix = 1 turns any weighting into SFT's weights; the field reaches the trial
    assert (
        trial_config(
            cfg, {"weights.preset": "das_token_mix", "weights.nll_mix": 1.0}
        ).weights.nll_mix
        == 1.0
    )


def test_values_out_of_a_weight_fields_range_name_the_field():
    cfg = _cfg(space={"weights.nll_mix": {"type": "uniform", "low": 0.0, "high": 1.5}})
    with pytest.raises(ConfigError, match=r"tune\.space\.weights\.nll_mix: value 1\.5 .*\[0, 1\]"):
        check_space(cfg)
    with pytest.raises(ConfigError, match=r"tune\.space\.weights\.gate: value 'sometimes'"):
        check_space(_cfg(space={"weights.gate": ["none", "sometimes"]}))
    with pytest.raises(ConfigError, match=r"tune\.space\.weights\.gate_h: value 0"):
        check_space(_cfg(space={"weights.gate_h": [0, 1.0]}))


def test_a_gate_without_any_entropy_source_fails_at_config_time():
    """score.entropy=off and student_ref=init: no trial could read an entropy."""
    off = {"entropy": "off"}
    with pytest.raises(
        ConfigError, match=r"tune\.space\.weights\.gate: value 'conflict' .*entropy"
    ):
        check_space(_cfg(space={"weights.gate": ["none", "conflict"]}, score=off))
    with pytest.raises(ConfigError, match=r"tune\.space\.weights\.preset: value 'eaft' .*entropy"):
        check_space(_cfg(space={"weights.preset": ["sft", "eaft"]}, score=off))
    # The training forward computes it under student_ref=current
    live = _cfg(
        space={"weights.gate": ["none", "conflict"]},
        score=off,
        train={"student_ref": "current"},
        metric="val_nll",
    )
    check_space(live)
    assert trial_config(live, {"weights.gate": "conflict"}).weights.gate == "conflict"
    # score.entropy=auto stores it when the space can gate
    assert _cfg(space={"weights.preset": ["sft", "eaft"]}).stores_entropy()
    assert not _cfg(space={"weights.preset": ["sft", "discord"]}).stores_entropy()


@pytest.mark.parametrize(
    "space, weights, train, expected",
    [
        ({"weights.gate": ["none", "conflict"]}, None, None, ["weights.gate"]),
        ({"weights.gate": ["none", "conflict"]}, None, {"student_ref": "current"}, []),
        ({"weights.preset": ["sft", "eaft"]}, None, None, ["weights.preset"]),
        ({"weights.preset": ["sft", "discord"]}, None, None, []),
        # a gated base weighting: replaced by every preset of the space, or kept
        ({"weights.preset": ["sft", "discord"]}, {"preset": "eaft"}, None, []),
        ({"weights.tau": [0.5, 1.0]}, {"preset": "eaft"}, None, ["weights"]),
        ({"weights.gate": ["none"]}, {"preset": "eaft"}, None, []),
        # init among the searched student_ref values: a gated trial may read stored scores
        (
            {"train.student_ref": ["init", "current"], "weights.gate": ["none", "conflict"]},
            None,
            {"student_ref": "current"},
            ["weights.gate"],
        ),
    ],
)
def test_gating_fields_name_where_a_trial_would_read_the_stored_entropy(
    space, weights, train, expected
):
    assert gating_fields(_cfg(space=space, weights=weights, train=train)) == expected


def _store(folder, columns: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text("{}")
    pq.write_table(pa.table(columns), folder / "part-0.parquet")
    return str(folder)


def test_a_space_that_gates_on_scores_without_entropy_is_refused_before_the_trials(tmp_path):
    cols = {"row_id": ["a", "b"], "prompt_id": ["p", "p"], "num_tokens": [3, 4]}
    bare = _store(tmp_path / "bare", cols)
    cfg = _cfg(space={"weights.gate": ["none", "conflict"]})
    with pytest.raises(
        ConfigError, match=r"tune\.space\.weights\.gate: .*have none.*score\.entropy=on"
    ):
        check_entropy(cfg, bare)
    check_entropy(
        _cfg(space={"weights.gate": ["none", "conflict"]}, train={"student_ref": "current"}), bare
    )
    with_h = _store(tmp_path / "with_h", {**cols, "student_entropy": [[0.1, 0.2], [0.3]]})
    check_entropy(cfg, with_h)


# ----------------------------------------------------------------------------- judging


def test_trial_seeds_start_at_the_train_seed():
    assert trial_seeds(_cfg(train={"seed": 7}, seeds=3)) == [7, 8, 9]
    assert trial_seeds(_cfg(train={"seed": 7}, seeds=1)) == [7]


def test_judge_takes_the_mean_over_seeds_and_reports_each():
    got = judge([0.5, 0.7, 0.6], "val_accuracy", "max")
    assert got["val_accuracy"] == pytest.approx(0.6)
    assert got["val_accuracy_sd"] == pytest.approx(0.1)  # deviations -0.1, 0.1, 0: 0.02 / 2
    assert got["val_accuracy_per_seed"] == [0.5, 0.7, 0.6] and got["seeds_done"] == 3
    one = judge([2.5], "val_nll", "min")
    assert one["val_nll"] == 2.5 and one["val_nll_sd"] is None and one["seeds_done"] == 1


def test_a_seed_without_a_finite_value_makes_the_trial_the_worst():
    assert judge([2.0, math.nan], "val_nll", "min")["val_nll"] == math.inf
    assert judge([0.4, math.nan], "val_accuracy", "max")["val_accuracy"] == -math.inf
    with pytest.raises(ValueError, match="no per-seed value"):
        judge([], "val_nll", "min")


def test_paired_stderr_of_the_per_seed_difference():
    # d = 0.1, 0.2, 0.0: mean 0.1, sample variance 0.01, stderr sqrt(0.01 / 3)
    assert paired_stderr([0.6, 0.8, 0.7], [0.5, 0.6, 0.7]) == pytest.approx(math.sqrt(0.01 / 3))
    assert paired_stderr([0.6], [0.5]) is None  # one seed: no noise estimate
    assert paired_stderr(None, [0.5, 0.6]) is None


def _row(tid, metric, per_seed, **fields):
    return {"trial_id": tid, "val_accuracy": metric, "val_accuracy_per_seed": per_seed, **fields}


def test_choose_keeps_the_baseline_unless_a_trial_beats_it_beyond_the_noise():
    sft = _row("b", 0.60, [0.6, 0.5, 0.7], **{"weights.preset": "sft"})
    # leads by 0.05; paired d = 0.1, 0.0, 0.05: sd 0.05, stderr 0.05 / sqrt(3) = 0.0289
    strong = _row("a", 0.65, [0.7, 0.5, 0.75], **{"weights.preset": "eaft"})
    picked = choose([strong, sft], "val_accuracy", "max", {"weights.preset": "sft"}, 1.0)
    assert picked["trial_id"] == "a" and picked["baseline"]["kept"] is False
    assert picked["baseline"]["lead_of_best"] == pytest.approx(0.05)
    assert picked["baseline"]["stderr"] == pytest.approx(0.05 / math.sqrt(3))
    # at 2 stderr (0.0577) the same lead is noise: the baseline stays
    picked = choose([strong, sft], "val_accuracy", "max", {"weights.preset": "sft"}, 2.0)
    assert picked["trial_id"] == "b" and picked["baseline"]["kept"] is True
    # no baseline configured, or none of its trials finished: the best
    assert choose([strong, sft], "val_accuracy", "max", {}, 1.0)["trial_id"] == "a"
    assert (
        choose([strong], "val_accuracy", "max", {"weights.preset": "sft"}, 1.0)["baseline"] is None
    )


def test_an_accuracy_lead_must_also_clear_the_binomial_noise_of_the_problems():
    base = _row("b", 0.60, None, **{"weights.preset": "sft"})
    best = _row("a", 0.65, None, **{"weights.preset": "eaft"})
    # one seed, 300 problems: sqrt(2 * 0.6 * 0.4 / 300) = 0.04 < the lead 0.05
    picked = choose([best, base], "val_accuracy", "max", {"weights.preset": "sft"}, 1.0, 300)
    assert picked["trial_id"] == "a"
    assert picked["baseline"]["binomial_stderr"] == pytest.approx(0.04)
    assert picked["baseline"]["paired_stderr"] is None
    # 1.5 x 0.04 = 0.06 > 0.05: the lead is noise, SFT stays
    assert choose([best, base], "val_accuracy", "max", {"weights.preset": "sft"}, 1.5, 300)[
        "baseline"
    ]["kept"]
    # two seeds halve the binomial variance: sqrt(0.48 / 600) = 0.0283; the paired error
    # of d = 0.1, 0.0 is 0.05 and the larger one counts
    base2 = _row("b", 0.60, [0.6, 0.6], **{"weights.preset": "sft"})
    best2 = _row("a", 0.65, [0.7, 0.6], **{"weights.preset": "eaft"})
    info = choose([best2, base2], "val_accuracy", "max", {"weights.preset": "sft"}, 1.2, 300)[
        "baseline"
    ]
    assert info["binomial_stderr"] == pytest.approx(math.sqrt(0.48 / 600))
    assert info["paired_stderr"] == pytest.approx(0.05) and info["stderr"] == pytest.approx(0.05)
    assert info["kept"] is True  # a lead of 0.05 is not more than 1.2 x 0.05


def test_choose_on_a_metric_to_minimise_and_with_one_seed():
    base = {"trial_id": "b", "val_nll": 1.00, "val_nll_per_seed": None, "weights.tau": 1.0}
    best = {"trial_id": "a", "val_nll": 0.99, "val_nll_per_seed": None, "weights.tau": 2.0}
    picked = choose([best, base], "val_nll", "min", {"weights.tau": 1.0}, 1.0)
    # one seed: no noise estimate, so any lead (0.01 lower NLL) replaces the baseline
    assert picked["trial_id"] == "a" and picked["baseline"]["lead_of_best"] == pytest.approx(0.01)
    assert choose([base, best], "val_nll", "min", {"weights.tau": 1.0}, 1.0)["baseline"]["kept"]


def test_results_table_carries_the_seeds_and_sorts_by_the_mean():
    cfg = _cfg(space={"weights.preset": ["sft", "eaft"]}, metric="val_accuracy", seeds=2)
    grid = [
        SimpleNamespace(
            metrics={
                **judge(vals, "val_accuracy", "max"),
                "final": final,
                "step": 8,
                "steps_trained": 8 * len(vals),
                "val_problems": 300,
                "checkpoint_path": f"/ckpt/{name}",
            },
            config={"weights.preset": name},
            error=None,
            path=f"/trials/{name}",
        )
        for name, vals, final in (
            ("sft", [0.5, 0.7], True),
            ("eaft", [0.8, 0.8], True),
            ("x", [0.9], False),
        )
    ]
    rows = results_table(grid, cfg)
    assert [r["weights.preset"] for r in rows] == ["x", "eaft", "sft"]
    x, eaft, sft = rows
    assert x["status"] == "stopped early" and x["seeds_done"] == 1 and x["steps_trained"] == 8
    assert eaft["status"] == "completed" and eaft["val_accuracy_per_seed"] == [0.8, 0.8]
    assert sft["val_accuracy"] == pytest.approx(0.6) and sft["val_accuracy_sd"] == pytest.approx(
        math.sqrt(0.02)
    )
    finished = [r for r in rows if r["status"] == "completed"]
    # eaft's lead 0.2 over sft; paired d = 0.3, 0.1: stderr 0.1
    picked = choose(finished, "val_accuracy", "max", {"weights.preset": "sft"}, 1.0)
    assert picked["weights.preset"] == "eaft" and picked["baseline"]["stderr"] == pytest.approx(0.1)
    assert (
        choose(finished, "val_accuracy", "max", {"weights.preset": "sft"}, 2.5)["weights.preset"]
        == "sft"
    )


def test_reports_per_trial_are_asha_time_axis():
    one = {"seeds": 1, "scheduler": "asha"}
    cfg = _cfg(
        train={"max_steps": 16, "log_every": 4, "checkpoint_every": 8}, metric="val_nll", **one
    )
    assert reports_per_trial(cfg) == 4  # steps 4, 8, 12, then the final report at 16
    cfg = _cfg(
        train={"max_steps": 10, "log_every": 4, "checkpoint_every": 6}, metric="val_nll", **one
    )
    assert reports_per_trial(cfg) == 4  # steps 4, 6, 8 and the final one
    acc = _cfg(
        train={"max_steps": 16, "log_every": 4, "checkpoint_every": 8},
        metric="val_accuracy",
        **one,
    )
    assert reports_per_trial(acc) == 5  # and the eval's report after training
    assert reports_per_trial(_cfg(seeds=3)) == 3  # one report per finished seed


# ----------------------------------------------------------------------------- val size


def test_judged_eval_swaps_in_the_validation_problems(tmp_path):
    ev = _jsonl(tmp_path / "eval.jsonl", 5)
    val = _jsonl(tmp_path / "val.jsonl", 7)
    base = {"path": ev, "num_prompts": 3}
    acc = {"metric": "val_accuracy", "min_val_problems": 0}  # files of a few problems
    cfg = _cfg(evals=base, **acc)
    assert judged_eval(cfg).eval.path == ev and eval_problems(cfg) == 3
    cfg = _cfg(evals=base, val_path=val, **acc)
    assert judged_eval(cfg).eval.path == val and eval_problems(cfg) == 7  # all of val_path
    assert judged_eval(cfg).eval.grader == cfg.eval.grader
    cfg = _cfg(evals=base, val_path=val, val_problems=6, **acc)
    assert eval_problems(cfg) == 6
    cfg = _cfg(evals=base, val_problems=4, **acc)
    assert judged_eval(cfg).eval.path == ev and eval_problems(cfg) == 4


def test_too_few_eval_problems_fail_naming_the_fields(tmp_path):
    ev = _jsonl(tmp_path / "eval.jsonl", 5)
    cfg = _cfg(metric="val_accuracy", evals={"path": ev}, min_val_problems=300)
    with pytest.raises(
        ConfigError,
        match=r"tune\.min_val_problems=300: .* on 5 validation .*eval\.path, at most eval\.num_prompts",
    ):
        check_space(cfg)
    check_space(_cfg(metric="val_accuracy", evals={"path": ev}, min_val_problems=5))
    cfg = _cfg(metric="val_accuracy", evals={"path": ev}, val_path=ev, min_val_problems=6)
    with pytest.raises(ConfigError, match=r"on 5 .*\(all of tune\.val_path\)"):
        check_space(cfg)
    cfg = _cfg(metric="val_accuracy", evals={"path": ev}, val_problems=9, min_val_problems=6)
    with pytest.raises(ConfigError, match=r"on 5 .*\(eval\.path, at most tune\.val_problems\)"):
        check_space(cfg)


def test_too_few_held_out_prompts_for_val_nll_fail_naming_val_share():
    cfg = _cfg(metric="val_nll", min_val_problems=300, seeds=2, train={"val_share": 0.05})
    with pytest.raises(
        ConfigError,
        match=r"tune\.min_val_problems=300: .* on 40 .*train\.val_share=0\.05.*\[0, 1\]",
    ):
        check_val_size(cfg, 40)
    check_val_size(cfg, 300)


def test_held_out_prompts_count_distinct_prompts_under_the_trainers_split():
    from raydc.train.data import is_val_key

    keys = [f"p{i}" for i in range(2000)]
    one = held_out_prompts(keys, 0.25, [0])
    assert 400 <= one <= 600  # a quarter of 2000, up to hashing noise
    assert held_out_prompts(keys * 3, 0.25, [0]) == one  # a prompt's candidates count once
    per_seed = [held_out_prompts(keys, 0.25, [s]) for s in (0, 1, 2)]
    assert held_out_prompts(keys, 0.25, [0, 1, 2]) == min(per_seed)
    assert len(set(per_seed)) > 1  # the split follows the training seed
    assert one == sum(is_val_key(k, 0.25, 0) for k in keys)  # the trainer's own membership


def test_scored_prompt_keys_group_by_prompt_else_row(tmp_path):
    by_prompt = _store(
        tmp_path / "p",
        {"row_id": ["r1", "r2", "r3"], "prompt_id": ["a", "a", "b"], "num_tokens": [1, 1, 1]},
    )
    assert scored_prompt_keys(by_prompt) == ["a", "a", "b"]
    by_row = _store(tmp_path / "r", {"row_id": ["r1", "r2"], "num_tokens": [1, 1]})
    assert scored_prompt_keys(by_row) == ["r1", "r2"]


# ----------------------------------------------------------------------------- the trial


def test_a_trial_with_several_seeds_reports_the_running_mean_and_reuses_finished_seeds(
    tmp_path, monkeypatch
):
    """``_several_seeds`` with training and eval stubbed: one report per seed with the mean
    so far, final only at the last, the first seed's checkpoint; a retried trial reruns
    only the seeds without a judged.json."""
    import ray.tune

    import raydc.tune as rt

    cfg = _cfg(seeds=3, train={"seed": 5}, metric="val_nll")
    values = {5: 1.0, 6: 2.0, 7: 4.0}
    fitted, reports = [], []

    def fake_fit(scfg, run_dir, name, callbacks, **fit):
        fitted.append(scfg.train.seed)
        assert callbacks == [] and name == f"t1-seed{scfg.train.seed}"
        return SimpleNamespace(seed=scfg.train.seed)

    def fake_judge(scfg, result, run_dir):
        return {
            "seed": result.seed,
            "checkpoint_path": f"/ckpt/{result.seed}",
            "model_dir": None,
            "step": 10,
            "val_problems": None,
            "value": values[result.seed],
        }

    monkeypatch.setattr(rt, "_fit", fake_fit)
    monkeypatch.setattr(rt, "_judge_run", fake_judge)
    monkeypatch.setattr(ray.tune, "report", reports.append)
    rt._several_seeds(cfg, tmp_path, "t1", {})
    assert fitted == [5, 6, 7]
    assert [r["val_nll"] for r in reports] == pytest.approx([1.0, 1.5, 7 / 3])
    assert [r["final"] for r in reports] == [False, False, True]
    assert reports[-1]["val_nll_per_seed"] == [1.0, 2.0, 4.0]
    assert {r["checkpoint_path"] for r in reports} == {"/ckpt/5"}
    assert [r["steps_trained"] for r in reports] == [10, 20, 30]
    assert json.loads((tmp_path / "seed_6" / "judged.json").read_text())["value"] == 2.0

    # A retry after seed 7's run was lost: seeds 5 and 6 are read back, 7 trains again.
    (tmp_path / "seed_7" / "judged.json").unlink()
    fitted.clear()
    reports.clear()
    rt._several_seeds(cfg, tmp_path, "t1", {})
    assert fitted == [7] and reports[-1]["val_nll"] == pytest.approx(7 / 3)


def test_run_tune_refuses_too_few_held_out_prompts_before_any_trial(tmp_path):
    """val_nll's count is known once the rows are scored: run_tune checks it (and the
    entropy the space needs) before it asks Ray for anything."""
    from raydc.tune import run_tune

    n = 40
    scored = _store(
        tmp_path / "scored",
        {"row_id": [f"r{i}" for i in range(n)], "prompt_id": [f"p{i // 2}" for i in range(n)]},
    )
    cfg = _cfg(metric="val_nll", min_val_problems=300, seeds=2, train={"val_share": 0.5})
    # 20 prompts, about half held out under each seed: far below 300
    with pytest.raises(ConfigError, match=r"tune\.min_val_problems=300: .* on \d+ validation"):
        run_tune(cfg, scored, tmp_path / "tune")
    gated = _cfg(space={"weights.preset": ["sft", "eaft"]}, metric="val_nll")
    with pytest.raises(ConfigError, match=r"tune\.space\.weights\.preset: gives trials an entropy"):
        run_tune(gated, scored, tmp_path / "tune")
    assert not (tmp_path / "tune").exists()


def test_the_baseline_is_the_searchers_first_point():
    from raydc.tune import _searcher

    space = {
        "weights.preset": ["sft", "eaft", "das_token_mix"],
        "weights.nll_mix": {"type": "uniform", "low": 0.0, "high": 1.0},
    }
    baseline = {"weights.preset": "sft", "weights.nll_mix": 0.0}
    cfg = _cfg(space=space, baseline=baseline, train={"student_ref": "current"})
    optuna = _searcher(cfg)
    optuna.set_search_properties("val_nll", "min", param_space(cfg))
    assert optuna.suggest("t0") == baseline
    assert optuna.suggest("t1")["weights.preset"] in space["weights.preset"]
    assert _searcher(_cfg(space=space, baseline=baseline, search_alg="random")) is not None
    assert _searcher(_cfg(space=space, search_alg="random")) is None  # Tune's default
    grid = _cfg(
        space={"weights.preset": ["sft", "eaft"]},
        baseline={"weights.preset": "sft"},
        search_alg="grid",
    )
    assert _searcher(grid) is None  # the grid holds the baseline already
