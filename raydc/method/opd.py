"""On-policy distillation's round accounting: what the student sampled, how far it is from
the teacher, the guards that stop a run going wrong, and what a round cost.

Pure Python and numpy (the ``on_policy`` stage feeds them its samples and its scored store):

- ``sample_stats``: per round, the samples' mean length, EOS rate (ended with a stop token)
  and truncation share (hit ``max_new_tokens``). A reverse-KL student of a thinking teacher,
  or a base student, learns to stop emitting EOS: its samples run to the budget.
- ``reverse_kl_stats``: the mean reverse KL, mean of log p_S - log p_T over the sampled
  (loss) tokens the teacher has a value for (the k1 estimator), and the teacher-silent
  tokens (another tokenizer's gaps: weight 0 under the ``advantage`` transform), counted.
- ``check_band``: stops the stage, naming the field, when the EOS rate or the mean length
  leaves its configured band.
- ``round_flops``: 2 x params x tokens for a forward (generation, student and teacher
  scoring), 6 x params x tokens for a trained token (forward and backward).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

FORWARD_FLOPS_PER_PARAM = 2  # one multiply-add per parameter per token
TRAIN_FLOPS_PER_PARAM = 6  # forward (2) + backward (4)


class OnPolicyGuardError(RuntimeError):
    """A round's samples left the configured band; the message names the field."""


def sample_stats(lengths: Sequence[int], finish_reasons: Sequence[str]) -> dict:
    """The samples of one round: count, tokens, mean length (tokens, the stop token
    included), EOS rate (share that ended with a stop token: ``finish_reason == "stop"``)
    and truncation share (``"length"``: cut at ``max_new_tokens``)."""
    if len(lengths) != len(finish_reasons):
        raise ValueError(f"{len(lengths)} lengths but {len(finish_reasons)} finish reasons")
    n = len(lengths)
    tokens = int(sum(int(x) for x in lengths))
    stops = sum(1 for r in finish_reasons if r == "stop")
    truncated = sum(1 for r in finish_reasons if r == "length")
    return {
        "samples": n,
        "sampled_tokens": tokens,
        "mean_length": tokens / n if n else 0.0,
        "eos_rate": stops / n if n else 0.0,
        "truncation_share": truncated / n if n else 0.0,
        "stopped": stops,
        "truncated": truncated,
    }


def reverse_kl_stats(
    student_logprobs: Iterable[Sequence[float]],
    teacher_logprobs: Iterable[Sequence[float] | None],
    loss_masks: Iterable[Sequence[bool]],
    teacher_masks: Iterable[Sequence[bool] | None],
) -> dict:
    """Per-row log-probs and masks of a scored store (ragged) -> the round's reverse KL.

    ``mean_reverse_kl``: mean of s - t over loss tokens the teacher has a value for (a row
    without teacher log-probs has none); ``teacher_gap_tokens``: loss tokens it has none for
    (counted, never averaged in); ``loss_tokens``: all of them."""
    total, known, gaps = 0.0, 0, 0
    tokens = 0
    for s, t, m, tm in zip(student_logprobs, teacher_logprobs, loss_masks, teacher_masks):
        m = np.asarray(m, dtype=bool)
        tokens += int(m.sum())
        if t is None:
            gaps += int(m.sum())
            continue
        k = m if tm is None else m & np.asarray(tm, dtype=bool)
        gaps += int(m.sum() - k.sum())
        d = np.asarray(s, dtype=np.float64)[k] - np.asarray(t, dtype=np.float64)[k]
        total += float(d.sum())
        known += int(k.sum())
    return {
        "loss_tokens": tokens,
        "teacher_known_tokens": known,
        "teacher_gap_tokens": gaps,
        "mean_reverse_kl": total / known if known else float("nan"),
    }


def check_band(
    stats: dict,
    eos_rate_min: float = 0.0,
    mean_length_min: float | None = None,
    mean_length_max: float | None = None,
    where: str = "on_policy",
    round_index: int | None = None,
    max_new_tokens: int | None = None,
) -> None:
    """Raise ``OnPolicyGuardError`` naming ``<where>.<field>`` when ``stats``
    (``sample_stats``) leave the band: EOS rate below ``eos_rate_min``, mean length
    outside [``mean_length_min``, ``mean_length_max``] (None: unbounded)."""
    which = "the samples" if round_index is None else f"round {round_index}'s samples"
    n = stats["samples"]
    if n == 0:
        raise OnPolicyGuardError(f"{which}: none to check (no prompt was sampled)")
    if stats["eos_rate"] < eos_rate_min:
        budget = f" at {where}.max_new_tokens={max_new_tokens}" if max_new_tokens else ""
        raise OnPolicyGuardError(
            f"{where}.eos_rate_min={eos_rate_min}: {which} ended with a stop token at rate "
            f"{stats['eos_rate']:.3f} ({stats['stopped']} of {n}; {stats['truncated']} cut"
            f"{budget}): the student is losing EOS (a reverse-KL student of a thinking "
            "teacher or a base student learns to run on); stop here, start from an SFT'd "
            "student, lower the coefficient, or lower the bound"
        )
    mean = stats["mean_length"]
    if mean_length_min is not None and mean < mean_length_min:
        raise OnPolicyGuardError(
            f"{where}.mean_length_min={mean_length_min}: {which} have a mean length of "
            f"{mean:.1f} tokens: the student's answers collapsed"
        )
    if mean_length_max is not None and mean > mean_length_max:
        raise OnPolicyGuardError(
            f"{where}.mean_length_max={mean_length_max}: {which} have a mean length of "
            f"{mean:.1f} tokens (EOS rate {stats['eos_rate']:.3f}): the student's answers "
            "are running long"
        )


def round_flops(
    student_params: int,
    teacher_params: int,
    generated_tokens: int,
    student_scored_tokens: int,
    teacher_scored_tokens: int,
    trained_tokens: int,
    extra_forward_tokens: int = 0,
) -> dict:
    """The FLOPs a round's token counts imply: a forward is 2 x params per token
    (generation: prompt prefill and sampled tokens; scoring by the student and the
    teacher; ``extra_forward_tokens``: the student's no-grad forwards in training), a
    trained token 6 x params (forward and backward). Attention's own FLOPs are left out."""
    for name, v in (("student_params", student_params), ("teacher_params", teacher_params)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}={v!r}: must be an integer >= 0")
    f = FORWARD_FLOPS_PER_PARAM
    out = {
        "generation": f * student_params * int(generated_tokens),
        "student_scoring": f * student_params * int(student_scored_tokens),
        "teacher_scoring": f * teacher_params * int(teacher_scored_tokens),
        "training": TRAIN_FLOPS_PER_PARAM * student_params * int(trained_tokens)
        + f * student_params * int(extra_forward_tokens),
    }
    out["total"] = sum(out.values())
    return out


def add_flops(a: dict, b: dict) -> dict:
    """Two ``round_flops`` records summed key by key (the stage's running total)."""
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))}


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: a mean over nothing is written as null."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
