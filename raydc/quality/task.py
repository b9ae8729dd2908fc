"""The task: its character tokenizer, problems, reference solutions in two styles, the
grader and the valid-next-token oracle."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

PAD, EOS = 0, 1
LETTERS = "abcdefghijklmn"  # item labels: lists hold up to 14 items
CHARS = "0123456789SD:=#\n" + LETTERS
VOCAB = ["<pad>", "<eos>", *CHARS]
VOCAB_SIZE = 64  # rounded up; ids >= len(VOCAB) never occur in data
_STOI = {c: i + 2 for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    """Characters to ids; an unknown character is an error naming it."""
    try:
        return [_STOI[c] for c in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the task vocabulary") from None


def decode(ids: Sequence[int]) -> str:
    """Ids to text, stopping at the first EOS and dropping padding."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i == PAD:
            continue
        out.append(VOCAB[i] if i < len(VOCAB) else "?")
    return "".join(out)


STYLES = ("forward", "backward")


@dataclass(frozen=True)
class Problem:
    """kind ``S``: running sum mod 10 over ``digits``; kind ``D``: double each digit (mod
    10), each after its label.

    The prompt labels each item with a letter (``Sa3b9c4:``); a step of the ``S`` trace
    names the item it consumes, its digit and the running sum (``c4=6``), one per line,
    then ``#answer``. Looking an item up by its label is easy for a small transformer;
    *which* label comes next is the trace's state, and that is where styles differ.
    """

    kind: str
    digits: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.digits) <= len(LETTERS):
            raise ValueError(f"a problem holds 1 to {len(LETTERS)} digits, got {len(self.digits)}")

    @property
    def prompt(self) -> str:
        items = "".join(f"{LETTERS[i]}{d}" for i, d in enumerate(self.digits))
        return f"{self.kind}{items}:"

    @property
    def answer(self) -> str:
        if self.kind == "S":
            return str(sum(self.digits) % 10)
        # Labelled like the prompt, after a mark (``=a6b8c8``): a look-up by label as in
        # the ``S`` trace, and distinct from it from the first token on.
        return "=" + "".join(f"{LETTERS[i]}{2 * d % 10}" for i, d in enumerate(self.digits))


def style_order(n: int, style: str) -> list[int]:
    """Item indices in the order a style consumes them."""
    if style == "forward":
        return list(range(n))
    if style == "backward":
        return list(range(n - 1, -1, -1))
    raise ValueError(f"style={style!r}: must be one of {STYLES}")


def solution(problem: Problem, style: str = "forward") -> str:
    """The correct response text (without EOS) in the given style."""
    if problem.kind == "D":
        return problem.answer
    lines, r = [], 0
    for i in style_order(len(problem.digits), style):
        d = problem.digits[i]
        r = (r + d) % 10
        lines.append(f"{LETTERS[i]}{d}={r}\n")
    return "".join(lines) + f"#{r}"


def make_problems(
    n: int, rng: random.Random, lengths: tuple[int, int], kind: str = "S"
) -> list[Problem]:
    """n random problems with list lengths uniform in [lo, hi]."""
    lo, hi = lengths
    return [
        Problem(kind, tuple(rng.randrange(10) for _ in range(rng.randint(lo, hi))))
        for _ in range(n)
    ]


_STEP = re.compile(r"([a-n])(\d)=(\d)")


@dataclass
class TraceGrade:
    """What a response did. ``valid``: every step names an item not yet consumed, with
    its digit and the right running sum; every item is consumed once; the answer is
    right."""

    correct: bool  # the final answer is right
    valid: bool
    finished: bool  # reached ``#answer`` (then EOS or the end)
    n_steps: int
    style: str  # forward | backward | other


def grade(problem: Problem, response: str) -> TraceGrade:
    """Grade a decoded response (text up to EOS) for ``problem``."""
    if problem.kind == "D":
        ok = response == problem.answer
        return TraceGrade(ok, ok, True, 0, "other")
    body, sep, ans = response.partition("#")
    finished = bool(sep) and len(ans) == 1 and ans.isdigit()
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    n = len(problem.digits)
    consumed: list[int] = []
    r, steps_ok = 0, True
    for line in lines:
        m = _STEP.fullmatch(line)
        if not m:
            steps_ok = False
            break
        i, d, got = LETTERS.index(m.group(1)), int(m.group(2)), int(m.group(3))
        if i >= n or i in consumed or problem.digits[i] != d or got != (r + d) % 10:
            steps_ok = False
        r = got
        consumed.append(i)
    correct = finished and ans == problem.answer
    valid = correct and steps_ok and sorted(consumed) == list(range(n))
    if consumed == style_order(n, "forward"):
        style = "forward"
    elif consumed == style_order(n, "backward"):
        style = "backward"
    else:
        style = "other"
    return TraceGrade(correct, valid, finished, len(lines), style)


def valid_next_tokens(problem: Problem, response: str) -> list[set[int]]:
    """For each position of ``response + EOS``: the set of token ids that are a valid next
    token *given the reference prefix before it* (any unconsumed item's label, then that
    item's digit, the right sum, the punctuation). ``response`` must be a correct ``S``
    solution in any style."""
    if problem.kind != "S":
        raise ValueError("valid_next_tokens is defined for S problems")
    left = set(range(len(problem.digits)))
    r, out = 0, []
    lines = response.split("\n")
    for line in lines[:-1]:
        m = _STEP.fullmatch(line)
        if not m:
            raise ValueError(f"reference step {line!r} is malformed")
        i = LETTERS.index(m.group(1))
        d = problem.digits[i]
        out.append({_STOI[LETTERS[k]] for k in left})
        out.append({_STOI[str(d)]})
        out.append({_STOI["="]})
        out.append({_STOI[str((r + d) % 10)]})
        out.append({_STOI["\n"]})
        left.discard(i)
        r = (r + d) % 10
    if lines[-1] != f"#{r}":
        raise ValueError(f"reference answer {lines[-1]!r} is not #{r}")
    out.append({_STOI["#"]})
    out.append({_STOI[str(r)]})
    out.append({EOS})
    return out
