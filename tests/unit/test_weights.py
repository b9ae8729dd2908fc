"""Reference tests for raydc.method.weights: hand-computed tensors, limit cases, validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raydc.method.weights import (
    GRANULARITIES,
    PRESETS,
    WeightConfig,
    WeightConfigError,
    compute_weights,
    granular_logratio,
    preset,
    weight_diagnostics,
)

# One row, 5 positions: a prompt token (masked), then 4 response tokens.
S = torch.tensor([[0.0, -0.5, -1.0, -2.0, -0.1]])
T = torch.tensor([[0.0, -1.0, -0.5, -1.0, -0.1]])
M = torch.tensor([[False, True, True, True, True]])
D = [0.5, -0.5, -1.0, 0.0]  # s - t on the response tokens
H = torch.tensor([[0.0, 2.0, 0.2, 0.1, 4.0]])  # the student's entropy (nats) per position


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def resp(w):
    return w[0, 1:].tolist()


def test_token_sigmoid_hand_computed():
    cfg = WeightConfig(transform="sigmoid", c=2.0, b=0.0, tau=1.0)
    w = compute_weights(S, T, M, cfg)
    assert w[0, 0] == 0.0
    assert resp(w) == pytest.approx([2 * sig(d) for d in D], abs=1e-6)


def test_sigmoid_b_tau_and_sign():
    cfg = WeightConfig(sign=-1, transform="sigmoid", c=3.0, b=0.25, tau=2.0)
    w = compute_weights(S, T, M, cfg)
    assert resp(w) == pytest.approx([3 * sig((-d - 0.25) / 2.0) for d in D], abs=1e-6)


def test_sigmoid_is_one_at_ratio_one():
    cfg = preset("discord")
    s = torch.tensor([[-1.0, -2.0]])
    w = compute_weights(s, s.clone(), torch.ones(1, 2, dtype=torch.bool), cfg)
    assert w.tolist() == [[1.0, 1.0]]


def test_exp_clip_hand_computed():
    cfg = WeightConfig(transform="exp_clip", tau=0.5, w_min=0.2, w_max=2.0)
    w = compute_weights(S, T, M, cfg)
    expect = [min(max(math.exp(d / 0.5), 0.2), 2.0) for d in D]
    assert resp(w) == pytest.approx(expect, abs=1e-6)
    assert resp(w)[0] == pytest.approx(2.0)  # exp(1) clipped
    assert resp(w)[2] == pytest.approx(0.2)  # exp(-2) clipped


def test_mask_hand_computed():
    cfg = WeightConfig(transform="mask", lo=0.5, hi=2.0)
    w = compute_weights(S, T, M, cfg)
    # ratios exp(d) = 1.65, 0.61, 0.37, 1.0
    assert resp(w) == [1.0, 1.0, 0.0, 1.0]


def test_power_is_p_student_to_gamma():
    cfg = WeightConfig(transform="power", gamma=0.5, normalization="none")
    w = compute_weights(S, None, M, cfg)
    assert resp(w) == pytest.approx([math.exp(0.5 * s) for s in [-0.5, -1.0, -2.0, -0.1]])


def test_none_transform_and_floor():
    w = compute_weights(S, T, M, WeightConfig(transform="none"))
    assert resp(w) == [1.0] * 4
    cfg = WeightConfig(transform="mask", lo=0.5, hi=2.0, floor=0.25)
    w = compute_weights(S, T, M, cfg)
    assert resp(w) == pytest.approx([1.0, 1.0, 0.25, 1.0])


def test_no_teacher_uses_student_logprob():
    cfg = WeightConfig(transform="exp_clip", w_min=0.0, w_max=10.0)
    w = compute_weights(S, None, M, cfg)
    assert resp(w) == pytest.approx([math.exp(s) for s in [-0.5, -1.0, -2.0, -0.1]])


def u_of(granularity, **kw):
    cfg = WeightConfig(granularity=granularity, **kw)
    return granular_logratio(S, T, M, cfg, kw.pop("sentence_ids", None))


def test_granularity_hand_computed():
    cfg = WeightConfig
    assert resp(granular_logratio(S, T, M, cfg(granularity="token"))) == pytest.approx(D)
    prefix = [0.5, 0.0, -1.0 / 3, -0.25]
    assert resp(granular_logratio(S, T, M, cfg(granularity="prefix_mean"))) == pytest.approx(prefix)
    lam = 0.5
    ema, u = [], None
    for d in D:
        u = d if u is None else lam * u + (1 - lam) * d
        ema.append(u)
    got = granular_logratio(S, T, M, cfg(granularity="prefix_ema", lam=lam))
    assert resp(got) == pytest.approx(ema)
    mean = sum(D) / 4
    got = granular_logratio(S, T, M, cfg(granularity="sequence_mean"))
    assert resp(got) == pytest.approx([mean] * 4)
    got = granular_logratio(S, T, M, cfg(granularity="sequence_sum"))
    assert resp(got) == pytest.approx([sum(D)] * 4)
    sid = torch.tensor([[0, 0, 0, 1, 1]])
    got = granular_logratio(S, T, M, cfg(granularity="sentence"), sentence_ids=sid)
    assert resp(got) == pytest.approx([0.0, 0.0, -0.5, -0.5])
    # off the mask, u is 0
    for g in GRANULARITIES:
        u = granular_logratio(S, T, M, cfg(granularity=g), sentence_ids=sid)
        assert u[0, 0] == 0.0


def test_prefix_ema_skips_masked_gaps():
    s = torch.tensor([[-1.0, -3.0, -2.0, -5.0]])
    m = torch.tensor([[True, False, True, True]])
    u = granular_logratio(s, None, m, WeightConfig(granularity="prefix_ema", lam=0.5))
    assert u[0].tolist() == pytest.approx([-1.0, 0.0, -1.5, -3.25])


def test_sentence_mean_over_loss_tokens_only_and_across_rows():
    s = torch.tensor([[-1.0, -3.0, -5.0], [-2.0, -4.0, -6.0]])
    m = torch.tensor([[True, False, True], [True, True, True]])
    sid = torch.tensor([[0, 0, 0], [0, 1, 1]])
    u = granular_logratio(s, None, m, WeightConfig(granularity="sentence"), sid)
    assert u[0].tolist() == pytest.approx([-3.0, 0.0, -3.0])
    assert u[1].tolist() == pytest.approx([-2.0, -5.0, -5.0])


def test_per_sequence_rescales_to_mean_one():
    s = torch.tensor([[-0.1, -2.0, -3.0, 0.0], [-1.0, -1.5, 0.0, 0.0]])
    m = torch.tensor([[True, True, True, False], [True, True, False, False]])
    cfg = WeightConfig(transform="power", normalization="per_sequence")
    w = compute_weights(s, None, m, cfg)
    for b in range(2):
        assert w[b][m[b]].mean().item() == pytest.approx(1.0)
    assert w[0, 3] == 0 and w[1, 2] == 0
    raw = torch.exp(s[0, :3])
    assert w[0, :3].tolist() == pytest.approx((raw / raw.mean()).tolist(), rel=1e-5)


def test_weights_are_detached_and_zero_off_mask():
    s = S.clone().requires_grad_(True)
    t = T.clone().requires_grad_(True)
    h = H.clone().requires_grad_(True)
    for name in PRESETS:
        w = compute_weights(s, t, M, preset(name), student_entropy=h)
        assert not w.requires_grad
        assert w[0, 0] == 0.0


def test_masked_positions_do_not_matter():
    cfg = preset("discord", granularity="prefix_mean")
    w1 = compute_weights(S, T, M, cfg)
    s2, t2 = S.clone(), T.clone()
    s2[0, 0], t2[0, 0] = float("nan"), float("inf")  # garbage off the mask is fine
    w2 = compute_weights(s2, t2, M, cfg)
    assert torch.equal(w1, w2)


@pytest.mark.parametrize(
    "bad,msg",
    [
        (float("nan"), "NaN at row 0, position 2"),
        (float("inf"), r"\+inf at row 0, position 2"),
        (0.5, "positive"),
    ],
)
def test_bad_logprobs_raise(bad, msg):
    s = S.clone()
    s[0, 2] = bad
    with pytest.raises(ValueError, match=msg):
        compute_weights(s, T, M, preset("discord"))
    with pytest.raises(ValueError, match="teacher_logprobs"):
        compute_weights(T, s, M, preset("discord"))


def test_minus_inf_logprob_is_bounded():
    s = S.clone()
    s[0, 2] = float("-inf")
    for name in PRESETS:
        w = compute_weights(s, T, M, preset(name), student_entropy=H)
        assert torch.isfinite(w).all()


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        compute_weights(S[:, :3], T, M, preset("discord"))
    with pytest.raises(ValueError, match="sentence_ids has shape"):
        compute_weights(
            S, T, M, preset("discord", granularity="sentence"), sentence_ids=torch.zeros(1, 2)
        )


def test_sentence_granularity_needs_sentence_ids():
    with pytest.raises(WeightConfigError, match="granularity='sentence' needs sentence_ids"):
        compute_weights(S, T, M, preset("discord", granularity="sentence"))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(tau=0.0), "tau"),
        (dict(tau=-1.0), "tau"),
        (dict(w_min=3.0, w_max=2.0), "w_min"),
        (dict(sign=0), "sign"),
        (dict(granularity="word"), "granularity"),
        (dict(transform="softmax"), "transform"),
        (dict(normalization="mean"), "normalization"),
        (dict(floor=1.0), "floor"),
        (dict(lam=1.0), "lam"),
        (dict(lo=3.0, hi=2.0), "lo"),
        (dict(c=0.0), "c"),
        (dict(tau=float("nan")), "tau"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(WeightConfigError, match=rf"WeightConfig\.{field}="):
        WeightConfig(**kwargs)


def test_presets_match_method_table():
    assert preset("sft").transform == "none" and preset("sft").normalization == "none"
    d = preset("discord")
    assert (d.sign, d.granularity, d.transform, d.c, d.b, d.tau, d.normalization) == (
        1,
        "token",
        "sigmoid",
        2.0,
        0.0,
        1.0,
        "self_norm",
    )
    d = preset("das_token")
    assert (d.sign, d.granularity, d.transform, d.normalization) == (
        -1,
        "token",
        "sigmoid",
        "self_norm",
    )
    d = preset("iw_seq")
    assert (d.sign, d.granularity, d.transform, d.w_min, d.w_max, d.normalization) == (
        1,
        "sequence_mean",
        "exp_clip",
        0.0,
        16.0,
        "none",
    )
    d = preset("dft")
    assert (d.transform, d.gamma, d.normalization) == ("power", 1.0, "none")
    d = preset("tis")
    assert (d.granularity, d.transform, d.w_min, d.w_max, d.normalization) == (
        "sequence_mean",
        "exp_clip",
        0.0,
        2.0,
        "none",
    )
    assert preset("discord", tau=2.0).tau == 2.0
    with pytest.raises(WeightConfigError, match="unknown preset"):
        preset("nope")
    with pytest.raises(WeightConfigError, match="unknown WeightConfig field"):
        preset("discord", temperature=2.0)


logprob = st.floats(min_value=-50.0, max_value=0.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    s=st.lists(logprob, min_size=1, max_size=12),
    data=st.data(),
    c=st.floats(0.1, 10.0),
    tau=st.floats(0.05, 10.0),
    b=st.floats(-5.0, 5.0),
    sign=st.sampled_from([1, -1]),
)
def test_sigmoid_weights_in_open_interval(s, data, c, tau, b, sign):
    t = data.draw(st.lists(logprob, min_size=len(s), max_size=len(s)))
    st_, tt = torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64)
    m = torch.ones_like(st_, dtype=torch.bool)
    w = compute_weights(st_, tt, m, WeightConfig(sign=sign, c=c, tau=tau, b=b))
    assert (w >= 0).all() and (w <= c).all()
    # strictly inside (0, c) wherever the argument is not so large that fp32 saturates
    arg = (sign * (st_ - tt) - b) / tau
    inside = arg.abs() < 15
    assert (w[inside] > 0).all() and (w[inside] < c).all()


@settings(max_examples=200, deadline=None)
@given(
    s=st.lists(logprob, min_size=1, max_size=12),
    data=st.data(),
    w_min=st.floats(0.0, 1.0),
    span=st.floats(0.0, 20.0),
    tau=st.floats(0.05, 10.0),
    granularity=st.sampled_from(["token", "prefix_mean", "sequence_mean", "sequence_sum"]),
)
def test_exp_clip_in_bounds(s, data, w_min, span, tau, granularity):
    t = data.draw(st.lists(logprob, min_size=len(s), max_size=len(s)))
    w_max = w_min + span + 1e-3
    cfg = WeightConfig(
        transform="exp_clip", w_min=w_min, w_max=w_max, tau=tau, granularity=granularity
    )
    m = torch.ones(1, len(s), dtype=torch.bool)
    w = compute_weights(torch.tensor([s]), torch.tensor([t]), m, cfg)
    assert (w >= w_min * (1 - 1e-6)).all() and (w <= w_max * (1 + 1e-6)).all()


def test_diagnostics():
    s = torch.tensor([[-0.1, -2.0, -3.0, 0.0], [-1.0, -1.5, -0.2, -0.3]])
    t = torch.tensor([[-1.0, -0.5, -0.2, 0.0], [-1.0, -0.5, -4.0, -0.3]])
    m = torch.tensor([[True, True, True, False], [True, True, True, True]])
    cfg = preset("tis")
    cfg = cfg.replace(granularity="token")
    w = compute_weights(s, t, m, cfg)
    d = weight_diagnostics(w, m, cfg)
    wm = w[m].double()
    assert d["tokens"] == 7
    assert d["ess"] == pytest.approx(float(wm.sum() ** 2 / (wm**2).sum()))
    assert d["ess_fraction"] == pytest.approx(d["ess"] / 7)
    assert sum(d["histogram"]["counts"]) == 7
    at_max = float((wm >= 2.0 - 1e-6).double().mean())
    assert d["clip_shares"]["at_w_max"] == pytest.approx(at_max)
    assert at_max > 0
    assert d["mean_by_position"]["0-64"] == pytest.approx(float(wm.mean()))
    assert -1.0 <= d["corr_weight_length"] <= 1.0
    # uniform weights: ESS equals the token count
    d1 = weight_diagnostics(m.float(), m)
    assert d1["ess"] == pytest.approx(7.0)


# ----------------------------------------------------------------------------- gaps closed
# Each test below fails on a mutation the suite once let through.


def test_prefix_ema_weighs_the_past_by_lambda():
    # lam = 0.9: u_t = 0.9 u_{t-1} + 0.1 d_t (swapping lam and 1 - lam gives another value)
    got = granular_logratio(S, T, M, WeightConfig(granularity="prefix_ema", lam=0.9))
    u1 = 0.5
    u2 = 0.9 * u1 + 0.1 * -0.5
    u3 = 0.9 * u2 + 0.1 * -1.0
    u4 = 0.9 * u3 + 0.1 * 0.0
    assert resp(got) == pytest.approx([u1, u2, u3, u4])
    assert u2 == pytest.approx(0.4)


def test_mask_transform_ignores_tau():
    # ratio exp(d) = 3 is outside [0.5, 2]: masked at any tau (d / tau = 0.55 is inside)
    s = torch.tensor([[0.0, -1.0]])
    t = torch.tensor([[0.0, -1.0 - math.log(3.0)]])
    m = torch.tensor([[False, True]])
    for tau in (1.0, 2.0, 5.0):
        w = compute_weights(s, t, m, WeightConfig(transform="mask", lo=0.5, hi=2.0, tau=tau))
        assert w[0, 1] == 0.0, tau


def test_without_a_teacher_the_sign_does_not_apply():
    # d = log p_S whatever the sign: DFT-like weighting needs no teacher and no direction
    cfg = WeightConfig(transform="exp_clip", w_min=0.0, w_max=10.0, sign=-1)
    w = compute_weights(S, None, M, cfg)
    assert resp(w) == pytest.approx([math.exp(s) for s in [-0.5, -1.0, -2.0, -0.1]])
    with_t = compute_weights(S, T, M, cfg)
    assert resp(with_t) == pytest.approx([math.exp(-d) for d in D])


@pytest.mark.parametrize("normalization", ["none", "per_sequence", "self_norm"])
def test_masked_tokens_leave_the_denominator(normalization):
    from raydc.method.loss import weighted_token_loss
    from raydc.method.weights import loss_tokens

    # losses [1, 1, 10, 10]; the mask transform keeps the first two tokens (ratio 1) and
    # drops the last two (ratio e^3): the loss is the mean over the kept ones, 1.0.
    s = torch.zeros(1, 5)
    t = torch.tensor([[0.0, 0.0, 0.0, -3.0, -3.0]])
    m = torch.tensor([[False, True, True, True, True]])
    cfg = WeightConfig(transform="mask", lo=0.5, hi=2.0, normalization=normalization)
    w = compute_weights(s, t, m, cfg)
    assert resp(w) == [1.0, 1.0, 0.0, 0.0]
    loss = torch.tensor([[0.0, 1.0, 1.0, 10.0, 10.0]])
    kept = loss_tokens(w, m, cfg)
    assert kept.tolist() == [[False, True, True, False, False]]
    assert float(weighted_token_loss(loss, w, kept, normalization)) == pytest.approx(1.0)
    # with a floor nothing is dropped: every token keeps a weight
    floored = compute_weights(s, t, m, cfg.replace(floor=0.1))
    assert loss_tokens(floored, m, cfg).tolist() == m.tolist()


def test_where_the_teacher_is_silent_the_weight_is_exactly_one():
    # Position 2's teacher value is unknown: neutral whatever the student log-prob there
    # (student_ref=current or a re-scoring round gives another one than the stored).
    known = torch.tensor([[True, True, False, True, True]])
    cfg = preset("discord")
    for s2 in (-0.01, -1.0, -7.0):
        s = S.clone()
        s[0, 2] = s2
        w = compute_weights(s, T, M, cfg, teacher_mask=known)
        assert w[0, 2] == 1.0
        assert resp(w)[0] == pytest.approx(2 * sig(0.5))
    # In a granular mean the silent token counts as d = 0.
    u = granular_logratio(S, T, M, WeightConfig(granularity="sequence_mean"), None, known)
    assert resp(u) == pytest.approx([(0.5 + 0.0 - 1.0 + 0.0) / 4] * 4)
    # exp_clip: forced to 1 even where the clip bounds would not allow it
    clip = WeightConfig(transform="exp_clip", w_min=1.5, w_max=4.0)
    assert compute_weights(S, T, M, clip, teacher_mask=known)[0, 2] == 1.0


# ----------------------------------------------------------------------------- entropy gates
# H = [_, 2.0, 0.2, 0.1, 4.0] nats and s = log p_S = [_, -0.5, -1.0, -2.0, -0.1] on the
# response tokens.
H_RESP = [2.0, 0.2, 0.1, 4.0]
S_RESP = [-0.5, -1.0, -2.0, -0.1]


def conflict_gate(s, h, gate_h=1.0, gate_p=0.1, gate_tau=0.25):
    return 1 - sig((gate_h - h) / gate_tau) * sig((math.log(gate_p) - s) / gate_tau)


def test_conflict_gate_hand_computed():
    cfg = WeightConfig(transform="none", gate="conflict", normalization="none")
    w = compute_weights(S, T, M, cfg, student_entropy=H)
    assert w[0, 0] == 0.0
    expect = [conflict_gate(s, h) for s, h in zip(S_RESP, H_RESP)]
    assert resp(w) == pytest.approx(expect, abs=1e-6)
    cfg = cfg.replace(gate_h=0.5, gate_p=0.3, gate_tau=0.1)
    w = compute_weights(S, T, M, cfg, student_entropy=H)
    expect = [conflict_gate(s, h, 0.5, 0.3, 0.1) for s, h in zip(S_RESP, H_RESP)]
    assert resp(w) == pytest.approx(expect, abs=1e-6)


def test_conflict_gate_suppresses_confident_conflicts_only():
    # Four tokens, the four corners: (p_S, H) = unlikely & confident (a confident
    # conflict), unlikely & unsure (not known yet), likely & confident, likely & unsure.
    s = torch.log(torch.tensor([[0.01, 0.01, 0.9, 0.9]]))
    h = torch.tensor([[0.05, 3.0, 0.05, 3.0]])
    m = torch.ones(1, 4, dtype=torch.bool)
    w = compute_weights(s, None, m, preset("eaft_conflict"), student_entropy=h)[0].tolist()
    assert w[0] < 0.03  # the gate's least value is 1 - sigmoid(gate_h / gate_tau) = 0.018
    assert min(w[1:]) > 0.98
    # exactly at both thresholds: 1 - 1/2 * 1/2
    at = compute_weights(
        torch.tensor([[math.log(0.1)]]),
        None,
        torch.ones(1, 1, dtype=torch.bool),
        preset("eaft_conflict"),
        student_entropy=torch.tensor([[1.0]]),
    )
    assert float(at) == pytest.approx(0.75)


def test_entropy_power_gate_is_eafts_weight():
    # EAFT (2601.02151): the NLL times (H / 3) ** alpha; min(1, .) only bites above 3 nats.
    w = compute_weights(S, T, M, preset("eaft"), student_entropy=H)
    assert resp(w) == pytest.approx([2.0 / 3, 0.2 / 3, 0.1 / 3, 1.0])
    w = compute_weights(S, T, M, preset("eaft", gate_gamma=2.0), student_entropy=H)
    assert resp(w) == pytest.approx([(2.0 / 3) ** 2, (0.2 / 3) ** 2, (0.1 / 3) ** 2, 1.0])
    w = compute_weights(S, T, M, preset("eaft", gate_h=2.0), student_entropy=H)
    assert resp(w) == pytest.approx([1.0, 0.1, 0.05, 1.0])
    w = compute_weights(S, T, M, preset("eaft", gate_gamma=0.0), student_entropy=H)
    assert resp(w) == [1.0] * 4


def test_the_gate_multiplies_the_base_weight_and_off_gives_the_base_weights():
    base = compute_weights(S, T, M, preset("discord"))
    gated = compute_weights(S, T, M, preset("discord", gate="conflict"), student_entropy=H)
    g = [conflict_gate(s, h) for s, h in zip(S_RESP, H_RESP)]
    assert resp(gated) == pytest.approx([2 * sig(d) * x for d, x in zip(D, g)], abs=1e-6)
    assert (gated <= base).all() and (gated < base).any()
    # gate none: the base weights exactly, whatever the gate fields and entropy say
    for name in ("discord", "tis", "dft", "sft"):
        off = preset(name, gate="none", gate_h=0.3, gate_p=0.5, gate_tau=2.0, gate_gamma=3.0)
        ref = compute_weights(S, T, M, preset(name))
        assert torch.equal(compute_weights(S, T, M, off, student_entropy=H), ref)
        assert torch.equal(compute_weights(S, T, M, off), ref)


def test_a_teacher_silent_token_is_still_gated():
    # teacher-silent tokens get the transform's neutral 1; the gate reads the student only
    known = torch.tensor([[True, True, False, True, True]])
    cfg = preset("discord", gate="conflict")
    w = compute_weights(S, T, M, cfg, teacher_mask=known, student_entropy=H)
    assert resp(w)[1] == pytest.approx(conflict_gate(-1.0, 0.2))
    assert resp(w)[0] == pytest.approx(2 * sig(0.5) * conflict_gate(-0.5, 2.0))


def test_nll_mix_hand_computed_and_one_is_sft():
    w = compute_weights(S, T, M, preset("discord", nll_mix=0.25))
    assert resp(w) == pytest.approx([0.25 + 0.75 * 2 * sig(d) for d in D])
    w = compute_weights(S, T, M, preset("das_token_mix"))
    assert resp(w) == pytest.approx([0.5 + 0.5 * 2 * sig(-d) for d in D])
    # mixed after the gate: w = a + (1 - a) g w_base
    cfg = preset("eaft", nll_mix=0.2)
    w = compute_weights(S, T, M, cfg, student_entropy=H)
    assert resp(w) == pytest.approx([0.2 + 0.8 * min(1.0, h / 3) for h in H_RESP])
    # nll_mix = 1: SFT's weights exactly, for every family and normalisation
    for name in PRESETS:
        for norm in ("none", "self_norm", "per_sequence"):
            cfg = preset(name, nll_mix=1.0, normalization=norm)
            w = compute_weights(S, T, M, cfg, student_entropy=H)
            assert resp(w) == [1.0] * 4, (name, norm)
            assert w[0, 0] == 0.0


def test_nll_mix_brings_masked_tokens_back():
    from raydc.method.weights import loss_tokens

    cfg = WeightConfig(transform="mask", lo=0.5, hi=2.0, nll_mix=0.3)
    w = compute_weights(S, T, M, cfg)
    assert resp(w) == pytest.approx([1.0, 1.0, 0.3, 1.0])
    assert loss_tokens(w, M, cfg).tolist() == M.tolist()


def test_nll_mix_one_gives_the_sft_loss():
    from raydc.method.loss import weighted_token_loss

    loss = torch.tensor([[9.0, 1.0, 2.0, 3.0, 6.0]])
    for name in ("discord", "tis", "eaft_conflict"):
        cfg = preset(name, nll_mix=1.0)
        w = compute_weights(S, T, M, cfg, student_entropy=H)
        got = weighted_token_loss(loss, w, M, cfg.normalization)
        assert float(got) == 3.0  # (1 + 2 + 3 + 6) / 4


def test_gate_and_mix_with_per_sequence_rescale_to_mean_one():
    cfg = preset("eaft", normalization="per_sequence", nll_mix=0.1)
    w = compute_weights(S, T, M, cfg, student_entropy=H)
    raw = [0.1 + 0.9 * min(1.0, h / 3) for h in H_RESP]
    assert resp(w) == pytest.approx([x / (sum(raw) / 4) for x in raw])


def test_an_entropy_gate_needs_the_entropy():
    from raydc.method.weights import needs_entropy

    for name in ("eaft", "eaft_conflict"):
        assert needs_entropy(preset(name))
        with pytest.raises(WeightConfigError, match=r"gate=.* needs student_entropy"):
            compute_weights(S, T, M, preset(name))
    assert not needs_entropy(preset("das_token_mix")) and not needs_entropy(preset("discord"))


@pytest.mark.parametrize(
    "bad,msg",
    [
        (float("nan"), "student_entropy is nan at row 0, position 3"),
        (float("inf"), "student_entropy is inf at row 0, position 3"),
        (-0.5, r"student_entropy is negative \(-0.5\) at row 0, position 3"),
    ],
)
def test_bad_entropy_raises_naming_the_field_and_position(bad, msg):
    h = H.clone()
    h[0, 3] = bad
    with pytest.raises(ValueError, match=msg):
        compute_weights(S, T, M, preset("eaft"), student_entropy=h)
    # off the loss mask anything goes; a rounding hair below 0 is 0
    h = H.clone()
    h[0, 0], h[0, 2] = float("nan"), -1e-6
    w = compute_weights(S, T, M, preset("eaft"), student_entropy=h)
    assert resp(w)[1] == 0.0
    with pytest.raises(ValueError, match="student_entropy has shape"):
        compute_weights(S, T, M, preset("eaft"), student_entropy=H[:, :3])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(gate="entropy"), "gate"),
        (dict(gate_h=0.0), "gate_h"),
        (dict(gate_p=0.0), "gate_p"),
        (dict(gate_p=1.0), "gate_p"),
        (dict(gate_tau=0.0), "gate_tau"),
        (dict(gate_gamma=-1.0), "gate_gamma"),
        (dict(nll_mix=-0.1), "nll_mix"),
        (dict(nll_mix=1.5), "nll_mix"),
        (dict(gate_h=float("inf")), "gate_h"),
    ],
)
def test_invalid_gate_and_mix_name_the_field(kwargs, field):
    with pytest.raises(WeightConfigError, match=rf"WeightConfig\.{field}="):
        WeightConfig(**kwargs)


def test_entropy_presets():
    e = preset("eaft")
    assert (e.transform, e.gate, e.gate_h, e.gate_gamma, e.normalization, e.nll_mix) == (
        "none",
        "entropy_power",
        3.0,
        1.0,
        "none",
        0.0,
    )
    c = preset("eaft_conflict")
    assert (c.transform, c.gate, c.gate_h, c.gate_p, c.gate_tau, c.normalization) == (
        "none",
        "conflict",
        1.0,
        0.1,
        0.25,
        "none",
    )
    d = preset("das_token_mix")
    assert d == preset("das_token", nll_mix=0.5)


@settings(max_examples=200, deadline=None)
@given(
    s=st.lists(logprob, min_size=1, max_size=12),
    data=st.data(),
    gate=st.sampled_from(["conflict", "entropy_power"]),
    gate_h=st.floats(0.01, 10.0),
    gate_p=st.floats(0.001, 0.999),
    gate_tau=st.floats(0.01, 5.0),
    nll_mix=st.floats(0.0, 1.0),
)
def test_gated_mixed_weights_stay_between_the_mix_and_the_base(
    s, data, gate, gate_h, gate_p, gate_tau, nll_mix
):
    h = data.draw(st.lists(st.floats(0.0, 12.0), min_size=len(s), max_size=len(s)))
    t = data.draw(st.lists(logprob, min_size=len(s), max_size=len(s)))
    st_, tt, ht = (torch.tensor([x], dtype=torch.float64) for x in (s, t, h))
    m = torch.ones_like(st_, dtype=torch.bool)
    base_cfg = preset("discord")
    base = compute_weights(st_, tt, m, base_cfg)
    cfg = base_cfg.replace(gate=gate, gate_h=gate_h, gate_p=gate_p, gate_tau=gate_tau)
    gated = compute_weights(st_, tt, m, cfg, student_entropy=ht)
    assert (gated >= 0).all() and (gated <= base * (1 + 1e-12)).all()
    mixed = compute_weights(st_, tt, m, cfg.replace(nll_mix=nll_mix), student_entropy=ht)
    expect = nll_mix + (1 - nll_mix) * gated
    torch.testing.assert_close(mixed, expect, atol=1e-12, rtol=1e-12)


def test_diagnostics_clip_shares_follow_the_mix():
    s = torch.tensor([[-0.1, -2.0, -3.0, 0.0], [-1.0, -1.5, -0.2, -0.3]])
    t = torch.tensor([[-1.0, -0.5, -0.2, 0.0], [-1.0, -0.5, -4.0, -0.3]])
    m = torch.tensor([[True, True, True, False], [True, True, True, True]])
    cfg = preset("tis", granularity="token")
    plain = weight_diagnostics(compute_weights(s, t, m, cfg), m, cfg)["clip_shares"]
    mixed_cfg = cfg.replace(nll_mix=0.5)
    mixed = weight_diagnostics(compute_weights(s, t, m, mixed_cfg), m, mixed_cfg)["clip_shares"]
    assert plain["at_w_max"] > 0
    assert mixed == plain
