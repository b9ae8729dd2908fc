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
PAD = 0  # the shipped tiny-bpe tokenizer's pad id (checked by ``load_pair``)
LENGTHS = (2, 6)  # codes per list, as both models were trained


def _code_table() -> tuple[dict[str, int], list[str]]:
    record = json.loads((MODELS / "TRAINING.json").read_text())["codes"]
    return {c: int(v) for c, v in record["values"].items()}, list(record["known_to_student"])


VALUES, KNOWN = _code_table()
NEW = [c for c in VALUES if c not in KNOWN]
POOLS = {"all": list(VALUES), "known": KNOWN}
_LINE = re.compile(r"^([a-z]{3})(\d)=(\d)$")


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


def make_problems(n: int, rng: random.Random, pool: str = "all", exclude=()) -> list[Problem]:
    """``n`` distinct problems of LENGTHS codes drawn from ``pool``, none in ``exclude``."""
    seen, out = set(exclude), []
    while len(out) < n:
        p = Problem(tuple(rng.choice(POOLS[pool]) for _ in range(rng.randint(*LENGTHS))))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


@dataclass(frozen=True)
class Grade:
    """correct: the answer after ``####`` is right. derailed: the scratchpad left the task's
    form (a line that is not ``<code><digit>=<digit>``, a code out of the prompt's order, a
    missing or extra line, no ``####`` answer). lines_error: step lines written minus the
    list's length."""

    correct: bool
    derailed: bool
    lines_error: int


def grade(p: Problem, response: str) -> Grade:
    body, sep, tail = response.strip().partition("####")
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    steps = [_LINE.match(ln) for ln in lines]
    in_form = (
        bool(sep)
        and tail.strip().isdigit()
        and len(lines) == len(p.codes)
        and all(m is not None and m.group(1) == c for m, c in zip(steps, p.codes))
    )
    correct = bool(sep) and tail.split()[:1] == [str(running_sums(p)[-1])]
    return Grade(correct=correct, derailed=not in_form, lines_error=len(lines) - len(p.codes))
