"""What every arm of the quality benchmark computes, in FLOPs (issue 32: arms compared at
matched compute, generation and scoring included).

The convention is ``raydc.method.opd.round_flops``'s: a forward is 2 x params per token, a
trained token 6 x the student's params (forward and backward); attention's own FLOPs are
left out, and params are ``bench.quality.models.count_params`` (embeddings included). A
token is a real token of a row, prompt included (the prompt's prefill is a forward too);
padding is not counted.

- Training: 6 x student params x the real tokens of every step's rows (``FlopCount.train``).
  Every arm trains the current student, so its live log-probs come with the training
  forward itself and cost nothing more.
- An offline trace costs what the benchmark spent to make it (``trace_row_flops``): the
  teacher's generation (its prompt and response tokens, 2 x teacher params each), one
  forward of the row under the teacher and one under the student (every trace set is
  scored under both, whichever the arm's weighting reads). A DASD-selected trace also
  carries its prompt's other candidates (the selection needed them all).
- Attribution: an offline arm pays for a trace the first time one of its batches draws it
  (``TraceCost``); drawing it again is free. At the end of a full run nearly every trace has
  been drawn (6,400 draws with replacement from 1,000 traces leave 0.2% undrawn), so the
  final figure is about the whole set's cost; along the way the curve over FLOPs is not
  flattered by traces the arm had not used yet.
- An on-policy round (``bench.quality.on_policy``): the student's generation of every
  sample (truncated ones included), the teacher's scoring of the samples trained on; the
  student's sampling log-probs come with the generation (no scoring forward).
- Not counted, for any arm: the evaluations, and the tune arm's search (reported as its
  own cost in optimizer steps).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from raydc.method.opd import FORWARD_FLOPS_PER_PARAM, TRAIN_FLOPS_PER_PARAM

PARTS = ("generation", "student_scoring", "teacher_scoring", "training")
TRACE_PARTS = ("generation", "student_scoring", "teacher_scoring")  # an offline trace's


def trace_row_flops(
    lengths: Sequence[int], student_params: int, teacher_params: int
) -> dict[str, list[int]]:
    """Per row of a teacher trace set (``lengths``: each row's prompt + response tokens),
    what it cost to make: the teacher's generation of it and its scoring under the
    teacher and under the student, one list per part of TRACE_PARTS."""
    f = FORWARD_FLOPS_PER_PARAM
    n = [int(x) for x in lengths]
    return {
        "generation": [f * teacher_params * x for x in n],
        "student_scoring": [f * student_params * x for x in n],
        "teacher_scoring": [f * teacher_params * x for x in n],
    }


def sum_row_flops(per_set: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Row i's cost summed over several sets of the same prompts (a DASD pick's candidates:
    row i of every set)."""
    return {p: [sum(xs) for xs in zip(*(s[p] for s in per_set))] for p in TRACE_PARTS}


@dataclass
class FlopCount:
    """An arm's running FLOPs by part (PARTS); ``total`` is their sum."""

    student_params: int
    parts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))

    def add(self, flops: dict) -> None:
        """Add a ``round_flops``-like dict (its ``total`` and unknown keys are ignored)."""
        for p in PARTS:
            self.parts[p] += int(flops.get(p, 0))

    def train(self, tokens: int) -> None:
        """One step's trained tokens (real tokens of its rows)."""
        self.parts["training"] += TRAIN_FLOPS_PER_PARAM * self.student_params * int(tokens)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def record(self) -> dict:
        """What a record carries: ``flops`` (the total) and ``flops_parts``."""
        return {"flops": self.total, "flops_parts": dict(self.parts)}


class TraceCost:
    """The cost of the traces an offline phase has drawn: each row's ``trace_row_flops`` is
    paid the first time a batch draws it. Without ``row_flops`` (a set saved before the
    benchmark counted them) nothing is paid and ``known`` is False."""

    def __init__(self, row_flops: dict[str, list[int]] | None):
        self.row_flops, self.known = row_flops, row_flops is not None
        self.drawn: set[int] = set()

    def draw(self, rows: Iterable[int]) -> dict[str, int]:
        """The cost of the rows among ``rows`` not drawn before (by part)."""
        new = sorted(set(int(r) for r in rows) - self.drawn)
        self.drawn.update(new)
        if not self.known:
            return dict.fromkeys(TRACE_PARTS, 0)
        return {p: sum(self.row_flops[p][i] for i in new) for p in TRACE_PARTS}


def mean_parts(records: Sequence[dict]) -> dict[str, float]:
    """The mean over records (one per seed) of each part of ``flops_parts`` and the total."""
    rs = [r for r in records if r.get("flops_parts")]
    if not rs:
        return {}
    out = {p: sum(r["flops_parts"].get(p, 0) for r in rs) / len(rs) for p in PARTS}
    out["total"] = sum(r["flops"] for r in rs) / len(rs)
    return out
