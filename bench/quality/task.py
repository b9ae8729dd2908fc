"""The benchmark's task: the shipped sumtask (raydc/assets/sumtask), its problems and grader.

A running sum mod 10 over a list of three-letter codes, each worth a digit, written as one
scratchpad line per code (the code, its value, the sum so far) and the answer after
``####``::

    Sum mod 10: sus sux jev      sus0=0
                                 sux9=9
                                 jev5=4
                                 #### 4

The code table is the one the shipped models were trained on (models/TRAINING.json): 40
codes; the student knows the first 24 (``KNOWN``), the teacher all of them.

The benchmark runs in three regimes (``REGIMES``; docs/results.md defines and motivates
each): K, the shipped pair (the student lacks 16 codes); C, a student that knows every code
and a teacher that writes each line without the code's value (``sux=9``: lookup and
addition in one token); L, the same student and a teacher on lists of 8-16 codes. C's and L's models are
built by scripts/build_regimes.py into bench/quality/assets/.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

ASSETS = Path(str(resources.files("raydc") / "assets" / "sumtask"))
MODELS = ASSETS / "models"
REGIME_MODELS = Path(__file__).resolve().parent / "assets"  # scripts/build_regimes.py
PAD = 0  # the shipped tiny-bpe tokenizer's pad id (checked by ``load_pair``)
LENGTHS = (2, 6)  # codes per list, as both models were trained


def _code_table() -> tuple[dict[str, int], list[str]]:
    record = json.loads((MODELS / "TRAINING.json").read_text())["codes"]
    return {c: int(v) for c, v in record["values"].items()}, list(record["known_to_student"])


VALUES, KNOWN = _code_table()
NEW = [c for c in VALUES if c not in KNOWN]
POOLS = {"all": list(VALUES), "known": KNOWN}
# A scratchpad line: one code with its value (``jev5=4``) or without (``jev=4``, the
# capacity teacher's), or two codes (``sus0+sux9=9``).
_LINE = re.compile(r"^([a-z]{3})(\d)?(?:\+([a-z]{3})(\d))?=(\d)$")


@dataclass(frozen=True)
class Problem:
    codes: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return "Sum mod 10: " + " ".join(self.codes)

    @property
    def has_new(self) -> bool:
        return any(c not in KNOWN for c in self.codes)


def running_sums(p: Problem) -> list[int]:
    out, s = [], 0
    for c in p.codes:
        s = (s + VALUES[c]) % 10
        out.append(s)
    return out


def solution(p: Problem) -> str:
    """The gold scratchpad: ``jev5=4`` per code, then ``#### 4``."""
    sums = running_sums(p)
    lines = [f"{c}{VALUES[c]}={s}" for c, s in zip(p.codes, sums)]
    return "\n".join(lines) + f"\n#### {sums[-1]}"


@dataclass(frozen=True)
class Regime:
    """One regime of the benchmark: its pair, the lists its traces and evaluation use, the
    prior the student already had (its own training distribution), and the run's size."""

    name: str
    teacher: Path
    student: Path
    lengths: tuple[int, int]  # codes per list of the trace prompts and the eval problems
    prior_pool: str  # the prior's lists: codes the student knew, as long as it was taught
    prior_lengths: tuple[int, int]
    max_new_tokens: int  # generation budget of an answer (the longest list's lines + ####)
    steps: int  # optimizer steps of every arm
    batch_size: int
    summary: str

    @property
    def models_present(self) -> bool:
        return all((d / "config.json").is_file() for d in (self.teacher, self.student))


REGIMES = {
    "knowledge": Regime(
        "knowledge",
        MODELS / "teacher",
        MODELS / "student",
        (2, 6),
        "known",
        (2, 6),
        64,
        200,
        32,
        "K: the student lacks 16 of the teacher's 40 codes",
    ),
    "capacity": Regime(
        "capacity",
        REGIME_MODELS / "teacher_terse",
        REGIME_MODELS / "student_all",
        (2, 6),
        "all",
        (2, 6),
        64,
        200,
        32,
        "C: the student knows every code; the teacher skips the values",
    ),
    "long": Regime(
        "long",
        REGIME_MODELS / "teacher_long",
        REGIME_MODELS / "student_all",
        (8, 16),
        "all",
        (2, 6),
        160,
        120,
        16,
        "L: the student knows every code, taught on 2-6 codes; lists of 8-16",
    ),
}


def make_problems(
    n: int, rng: random.Random, pool: str = "all", exclude=(), lengths: tuple[int, int] = LENGTHS
) -> list[Problem]:
    """``n`` distinct problems of ``lengths`` codes drawn from ``pool``, none in ``exclude``."""
    seen, out = set(exclude), []
    while len(out) < n:
        p = Problem(tuple(rng.choice(POOLS[pool]) for _ in range(rng.randint(*lengths))))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


@dataclass(frozen=True)
class Grade:
    """correct: the answer after ``####`` is right. derailed: the scratchpad left the task's
    form (a line that is neither ``<code><digit>=<digit>`` nor ``<code><digit>+<code><digit>
    =<digit>``, codes out of the prompt's order, a missing or extra code, no ``####``
    answer). lines_error: codes the step lines cover minus the list's length."""

    correct: bool
    derailed: bool
    lines_error: int


def grade(p: Problem, response: str) -> Grade:
    body, sep, tail = response.strip().partition("####")
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    steps = [_LINE.match(ln) for ln in lines]
    covered = [c for m in steps if m is not None for c in (m.group(1), m.group(3)) if c]
    n_codes = len(covered) + sum(m is None for m in steps)
    in_form = (
        bool(sep)
        and tail.strip().isdigit()
        and all(m is not None for m in steps)
        and tuple(covered) == p.codes
    )
    correct = bool(sep) and tail.split()[:1] == [str(running_sums(p)[-1])]
    return Grade(correct=correct, derailed=not in_form, lines_error=n_codes - len(p.codes))
