"""On-policy distillation through the weight family: the ``advantage`` transform.

The expected gradients come from independent autograd expressions (the reverse-KL
estimator's policy-gradient surrogate, tinker-cookbook's importance-sampling loss), never
from ``compute_weights`` itself; clipped ratios are computed by hand.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from raydc.method.loss import weighted_token_loss
from raydc.method.weights import (
    ON_POLICY_PRESETS,
    PRESETS,
    WeightConfig,
    WeightConfigError,
    compute_weights,
    loss_tokens,
    needs_sampling,
    needs_teacher,
    preset,
    weight_diagnostics,
)

# One response of 4 sampled tokens over a vocabulary of 5; a prompt position first (no loss).
Y = torch.tensor([[0, 3, 1, 4, 2]])
M = torch.tensor([[False, True, True, True, True]])
TEACHER = torch.tensor([[0.0, -0.4, -2.5, -0.1, -1.7]])
THETA0 = torch.tensor(
    [
        [0.3, -0.2, 0.9, 0.0, 0.1],
        [1.2, 0.4, -0.7, 0.5, 0.0],
        [-0.3, 0.8, 0.2, 0.1, -1.0],
        [0.0, 0.0, 0.6, -0.4, 0.9],
        [0.5, -0.6, 0.3, 0.2, 0.0],
    ]
)


def _logp(theta: torch.Tensor) -> torch.Tensor:
    """log p_theta(y_t) [1, T]: a position-wise softmax policy with logits ``theta``."""
    return torch.log_softmax(theta, dim=-1).gather(1, Y.T).T


def _raydc_grad(theta: torch.Tensor, sampling: torch.Tensor, cfg: WeightConfig, tm=None):
    """The gradient of raydc's weighted NLL, -sum w log p_theta / tokens, weights detached."""
    th = theta.clone().requires_grad_(True)
    logp = _logp(th)
    w = compute_weights(logp.detach(), TEACHER, M, cfg, teacher_mask=tm, sampling_logprobs=sampling)
    loss = weighted_token_loss(-logp, w, loss_tokens(w, M, cfg), cfg.normalization)
    loss.backward()
    return th.grad, w


def test_on_policy_gradient_is_the_reverse_kl_estimators():
    """At the sampling policy (ratio 1) the OPD gradient is the policy gradient of the k1
    reverse-KL estimator sum_t (log p_S - log p_T) on the sampled tokens, per token."""
    sampling = _logp(THETA0).detach()
    got, w = _raydc_grad(THETA0, sampling, preset("opd"))
    # independent: the score-function surrogate sum_t sg(log p_S - log p_T) log p_theta
    th = THETA0.clone().requires_grad_(True)
    logp = _logp(th)
    k1 = (logp.detach() - TEACHER)[M]
    (k1 * logp[M]).sum().div(M.sum()).backward()
    torch.testing.assert_close(got, th.grad, rtol=1e-6, atol=1e-7)
    # and the weights are the advantage itself: log p_T - log p_S, signed
    assert w[M].tolist() == pytest.approx((TEACHER - sampling)[M].tolist(), rel=1e-6)
    assert (w[M] < 0).any() and (w[M] > 0).any()
    assert w[0, 0] == 0.0


def test_off_policy_gradient_is_tinkers_importance_sampling_loss():
    """After the policy moved (ratios within the clip), the gradient equals that of
    -sum_t exp(log p_theta - log p_samp) * sg(c (log p_T - log p_samp)) / tokens."""
    sampling = _logp(THETA0).detach()
    theta = THETA0 + 0.3 * torch.sin(torch.arange(25.0)).reshape(5, 5)
    coef = 0.7
    cfg = preset("opd", c=coef, w_min=0.0, w_max=100.0)
    got, _ = _raydc_grad(theta, sampling, cfg)
    th = theta.clone().requires_grad_(True)
    logp = _logp(th)
    ratio = torch.exp(logp - sampling)
    assert not torch.allclose(ratio[M], torch.ones(4))  # really off-policy
    adv = coef * (TEACHER - sampling)
    (-(ratio * adv)[M].sum() / M.sum()).backward()
    torch.testing.assert_close(got, th.grad, rtol=1e-5, atol=1e-7)


def test_ratio_clip_hand_computed():
    s_live = torch.tensor([[0.0, math.log(0.6), math.log(0.1), math.log(0.5), math.log(0.3)]])
    s_samp = torch.tensor([[0.0, math.log(0.2), math.log(0.5), math.log(0.5), math.log(0.25)]])
    t = torch.tensor([[0.0, math.log(0.4), math.log(0.2), math.log(0.9), math.log(0.05)]])
    cfg = preset("opd", c=2.0, w_min=0.5, w_max=2.0)
    w = compute_weights(s_live, t, M, cfg, sampling_logprobs=s_samp)
    # ratios 3.0 (clipped to 2), 0.2 (clipped to 0.5), 1.0 and 1.2
    expect = [
        2.0 * math.log(0.4 / 0.2) * 2.0,
        2.0 * math.log(0.2 / 0.5) * 0.5,
        2.0 * math.log(0.9 / 0.5) * 1.0,
        2.0 * math.log(0.05 / 0.25) * 1.2,
    ]
    assert w[0, 1:].tolist() == pytest.approx(expect, rel=1e-5)
    # without sampling log-probs the live student is the sampler: ratio 1
    w1 = compute_weights(s_samp, t, M, cfg)
    assert w1[0, 1:].tolist() == pytest.approx(
        [2.0 * math.log(a / b) for a, b in ((0.4, 0.2), (0.2, 0.5), (0.9, 0.5), (0.05, 0.25))],
        rel=1e-5,
    )


def test_teacher_silent_token_gets_weight_zero_and_is_counted():
    """A token the teacher has no value for (another tokenizer's gap) gives no gradient,
    and stays in the per-token denominator."""
    sampling = _logp(THETA0).detach()
    tm = torch.tensor([[True, True, False, True, True]])
    t = TEACHER.clone()
    t[0, 2] = float("nan")  # whatever the silent teacher holds there is not read
    cfg = preset("opd")
    th = THETA0.clone().requires_grad_(True)
    logp = _logp(th)
    w = compute_weights(logp.detach(), t, M, cfg, teacher_mask=tm, sampling_logprobs=sampling)
    assert w[0, 2] == 0.0
    kept = loss_tokens(w, M, cfg)
    assert kept.tolist() == M.tolist() and int(kept.sum()) == 4
    weighted_token_loss(-logp, w, kept, cfg.normalization).backward()
    # independent: the k1 surrogate over the three known tokens, divided by all four
    ref = THETA0.clone().requires_grad_(True)
    lp = _logp(ref)
    known = M & tm
    ((lp.detach() - TEACHER)[known] * lp[known]).sum().div(4).backward()
    torch.testing.assert_close(th.grad, ref.grad, rtol=1e-6, atol=1e-7)
    assert th.grad[2].abs().sum() == 0  # no gradient at the silent position


def test_sequence_granularity_gives_each_token_the_sequence_advantage():
    s = torch.tensor([[0.0, -0.5, -1.0, -0.2, -2.0]])
    cfg = preset("opd", granularity="sequence_sum")
    w = compute_weights(s, TEACHER, M, cfg)
    total = float((TEACHER - s)[M].sum())
    assert w[0, 1:].tolist() == pytest.approx([total] * 4, rel=1e-6)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(sign=1), "sign"),
        (dict(normalization="self_norm"), "normalization"),
        (dict(normalization="per_sequence"), "normalization"),
        (dict(floor=0.1), "floor"),
        (dict(w_min=3.0, w_max=2.0), "w_min"),
        (dict(c=0.0), "c"),
    ],
)
def test_advantage_validation_names_the_field(overrides, field):
    with pytest.raises(WeightConfigError, match=rf"WeightConfig\.{field}="):
        preset("opd", **overrides)


def test_advantage_needs_teacher_logprobs():
    with pytest.raises(WeightConfigError, match="advantage.*needs teacher_logprobs"):
        compute_weights(TEACHER, None, M, preset("opd"))


def test_bad_sampling_logprobs_raise():
    bad = TEACHER.clone()
    bad[0, 3] = 0.5
    with pytest.raises(ValueError, match="sampling_logprobs is positive"):
        compute_weights(TEACHER, TEACHER, M, preset("opd"), sampling_logprobs=bad)


def test_opd_preset_is_apart_from_the_offline_presets():
    assert "opd" in ON_POLICY_PRESETS and "opd" not in PRESETS
    cfg = preset("opd")
    assert (cfg.transform, cfg.sign, cfg.normalization) == ("advantage", -1, "none")
    assert needs_sampling(cfg) and needs_teacher(cfg)
    assert not any(needs_sampling(preset(n)) for n in PRESETS)
    with pytest.raises(WeightConfigError, match="unknown preset 'nope'.*opd"):
        preset("nope")


def test_diagnostics_histogram_covers_signed_weights():
    w = torch.tensor([[0.0, -1.5, 0.5, 2.0, -0.25]])
    d = weight_diagnostics(w, M, preset("opd"), bins=4)
    edges, counts = d["histogram"]["edges"], d["histogram"]["counts"]
    assert edges[0] == pytest.approx(-1.5) and edges[-1] == pytest.approx(2.0)
    assert sum(counts) == 4


@pytest.mark.parametrize("packed", [True, False])
def test_step_weights_read_stored_sampling_and_live_logprobs(tiny_student, packed):
    """Under student_ref=current the step's OPD weights take the advantage from the stored
    (sampling) log-probs and the ratio from the live forward, packed or padded."""
    from raydc.config import TrainConfig
    from raydc.train.batch import collate
    from raydc.train.model import StudentLogprobs, load_student
    from raydc.train.step import micro_batch_weights
    from tests.unit.test_train_model import _block

    block = _block(seed=3, lengths=(9, 5, 12))
    torch.manual_seed(0)
    model = StudentLogprobs(load_student(tiny_student, TrainConfig(), on_gpu=False), 4)
    mb = collate(block, [0, 1, 2], packed=packed)
    with torch.no_grad():
        live = model(mb.input_ids, mb.position_ids).float()
    w = micro_batch_weights(mb, preset("opd", w_max=2.0), live)
    m = mb.loss_mask
    s, t = mb.student_logprobs, mb.teacher_logprobs
    ratio = torch.exp(live - s).clamp(max=2.0)
    expect = torch.where(m, (t - s) * ratio, torch.zeros_like(s))
    torch.testing.assert_close(w, expect, rtol=1e-5, atol=1e-6)
    # the stored log-probs alone (student_ref=init): ratio 1
    w0 = micro_batch_weights(mb, preset("opd"))
    torch.testing.assert_close(w0, torch.where(m, t - s, torch.zeros_like(s)))


# -- the advantage's baseline (weights.baseline; the opd_baseline preset) ---------------


def test_any_constant_baseline_keeps_the_exact_reverse_kl_gradient():
    """Over every sequence of the position-wise policy (5^4 of them, each weighed by its
    probability), the weighted NLL's expected gradient is the exact reverse KL's,
    grad sum_t KL(p_t || q_t) / 4 from the full distributions, with or without a baseline:
    subtracting b changes the estimator's variance, not its mean."""
    import itertools

    q_logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [0.2, -1.0, 0.7, 1.5, -0.3],
            [1.1, 0.9, -0.4, 0.0, 0.6],
            [-0.5, 0.3, 0.3, -1.2, 2.0],
            [0.8, 0.1, -0.9, 0.4, -0.2],
        ]
    )
    q_full = torch.log_softmax(q_logits, -1)
    seqs = torch.tensor([[0, *ys] for ys in itertools.product(range(5), repeat=4)])
    rows = torch.arange(5).expand(len(seqs), 5)
    mask = M.expand(len(seqs), 5)

    def expected_grad(baseline: float) -> torch.Tensor:
        th = THETA0.clone().requires_grad_(True)
        logp_full = torch.log_softmax(th, -1)
        logp = logp_full[rows, seqs]  # [625, 5]
        t = q_full[rows, seqs]
        w = compute_weights(logp.detach(), t, mask, preset("opd_baseline"), baseline=baseline)
        prob = logp.detach()[:, 1:].sum(1).exp()  # P(y) of each sequence
        assert float(prob.sum()) == pytest.approx(1.0, abs=1e-5)
        (prob[:, None] * -(w * logp))[mask].sum().div(4).backward()
        return th.grad

    th = THETA0.clone().requires_grad_(True)
    lp = torch.log_softmax(th, -1)
    (lp.exp() * (lp - q_full))[1:].sum().div(4).backward()
    for b in (0.0, 1.3, -2.0):
        torch.testing.assert_close(expected_grad(b), th.grad, rtol=1e-4, atol=1e-6)


def test_baseline_hand_computed_and_silent_tokens_left_out():
    s_live = torch.tensor([[0.0, math.log(0.6), math.log(0.1), math.log(0.5), math.log(0.3)]])
    s_samp = torch.tensor([[0.0, math.log(0.2), math.log(0.5), math.log(0.5), math.log(0.25)]])
    t = torch.tensor([[0.0, math.log(0.4), math.log(0.2), math.log(0.9), math.log(0.05)]])
    tm = torch.tensor([[True, True, True, False, True]])  # the teacher is silent at 3
    cfg = preset("opd_baseline", c=2.0, w_min=0.5, w_max=2.0)
    from raydc.method.weights import advantage_sum

    total, n = advantage_sum(s_samp, t, M, cfg, teacher_mask=tm)
    us = [math.log(0.4 / 0.2), math.log(0.2 / 0.5), math.log(0.05 / 0.25)]
    assert n == 3 and total == pytest.approx(sum(us), rel=1e-6)
    b = total / n
    w = compute_weights(s_live, t, M, cfg, teacher_mask=tm, sampling_logprobs=s_samp, baseline=b)
    # ratios 3.0 (clipped to 2), 0.2 (clipped to 0.5), silent, 1.2
    expect = [2.0 * (us[0] - b) * 2.0, 2.0 * (us[1] - b) * 0.5, 0.0, 2.0 * (us[2] - b) * 1.2]
    assert w[0, 1:].tolist() == pytest.approx(expect, rel=1e-5)
    # the mean weight at ratio 1 is 0: the constant push-down is gone
    w1 = compute_weights(s_samp, t, M, cfg, teacher_mask=tm, baseline=b)
    assert float(w1[M & tm].sum()) == pytest.approx(0.0, abs=1e-6)
    # no number given: batch_mean is the mean over the tensors given (here the same b)
    w_own = compute_weights(s_live, t, M, cfg, teacher_mask=tm, sampling_logprobs=s_samp)
    assert w_own[0, 1:].tolist() == pytest.approx(expect, rel=1e-5)
    # and ``none`` subtracts nothing: (u - 0) * ratio
    w_none = compute_weights(
        s_live,
        t,
        M,
        preset("opd", c=2.0, w_min=0.5, w_max=2.0),
        teacher_mask=tm,
        sampling_logprobs=s_samp,
    )
    assert w_none[0, 1:].tolist() == pytest.approx(
        [2.0 * us[0] * 2.0, 2.0 * us[1] * 0.5, 0.0, 2.0 * us[2] * 1.2], rel=1e-5
    )


def test_baseline_validation_names_the_field():
    assert preset("opd_baseline").baseline == "batch_mean"
    with pytest.raises(WeightConfigError, match=r"WeightConfig\.baseline='batch_mean'.*advantage"):
        preset("sft", baseline="batch_mean")
    with pytest.raises(WeightConfigError, match=r"WeightConfig\.baseline='median': must be one"):
        preset("opd", baseline="median")
    with pytest.raises(
        WeightConfigError, match=r"baseline=0\.5 with WeightConfig\.baseline='none'"
    ):
        compute_weights(TEACHER, TEACHER, M, preset("opd"), baseline=0.5)
    from raydc.method.weights import advantage_sum

    with pytest.raises(WeightConfigError, match="advantage_sum needs transform='advantage'"):
        advantage_sum(TEACHER, TEACHER, M, preset("sft"))


@pytest.mark.parametrize("packed", [True, False])
def test_step_subtracts_the_global_batch_mean_advantage(tiny_student, packed):
    """Learner.step under ``batch_mean``: the baseline is the mean advantage over every
    micro-batch of the step and every rank (the all-reduce's sum), and each weight is
    (t - s - b) * clip(exp(live - s))."""
    from raydc.config import TrainConfig
    from raydc.train.batch import collate
    from raydc.train.model import StudentLogprobs, load_student
    from raydc.train.step import Learner, no_reduce
    from tests.unit.test_train_model import _block
    from tests.unit.test_train_step import _Engine, _Sched

    block = _block(seed=4, lengths=(9, 5, 12, 7))
    # the teacher is silent on some tokens (another tokenizer's gaps): out of the mean
    has_value = np.arange(len(block.input_ids)) % 3 != 1  # every third token a gap
    block = dataclasses.replace(block, teacher_mask=has_value)
    torch.manual_seed(0)
    model = StudentLogprobs(load_student(tiny_student, TrainConfig(), on_gpu=False), 4)
    mbs = [collate(block, rows, packed=packed) for rows in ([0, 1], [2, 3])]
    assert all(
        mb.teacher_mask is not None and not mb.teacher_mask[mb.loss_mask].all() for mb in mbs
    )
    other = (-7.5, 10)  # another rank's (sum of u, tokens)
    calls = []

    def all_reduce(values, op="sum"):
        calls.append(list(values))
        if len(calls) == 1:  # the baseline's reduction comes first
            return [values[0] + other[0], values[1] + other[1]]
        return list(values)

    tc = TrainConfig(student_ref="current")
    wc = preset("opd_baseline", w_max=2.0)
    st = Learner(_Engine(model, 2), _Sched(), tc, wc, 2, all_reduce).step(mbs)
    known = [mb.loss_mask & mb.teacher_mask for mb in mbs]
    u = [(mb.teacher_logprobs - mb.student_logprobs)[k] for mb, k in zip(mbs, known)]
    local_sum, local_n = float(sum(x.double().sum() for x in u)), sum(x.numel() for x in u)
    assert calls[0][1] == local_n and calls[0][0] == pytest.approx(local_sum, rel=1e-9)
    b = (local_sum + other[0]) / (local_n + other[1])
    assert st.baseline == pytest.approx(b, rel=1e-9)
    with torch.no_grad():
        for mb, w in zip(mbs, st.weights):
            live = model(mb.input_ids, mb.position_ids).float()
            s, t, k = mb.student_logprobs, mb.teacher_logprobs, mb.loss_mask & mb.teacher_mask
            ratio = torch.exp(live - s).clamp(max=2.0)
            expect = torch.where(k, (t - s - b) * ratio, torch.zeros_like(s))
            torch.testing.assert_close(w, expect, rtol=1e-5, atol=1e-5)
    # without a baseline the step reduces only its denominators
    calls.clear()
    st0 = Learner(_Engine(model, 2), _Sched(), tc, preset("opd"), 2, no_reduce).step(mbs)
    assert st0.baseline is None
    # a step whose every token is teacher-silent has no baseline, and every weight is 0
    mbs = [dataclasses.replace(mb, teacher_mask=torch.zeros_like(mb.teacher_mask)) for mb in mbs]
    st_none = Learner(_Engine(model, 2), _Sched(), tc, wc, 1, no_reduce).step(mbs)
    assert st_none.baseline is None and all(float(w.abs().sum()) == 0 for w in st_none.weights)
