"""raydc.method.opd: on-policy rounds' statistics, guards and cost, hand-computed."""

from __future__ import annotations

import math

import pytest

from raydc.method.opd import (
    OnPolicyGuardError,
    add_flops,
    check_band,
    finite_or_none,
    reverse_kl_stats,
    round_flops,
    sample_stats,
)


def test_sample_stats_hand_computed():
    st = sample_stats([4, 10, 10, 6], ["stop", "length", "length", "stop"])
    assert st["samples"] == 4 and st["sampled_tokens"] == 30
    assert st["mean_length"] == pytest.approx(7.5)
    assert st["eos_rate"] == pytest.approx(0.5)
    assert st["truncation_share"] == pytest.approx(0.5)
    assert (st["stopped"], st["truncated"]) == (2, 2)
    empty = sample_stats([], [])
    assert empty["samples"] == 0 and empty["eos_rate"] == 0.0
    with pytest.raises(ValueError, match="2 lengths but 1 finish"):
        sample_stats([1, 2], ["stop"])


def test_reverse_kl_counts_teacher_gaps_and_averages_the_rest():
    s = [[0.0, -1.0, -2.0, -0.5], [0.0, -3.0, -1.0]]
    t = [[0.0, -1.5, -9.9, -0.25], None]
    m = [[False, True, True, True], [False, True, True]]
    tm = [[True, True, False, True], None]
    st = reverse_kl_stats(s, t, m, tm)
    # row 0: known loss tokens 1 and 3: (-1 + 1.5) + (-0.5 + 0.25) = 0.25 over 2
    assert st["mean_reverse_kl"] == pytest.approx(0.125)
    assert st["loss_tokens"] == 5
    assert st["teacher_known_tokens"] == 2
    assert st["teacher_gap_tokens"] == 3  # row 0's token 2 and row 1's two (no teacher)
    nothing = reverse_kl_stats([[0.0]], [None], [[True]], [None])
    assert math.isnan(nothing["mean_reverse_kl"]) and nothing["teacher_gap_tokens"] == 1


def test_band_check_names_the_field():
    no_eos = sample_stats([16] * 5, ["length"] * 5)
    with pytest.raises(OnPolicyGuardError, match=r"on_policy\.eos_rate_min=0\.5: round 1") as e:
        check_band(no_eos, eos_rate_min=0.5, round_index=1, max_new_tokens=16)
    assert "0 of 5" in str(e.value) and "on_policy.max_new_tokens=16" in str(e.value)
    ok = sample_stats([5, 7], ["stop", "stop"])
    check_band(ok, eos_rate_min=1.0, mean_length_min=6.0, mean_length_max=6.0)  # inside: fine
    with pytest.raises(OnPolicyGuardError, match=r"on_policy\.mean_length_min=6\.5"):
        check_band(ok, mean_length_min=6.5)
    with pytest.raises(OnPolicyGuardError, match=r"x\.mean_length_max=5"):
        check_band(ok, mean_length_max=5, where="x")
    with pytest.raises(OnPolicyGuardError, match="none to check"):
        check_band(sample_stats([], []))


def test_round_flops_hand_computed():
    f = round_flops(
        student_params=1000,
        teacher_params=5000,
        generated_tokens=30,
        student_scored_tokens=40,
        teacher_scored_tokens=44,
        trained_tokens=100,
        extra_forward_tokens=10,
    )
    assert f["generation"] == 2 * 1000 * 30
    assert f["student_scoring"] == 2 * 1000 * 40
    assert f["teacher_scoring"] == 2 * 5000 * 44
    assert f["training"] == 6 * 1000 * 100 + 2 * 1000 * 10
    assert f["total"] == 60_000 + 80_000 + 440_000 + 620_000
    both = add_flops(f, f)
    assert both["total"] == 2 * f["total"] and both["generation"] == 120_000
    with pytest.raises(ValueError, match="teacher_params"):
        round_flops(1, -1, 0, 0, 0, 0)


def test_finite_or_none():
    assert finite_or_none(float("nan")) is None and finite_or_none(0.5) == 0.5
