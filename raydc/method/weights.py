"""Per-token weights for distribution-corrected offline distillation.

The weight of teacher token t is ``sign x granularity x transform x normalisation`` of the
student/teacher log-ratio (see docs/method.md):

- arXiv 2605.14071 (Zhang et al., 2026): weight each teacher token by a *bounded* transform
  of p_student / p_teacher, so supervision the student's own distribution supports counts
  more (sign +1, the ``discord`` preset).
- arXiv 2601.09088 (DASD): divergence-aware sampling prefers tokens where p_teacher >>
  p_student; the opposite sign (the ``das_token`` preset).
- Limit cases: ``sft`` (w = 1), DFT (w = p_student, ``dft``), iw-SFT and truncated
  importance sampling (a clipped sequence ratio, ``iw_seq`` / ``tis``).
- arXiv 2601.02151 (EAFT): a low-probability token is a "confident conflict" when the
  student's predictive entropy there is low too, and "not known yet" when it is high; an
  entropy ``gate`` multiplies the weight (``eaft``: EAFT's own min(1, H / 3) form;
  ``eaft_conflict``: a smooth AND of low probability and low entropy).
- arXiv 2510.00526 ("Beyond Log Likelihood"): prior-leaning weights win where the model
  is strong and NLL where it is weak; ``nll_mix`` interpolates any weighting toward NLL
  (w' = nll_mix + (1 - nll_mix) w; 1 is plain SFT).
- On-policy distillation (tinker-cookbook's ``importance_sampling`` loss on the student's
  own samples; the ``on_policy`` stage): the loss -sum_t sg(A_t) r_t, with the advantage
  A_t = c (log p_T - log p_S) at the sampling policy and r_t = exp(log p_theta - log
  p_sampling), has the gradient -sum_t sg(A_t r_t) grad log p_theta, so it is the weighted
  NLL with w_t = c A_t clip(r_t, w_min, w_max): the signed, unbounded ``advantage``
  transform (the ``opd`` preset of ``ON_POLICY_PRESETS``). On the student's own samples
  E[u_t] = -KL_t < 0 (u = log p_T - log p_S), so the estimator's every step mostly pushes
  the sampled tokens down. A constant ``baseline`` ubar subtracted from u leaves the
  expected gradient unchanged at ratio 1 (E[grad log p_S] = 0 at each prefix; with the
  ratio clipped, exactly only while no ratio reaches the clip) and takes that push out of
  the step: REINFORCE's baseline. ``batch_mean`` (the ``opd_baseline`` preset) takes ubar
  as the optimizer step's mean u over its teacher-known loss tokens, all ranks: a
  constant but for each token's own 1/N share of it.

Everything here is pure torch on [B, T] tensors; nothing imports ray, vllm or deepspeed.
Weights are computed in log space, bounded, and returned detached.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

SIGNS = (1, -1)
GRANULARITIES = ("token", "prefix_mean", "prefix_ema", "sentence", "sequence_mean", "sequence_sum")
TRANSFORMS = ("none", "sigmoid", "exp_clip", "mask", "power", "advantage")
NORMALIZATIONS = ("none", "self_norm", "per_sequence")
BASELINES = ("none", "batch_mean")
GATES = ("none", "conflict", "entropy_power")

# Log-probs below this are treated as this value: -inf would turn mean/difference
# reductions into NaN, and exp(-1e4) is already 0 in every float format.
LOGPROB_FLOOR = -1e4
# vLLM and fp16/bf16 forward passes can return log-probs a hair above 0 for a
# near-certain token; anything beyond this tolerance is a real bug upstream.
LOGPROB_POSITIVE_TOL = 1e-3


class WeightConfigError(ValueError):
    """A WeightConfig field holds an invalid value; the message names the field."""


@dataclass(frozen=True)
class WeightConfig:
    """One member of the weight family. See docs/method.md for every field.

    sign: +1 weights by log p_S - log p_T (student-supported tokens count more), -1 the
        opposite (DASD's direction). Without teacher log-probs, d = log p_S.
    granularity: what the transform sees: ``token``, ``prefix_mean``, ``prefix_ema``
        (decay ``lam``), ``sentence``, ``sequence_mean`` or ``sequence_sum``.
    transform: ``none`` (w = 1), ``sigmoid`` (c * sigmoid((u - b) / tau)), ``exp_clip``
        (clip(exp(u / tau), w_min, w_max)), ``mask`` (1 if exp(u) in [lo, hi] else 0),
        ``power`` (exp(gamma * log p_S), DFT at gamma = 1), ``advantage`` (c * u *
        clip(exp(log p_S - log p_samp), w_min, w_max): on-policy distillation's signed weight,
        u = log p_T - log p_samp at sign -1, p_S the live student and p_samp the policy
        that sampled the tokens; needs sign -1, normalization none and no floor).
    baseline: what the ``advantage`` transform subtracts from u: ``none`` or ``batch_mean``
        (the mean u over the optimizer step's teacher-known loss tokens: the train step
        computes it over every micro-batch and rank and passes it to ``compute_weights``,
        which otherwise takes the mean over the tensors it is given).
    floor: w <- floor + (1 - floor) * w, so no token's weight falls below ``floor``.
    gate: an entropy gate g in [0, 1] that multiplies w (needs the student's per-token
        entropy H in nats; s = log p_S of the teacher token): ``none`` (g = 1),
        ``conflict`` (g = 1 - sigmoid((gate_h - H) / gate_tau) * sigmoid((log gate_p - s)
        / gate_tau): suppresses tokens that are both unlikely and confidently predicted
        otherwise), ``entropy_power`` (g = min(1, H / gate_h) ** gate_gamma, EAFT's form).
    nll_mix: w <- nll_mix + (1 - nll_mix) * w after the gate; 1 gives SFT's weights.
    normalization: ``none`` (divide by loss tokens), ``self_norm`` (divide by the sum of
        weights), ``per_sequence`` (weights rescaled to mean 1 in each response).
    """

    sign: int = 1
    granularity: str = "token"
    transform: str = "sigmoid"
    tau: float = 1.0
    b: float = 0.0
    c: float = 2.0
    w_min: float = 0.0
    w_max: float = 16.0
    lo: float = 0.5
    hi: float = 2.0
    gamma: float = 1.0
    floor: float = 0.0
    lam: float = 0.9
    gate: str = "none"
    gate_h: float = 1.0
    gate_p: float = 0.1
    gate_tau: float = 0.25
    gate_gamma: float = 1.0
    nll_mix: float = 0.0
    normalization: str = "self_norm"
    baseline: str = "none"

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> WeightConfigError:
            return WeightConfigError(f"WeightConfig.{field}={getattr(self, field)!r}: {why}")

        if self.sign not in SIGNS:
            raise bad("sign", "must be +1 or -1")
        if self.granularity not in GRANULARITIES:
            raise bad("granularity", f"must be one of {GRANULARITIES}")
        if self.transform not in TRANSFORMS:
            raise bad("transform", f"must be one of {TRANSFORMS}")
        if self.normalization not in NORMALIZATIONS:
            raise bad("normalization", f"must be one of {NORMALIZATIONS}")
        if self.gate not in GATES:
            raise bad("gate", f"must be one of {GATES}")
        if self.baseline not in BASELINES:
            raise bad("baseline", f"must be one of {BASELINES}")
        if self.baseline != "none" and self.transform != "advantage":
            raise bad(
                "baseline",
                "a baseline is subtracted from the advantage: needs transform='advantage'",
            )
        numbers = ("tau", "b", "c", "w_min", "w_max", "lo", "hi", "gamma", "floor", "lam")
        numbers += ("gate_h", "gate_p", "gate_tau", "gate_gamma", "nll_mix")
        for name in numbers:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
        if self.tau <= 0:
            raise bad("tau", "must be > 0")
        if self.c <= 0:
            raise bad("c", "must be > 0")
        if self.w_min < 0:
            raise bad("w_min", "must be >= 0")
        if self.w_max <= 0:
            raise bad("w_max", "must be > 0")
        if self.w_min > self.w_max:
            raise bad("w_min", f"must be <= w_max ({self.w_max})")
        if self.lo < 0:
            raise bad("lo", "must be >= 0")
        if self.lo > self.hi:
            raise bad("lo", f"must be <= hi ({self.hi})")
        if self.gamma < 0:
            raise bad("gamma", "must be >= 0")
        if not 0.0 <= self.floor < 1.0:
            raise bad("floor", "must be in [0, 1)")
        if not 0.0 <= self.lam < 1.0:
            raise bad("lam", "must be in [0, 1)")
        if self.gate_h <= 0:
            raise bad("gate_h", "must be > 0 (nats)")
        if not 0.0 < self.gate_p < 1.0:
            raise bad("gate_p", "must be in (0, 1)")
        if self.gate_tau <= 0:
            raise bad("gate_tau", "must be > 0 (nats)")
        if self.gate_gamma < 0:
            raise bad("gate_gamma", "must be >= 0")
        if not 0.0 <= self.nll_mix <= 1.0:
            raise bad("nll_mix", "must be in [0, 1]")
        if self.transform == "advantage":
            # A signed weight: the advantage must point toward the teacher, and a sum of
            # signed weights (self_norm, per_sequence's mean) can be ~0 or negative.
            if self.sign != -1:
                raise bad(
                    "sign",
                    "transform='advantage' needs sign=-1 (u = log p_T - log p_S, the "
                    "advantage toward the teacher); +1 would ascend the reverse KL",
                )
            if self.normalization != "none":
                raise bad(
                    "normalization",
                    "transform='advantage' gives signed weights: use normalization='none' "
                    "(divide by the loss tokens); a sum or mean of signed weights can be ~0",
                )
            if self.floor != 0:
                raise bad("floor", "transform='advantage' gives signed weights: floor must be 0")

    def replace(self, **overrides) -> WeightConfig:
        return dataclasses.replace(self, **_check_fields(overrides))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_fields(overrides: dict) -> dict:
    known = {f.name for f in dataclasses.fields(WeightConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise WeightConfigError(
            f"unknown WeightConfig field(s) {unknown}; known fields: {sorted(known)}"
        )
    return overrides


# The presets of the method table (docs/method.md), built from their shared bases so each
# shows its one difference.
# fmt: off
_SIGMOID = dict(sign=1, granularity="token", transform="sigmoid", c=2.0, b=0.0, tau=1.0,
                normalization="self_norm")
_SEQUENCE_RATIO = dict(sign=1, granularity="sequence_mean", transform="exp_clip", w_min=0.0,
                       w_max=16.0, tau=1.0, normalization="none")
_SFT = dict(transform="none", normalization="none")
# fmt: on
PRESETS: dict[str, dict] = {
    "sft": _SFT,
    "discord": _SIGMOID,
    "das_token": {**_SIGMOID, "sign": -1},
    "iw_seq": _SEQUENCE_RATIO,
    "dft": dict(granularity="token", transform="power", gamma=1.0, normalization="none"),
    "tis": {**_SEQUENCE_RATIO, "w_max": 2.0},
    # EAFT's loss: the NLL times min(1, H / 3) (3 ~ ln 20, its top-20 entropy's maximum)
    "eaft": {**_SFT, "gate": "entropy_power", "gate_h": 3.0, "gate_gamma": 1.0},
    # SFT with EAFT's confident conflicts (p_S < 0.1 and H < 1 nat) suppressed
    "eaft_conflict": {**_SFT, "gate": "conflict", "gate_h": 1.0, "gate_p": 0.1, "gate_tau": 0.25},
    # DASD's direction per token, half-way to NLL
    "das_token_mix": {**_SIGMOID, "sign": -1, "nll_mix": 0.5},
}


# Weights for the student's own samples (the on_policy stage; train.student_ref=current),
# apart from the offline presets above: signed, and meaningful only on on-policy data.
# ``opd``: tinker-cookbook's importance_sampling loss, the ratio clipped at 2.
ON_POLICY_PRESETS: dict[str, dict] = {
    "opd": dict(
        sign=-1,
        granularity="token",
        transform="advantage",
        c=1.0,
        w_min=0.0,
        w_max=2.0,
        normalization="none",
    ),
}
# ``opd`` less the step's mean advantage: the same expected gradient, no constant push-down
ON_POLICY_PRESETS["opd_baseline"] = {**ON_POLICY_PRESETS["opd"], "baseline": "batch_mean"}


def preset(name: str, **overrides) -> WeightConfig:
    """The named preset's full configuration (``PRESETS`` or ``ON_POLICY_PRESETS``), with
    any field overridden."""
    known = {**PRESETS, **ON_POLICY_PRESETS}
    if name not in known:
        raise WeightConfigError(f"unknown preset {name!r}; presets: {sorted(known)}")
    return WeightConfig(**{**known[name], **_check_fields(overrides)})


def needs_teacher(config: WeightConfig) -> bool:
    """Whether the configuration uses teacher log-probs when they exist."""
    return config.transform not in ("none", "power")


def needs_sampling(config: WeightConfig) -> bool:
    """Whether the configuration reads the sampling policy's log-probs beside the live
    student's (the ``advantage`` transform's importance ratio)."""
    return config.transform == "advantage"


def needs_entropy(config: WeightConfig) -> bool:
    """Whether the configuration needs the student's per-token entropy (an entropy gate)."""
    return config.gate != "none"


def check_logprobs(logprobs: torch.Tensor, loss_mask: torch.Tensor, name: str) -> None:
    """Raise a clear error for NaN, +inf or positive log-probs on loss tokens."""
    if logprobs.shape != loss_mask.shape:
        raise ValueError(
            f"{name} has shape {tuple(logprobs.shape)} but loss_mask has {tuple(loss_mask.shape)}"
        )
    lp = logprobs.detach()
    m = loss_mask.bool()
    bad_nan = torch.isnan(lp) & m
    if bad_nan.any():
        b, t = bad_nan.nonzero()[0].tolist()
        raise ValueError(f"{name} is NaN at row {b}, position {t}")
    bad_inf = torch.isposinf(lp) & m
    if bad_inf.any():
        b, t = bad_inf.nonzero()[0].tolist()
        raise ValueError(f"{name} is +inf at row {b}, position {t}")
    bad_pos = (lp > LOGPROB_POSITIVE_TOL) & m
    if bad_pos.any():
        b, t = bad_pos.nonzero()[0].tolist()
        raise ValueError(
            f"{name} is positive ({lp[b, t].item():.4g}) at row {b}, position {t}: "
            "log-probabilities must be <= 0"
        )


def check_entropy(entropy: torch.Tensor, loss_mask: torch.Tensor) -> None:
    """Raise a clear error for a non-finite or negative (beyond rounding) entropy on a
    loss token."""
    name = "student_entropy"
    if entropy.shape != loss_mask.shape:
        raise ValueError(
            f"{name} has shape {tuple(entropy.shape)} but loss_mask has {tuple(loss_mask.shape)}"
        )
    h = entropy.detach()
    m = loss_mask.bool()
    bad = ~torch.isfinite(h) & m
    if bad.any():
        b, t = bad.nonzero()[0].tolist()
        raise ValueError(f"{name} is {h[b, t].item()} at row {b}, position {t}")
    neg = (h < -LOGPROB_POSITIVE_TOL) & m
    if neg.any():
        b, t = neg.nonzero()[0].tolist()
        raise ValueError(
            f"{name} is negative ({h[b, t].item():.4g}) at row {b}, position {t}: "
            "an entropy is >= 0 nats"
        )


def entropy_gate(
    student_logprobs: torch.Tensor,
    entropy: torch.Tensor,
    loss_mask: torch.Tensor,
    config: WeightConfig,
) -> torch.Tensor:
    """The gate g [B, T] in [0, 1] of ``config.gate`` (1 off the loss mask and for ``none``).

    ``conflict``: g = 1 - sigmoid((gate_h - H) / gate_tau) * sigmoid((log gate_p - s) /
    gate_tau). Each sigmoid is a soft indicator ("H below gate_h", "p_S below gate_p");
    their product is a soft AND, so g is low only where the token is unlikely *and* the
    student is confident (a confident conflict), near 1 where either fails: an unlikely
    token under a high-entropy student (not known yet) keeps its weight. Entropy and log-prob
    are both in nats, so one sharpness serves both; g -> a hard AND as gate_tau -> 0, and
    g = 3/4 exactly at both thresholds. ``entropy_power``: g = min(1, H / gate_h) **
    gate_gamma, EAFT's weight (2601.02151: H over its top-20 maximum, ~3 nats).
    """
    m = loss_mask.bool()
    h = entropy.detach().to(_float_dtype(entropy)).clamp(min=0.0)
    h = torch.where(m, h, torch.zeros_like(h))
    if config.gate == "none":
        return torch.ones_like(h)
    if config.gate == "conflict":
        s = _clean(student_logprobs, m).to(h.dtype)
        confident = torch.sigmoid((config.gate_h - h) / config.gate_tau)
        unlikely = torch.sigmoid((math.log(config.gate_p) - s) / config.gate_tau)
        g = 1.0 - confident * unlikely
    else:  # entropy_power
        g = (h / config.gate_h).clamp(max=1.0) ** config.gate_gamma
    return torch.where(m, g, torch.ones_like(g))


def _clean(logprobs: torch.Tensor, m_BT: torch.Tensor) -> torch.Tensor:
    lp = logprobs.detach()
    lp = lp.to(torch.promote_types(lp.dtype, torch.float32)).clamp(min=LOGPROB_FLOOR, max=0.0)
    return torch.where(m_BT, lp, torch.zeros_like(lp))


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _masked_row_mean(x_BT: torch.Tensor, m_BT: torch.Tensor) -> torch.Tensor:
    n_B = m_BT.sum(dim=1).clamp(min=1)
    return (x_BT * m_BT).sum(dim=1) / n_B


def _prefix_mean(d_BT: torch.Tensor, m_BT: torch.Tensor) -> torch.Tensor:
    mf = m_BT.to(d_BT.dtype)
    csum = torch.cumsum(d_BT * mf, dim=1)
    ccount = torch.cumsum(mf, dim=1).clamp(min=1)
    return csum / ccount


def _prefix_ema(d_BT: torch.Tensor, m_BT: torch.Tensor, lam: float) -> torch.Tensor:
    # u = d at the first loss token, then u_t = lam * u_{t-1} + (1 - lam) * d_t over loss
    # tokens; non-loss tokens carry u forward. A scan over T: O(T) small tensor ops,
    # acceptable for this (non-default) granularity; lam**(-T) tricks overflow.
    B, T = d_BT.shape
    u = torch.zeros(B, dtype=d_BT.dtype, device=d_BT.device)
    started = torch.zeros(B, dtype=torch.bool, device=d_BT.device)
    out = torch.empty_like(d_BT)
    for t in range(T):
        m_t, d_t = m_BT[:, t], d_BT[:, t]
        upd = torch.where(started, lam * u + (1.0 - lam) * d_t, d_t)
        u = torch.where(m_t, upd, u)
        started = started | m_t
        out[:, t] = u
    return out


def _sentence_mean(
    d_BT: torch.Tensor, m_BT: torch.Tensor, sentence_ids: torch.Tensor
) -> torch.Tensor:
    B, T = d_BT.shape
    sid = sentence_ids.to(torch.long)
    if (sid[m_BT] < 0).any():
        raise ValueError("sentence_ids must be >= 0 on loss tokens")
    sid = torch.where(m_BT, sid, torch.zeros_like(sid))
    S = int(sid.max().item()) + 1 if sid.numel() else 1
    mf = m_BT.to(d_BT.dtype)
    sums = torch.zeros(B, S, dtype=d_BT.dtype, device=d_BT.device)
    counts = torch.zeros(B, S, dtype=d_BT.dtype, device=d_BT.device)
    sums.scatter_add_(1, sid, d_BT * mf)
    counts.scatter_add_(1, sid, mf)
    means = sums / counts.clamp(min=1)
    return torch.gather(means, 1, sid)


def granular_logratio(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    loss_mask: torch.Tensor,
    config: WeightConfig,
    sentence_ids: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """u [B, T]: the signed log-ratio at the configured granularity (0 off the loss mask).

    Where ``teacher_mask`` is False the teacher said nothing: d = 0 there (a neutral ratio
    of 1), whatever the student's log-prob."""
    m = loss_mask.bool()
    s = _clean(student_logprobs, m)
    if teacher_logprobs is None:
        d = s
    else:
        d = config.sign * (s - _clean(teacher_logprobs, m))
        if teacher_mask is not None:
            d = torch.where(teacher_mask.bool(), d, torch.zeros_like(d))
    g = config.granularity
    if g == "token":
        u = d
    elif g == "prefix_mean":
        u = _prefix_mean(d, m)
    elif g == "prefix_ema":
        u = _prefix_ema(d, m, config.lam)
    elif g == "sentence":
        if sentence_ids is None:
            raise WeightConfigError(
                "WeightConfig.granularity='sentence' needs sentence_ids ([B, T] int), got None"
            )
        if sentence_ids.shape != m.shape:
            raise ValueError(
                f"sentence_ids has shape {tuple(sentence_ids.shape)} but loss_mask has "
                f"{tuple(m.shape)}"
            )
        u = _sentence_mean(d, m, sentence_ids)
    elif g == "sequence_mean":
        u = _masked_row_mean(d, m)[:, None].expand_as(d)
    else:  # sequence_sum
        u = (d * m).sum(dim=1)[:, None].expand_as(d)
    return torch.where(m, u, torch.zeros_like(u))


def compute_weights(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    loss_mask: torch.Tensor,
    config: WeightConfig,
    sentence_ids: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    student_entropy: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    baseline: float | None = None,
) -> torch.Tensor:
    """Detached per-token weights [B, T] (0 where loss_mask is False).

    student_logprobs, teacher_logprobs: [B, T] log p(y_t | x, y_<t) of the teacher token
    (teacher may be None: then d = log p_S). loss_mask: [B, T] bool. sentence_ids: [B, T]
    int, needed for granularity ``sentence``. teacher_mask: [B, T] bool, False where the
    teacher has no value (another tokenizer's gap, beyond its context): d = 0 there in
    every granular mean and the transform's weight is exactly 1 (before the gate, the NLL
    mix and ``per_sequence`` rescaling), whichever student log-prob it is paired with.
    student_entropy: [B, T] the student's predictive entropy in nats at each position,
    needed by an entropy ``gate`` (ignored otherwise). Order: transform, floor, the
    teacher-silent 1s, gate, NLL mix; then with normalization ``per_sequence`` the weights
    are rescaled to mean 1 over each row's loss tokens (the kept ones, for ``mask``).

    ``advantage`` (on-policy distillation): ``student_logprobs`` are the live student's
    (p_theta) and ``sampling_logprobs`` [B, T] those of the policy that sampled the tokens
    (None: the student's own, a ratio of 1); the advantage u = log p_T - log p_samp at the
    configured granularity, and w = c * (u - ubar) * clip(exp(log p_theta - log p_samp),
    w_min, w_max). ``config.baseline`` says what ubar is: ``none``, 0 (``baseline`` must
    be None or 0); ``batch_mean``, ``baseline`` (the step's mean, ``advantage_sum`` summed
    over its micro-batches and ranks) or, when None, the mean u over the teacher-known
    loss tokens of the tensors given. It needs teacher log-probs; where the teacher is
    silent the weight is 0 (no gradient; the token stays in the denominator), not 1.
    """
    m = loss_mask.bool()
    if baseline and config.baseline == "none":
        raise WeightConfigError(
            f"baseline={baseline!r} with WeightConfig.baseline='none': set "
            "baseline='batch_mean' (only the 'advantage' transform subtracts one)"
        )
    check_logprobs(student_logprobs, m, "student_logprobs")
    advantage = config.transform == "advantage"
    if advantage:
        if teacher_logprobs is None:
            raise WeightConfigError(
                "WeightConfig.transform='advantage' needs teacher_logprobs (the advantage is "
                "log p_T - log p_S), got None: score the samples with a teacher"
            )
        if sampling_logprobs is None:
            sampling_logprobs = student_logprobs
        else:
            check_logprobs(sampling_logprobs, m, "sampling_logprobs")
    if needs_entropy(config):
        if student_entropy is None:
            raise WeightConfigError(
                f"WeightConfig.gate={config.gate!r} needs student_entropy ([B, T] float, the "
                "student's predictive entropy in nats at each position), got None"
            )
        check_entropy(student_entropy, m)
    if teacher_logprobs is not None:
        known = m if teacher_mask is None else m & teacher_mask.bool()
        check_logprobs(teacher_logprobs, known, "teacher_logprobs")
    else:
        teacher_mask = None
    cfg = config
    with torch.no_grad():
        if cfg.transform == "none":
            w = torch.ones(m.shape, dtype=_float_dtype(student_logprobs), device=m.device)
        elif cfg.transform == "power":
            w = torch.exp(cfg.gamma * _clean(student_logprobs, m))
        elif advantage:
            u = granular_logratio(
                sampling_logprobs, teacher_logprobs, m, cfg, sentence_ids, teacher_mask
            )
            ubar = 0.0
            if cfg.baseline == "batch_mean":
                if baseline is None:
                    total, n = _known_sum(u, m, teacher_mask)
                    baseline = total / n if n else 0.0
                ubar = float(baseline)
            log_ratio = _clean(student_logprobs, m) - _clean(sampling_logprobs, m)
            ratio = torch.exp(log_ratio).clamp(min=cfg.w_min, max=cfg.w_max)
            w = cfg.c * (u - ubar) * ratio
        else:
            u = granular_logratio(
                student_logprobs, teacher_logprobs, m, cfg, sentence_ids, teacher_mask
            )
            if cfg.transform == "sigmoid":
                w = cfg.c * torch.sigmoid((u - cfg.b) / cfg.tau)
            elif cfg.transform == "exp_clip":
                # clamp in weight space: exp(log w_min) in fp32 misses w_min by up to
                # |log w_min| * 2^-24 relative; exp over/underflow lands on a bound anyway
                w = torch.exp(u / cfg.tau).clamp(min=cfg.w_min, max=cfg.w_max)
            else:  # mask
                log_lo = math.log(cfg.lo) if cfg.lo > 0 else -math.inf
                log_hi = math.log(cfg.hi) if cfg.hi > 0 else -math.inf
                w = ((u >= log_lo) & (u <= log_hi)).to(u.dtype)
        if cfg.floor > 0:
            w = cfg.floor + (1.0 - cfg.floor) * w
        if teacher_mask is not None and cfg.transform not in ("none", "power"):
            silent = torch.zeros_like(w) if advantage else torch.ones_like(w)
            w = torch.where(teacher_mask.bool(), w, silent)
        if cfg.gate != "none":
            w = w * entropy_gate(student_logprobs, student_entropy, m, cfg).to(w.dtype)
        if cfg.nll_mix > 0:
            w = cfg.nll_mix + (1.0 - cfg.nll_mix) * w
        w = torch.where(m, w, torch.zeros_like(w))
        if cfg.normalization == "per_sequence":
            mean_B = _masked_row_mean(w, loss_tokens(w, m, cfg))
            w = torch.where(mean_B[:, None] > 0, w / mean_B.clamp(min=1e-30)[:, None], w)
    return w.detach()


def advantage_sum(
    sampling_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    config: WeightConfig,
    sentence_ids: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
) -> tuple[float, int]:
    """(sum of u, tokens) over the loss tokens the teacher has a value for: u = log p_T -
    log p_samp at the configured granularity, the ``advantage`` transform's u before its
    baseline. Summed over an optimizer step's micro-batches (and ranks), sum / tokens is
    the ``batch_mean`` baseline."""
    if config.transform != "advantage":
        raise WeightConfigError(
            f"advantage_sum needs transform='advantage', got {config.transform!r}"
        )
    m = loss_mask.bool()
    with torch.no_grad():
        u = granular_logratio(
            sampling_logprobs, teacher_logprobs, m, config, sentence_ids, teacher_mask
        )
        return _known_sum(u, m, teacher_mask)


def _known_sum(u: torch.Tensor, m: torch.Tensor, teacher_mask: torch.Tensor | None):
    """(sum of u in float64, tokens) over the loss tokens the teacher has a value for."""
    known = m if teacher_mask is None else m & teacher_mask.bool()
    return float(u[known].double().sum()), int(known.sum())


def loss_tokens(weights: torch.Tensor, loss_mask: torch.Tensor, config: WeightConfig):
    """The tokens that count in the loss's denominators [B, T] bool: the loss mask, less the
    tokens the ``mask`` transform masked out (weight 0): METHOD.md, "masked tokens leave the
    denominator", in every normalisation."""
    m = loss_mask.bool()
    if config.transform == "mask":
        return m & (weights > 0)
    return m


def weight_diagnostics(
    weights: torch.Tensor,
    loss_mask: torch.Tensor,
    config: WeightConfig | None = None,
    bins: int = 20,
    position_edges: tuple[int, ...] = (0, 64, 256, 1024, 4096),
) -> dict:
    """What every run should log about its weights (plain Python numbers, JSON-ready).

    ess: effective sample size (sum w)^2 / sum w^2 over loss tokens, and ess_fraction =
    ess / tokens. clip shares: share of tokens at w_min / w_max (exp_clip), masked out
    (mask), or in the outer 1% of (0, c) (sigmoid). mean weight per position bucket
    (position counted from each row's first loss token) and the Pearson correlation of a
    row's mean weight with its response length.
    """
    m = loss_mask.bool()
    w = weights.detach().to(torch.float64)
    wm = w[m]
    n = int(wm.numel())
    out: dict = {"tokens": n}
    if n == 0:
        return out
    s1, s2 = float(wm.sum()), float((wm * wm).sum())
    ess = (s1 * s1 / s2) if s2 > 0 else 0.0
    out.update(
        mean=s1 / n,
        std=float(wm.std(unbiased=False)),
        min=float(wm.min()),
        max=float(wm.max()),
        ess=ess,
        ess_fraction=ess / n,
    )
    hi = float(wm.max())
    if config is not None and config.transform == "sigmoid":
        hi = max(hi, _outer(config, config.c))
    elif config is not None and config.transform == "exp_clip":
        hi = max(hi, config.w_max)
    hi = hi if hi > 0 else 1.0
    lo = min(0.0, float(wm.min()))  # signed weights (``advantage``) reach below 0
    counts = torch.histc(wm, bins=bins, min=lo, max=hi)
    out["histogram"] = {
        "edges": [lo + (hi - lo) * i / bins for i in range(bins + 1)],
        "counts": [int(c) for c in counts.tolist()],
    }
    out["clip_shares"] = _clip_shares(wm, config) if config is not None else {}
    out["mean_by_position"] = _mean_by_position(wm, m, position_edges)
    lens = m.sum(dim=1).to(torch.float64)
    keep = lens > 0
    row_mean = (w * m).sum(dim=1)[keep] / lens[keep]
    lens = lens[keep]
    corr = float("nan")
    if lens.numel() >= 2 and lens.std() > 0 and row_mean.std() > 0:
        corr = float(torch.corrcoef(torch.stack([row_mean, lens]))[0, 1])
    out["corr_weight_length"] = corr
    return out


def _outer(config: WeightConfig, w: float) -> float:
    """A transform's weight ``w`` after the floor and the NLL mix (the gate aside)."""
    w = config.floor + (1 - config.floor) * w
    return config.nll_mix + (1 - config.nll_mix) * w


def _clip_shares(wm: torch.Tensor, config: WeightConfig) -> dict:
    """Shares of the loss tokens' weights ``wm`` [N] at their transform's bounds (after the
    floor and the NLL mix; a gate moves tokens off them)."""
    eps = 1e-6
    if config.transform == "exp_clip":
        lo_w, hi_w = _outer(config, config.w_min), _outer(config, config.w_max)
        return {
            "at_w_min": float(((wm - lo_w).abs() <= eps * max(1, lo_w)).double().mean()),
            "at_w_max": float(((wm - hi_w).abs() <= eps * hi_w).double().mean()),
        }
    if config.transform == "mask":
        return {"masked_out": float((wm <= _outer(config, 0.0) + eps).double().mean())}
    if config.transform == "sigmoid":
        band = 0.01 * config.c * (1 - config.nll_mix)
        return {
            "near_low": float((wm <= _outer(config, 0.0) + band).double().mean()),
            "near_high": float((wm >= _outer(config, config.c) - band).double().mean()),
        }
    return {}


def _mean_by_position(wm: torch.Tensor, m_BT: torch.Tensor, position_edges) -> dict:
    """Mean weight per bucket of position inside the response (index minus the row's first
    loss index); ``wm`` [N] are the weights of ``m_BT``'s loss tokens."""
    T = m_BT.shape[1]
    idx = torch.arange(T, device=m_BT.device)[None, :].expand_as(m_BT)
    first = torch.where(m_BT, idx, torch.full_like(idx, T)).min(dim=1).values
    pos = (idx - first[:, None])[m_BT]
    edges = list(position_edges) + [None]
    buckets = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (pos >= lo) if hi is None else ((pos >= lo) & (pos < hi))
        if sel.any():
            key = f"{lo}+" if hi is None else f"{lo}-{hi}"
            buckets[key] = float(wm[sel].mean())
    return buckets
