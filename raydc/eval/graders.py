"""Final-answer graders: GSM8K numbers and MATH-style boxed answers.

A grader turns a gold solution into its final answer once (``gold_answer``, which raises
:class:`GoldAnswerError` when the gold has none, so a bad eval row is rejected up front
rather than silently scored wrong) and grades each model response against it (``grade``).

- ``gsm8k``: the gold answer is the number after ``####``. A response's answer is the first
  number after its last ``####``, falling back to the last number anywhere in the text (small
  or un-prompted models rarely emit the marker). Numbers are compared exactly as fractions
  after removing thousands separators, ``$``, ``%`` and a leading unicode minus, so
  ``1,450,000`` = ``1450000``, ``18.00`` = ``18`` and ``1/2`` = ``0.5``.
- ``boxed``: the answer is the content of the last ``\\boxed{...}`` (nested braces kept);
  the gold is the same, or the whole gold string when it holds no ``\\boxed`` (MATH500's
  ``answer`` column). Equality is decided by ``math-verify`` (Hugging Face's maintained
  LaTeX/sympy answer checker: fractions, ``\\dfrac``, ``\\left(``, degrees, percentages,
  sets, intervals), after a cheap exact match on whitespace-free strings.

A response "never reaches an answer" when the grader extracts nothing from it
(``Grade.predicted is None``); the report counts those separately from wrong answers.
Pure Python (math-verify pulls sympy, not torch); no Ray or vLLM here.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from fractions import Fraction

GRADERS = ("gsm8k", "boxed")


class GoldAnswerError(ValueError):
    """A gold solution with no final answer the grader can read."""


@dataclass(frozen=True)
class Grade:
    correct: bool
    predicted: str | None  # the extracted final answer; None: the response reached none
    gold: str  # the gold final answer the response was compared with


# ----------------------------------------------------------------------------- GSM8K

# A number: optional sign, thousands-separated or plain digits, optional decimals, an
# optional "/denominator". Thousands groups must be exactly three digits, so a list such as
# "3,4" reads as two numbers, not 34.
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_NUMBER = re.compile(
    rf"(?<![\w.])(?P<sign>[-−]\s?)?\$?\s?(?P<num>{_INT}(?:\.\d+)?|\.\d+)"
    rf"(?:\s?/\s?(?P<den>{_INT}(?:\.\d+)?))?"
)


def parse_number(text: str) -> Fraction | None:
    """The single number ``text`` holds (``"$1,200.50"``, ``"-3/4"``, ``"45%"``), or None."""
    s = text.strip().rstrip(".").strip()
    s = s.removesuffix("%").strip()
    m = _NUMBER.fullmatch(s)
    return _match_value(m) if m else None


def _match_value(m: re.Match) -> Fraction | None:
    value = Fraction(m.group("num").replace(",", ""))
    if m.group("den") is not None:
        den = Fraction(m.group("den").replace(",", ""))
        if den == 0:
            return None
        value = value / den
    return -value if m.group("sign") else value


def _numbers(text: str) -> list[tuple[str, Fraction]]:
    out = []
    for m in _NUMBER.finditer(text):
        value = _match_value(m)
        if value is not None:
            out.append((m.group(0).strip(), value))
    return out


def gsm8k_gold_answer(solution: str) -> str:
    """The number after ``####`` in a GSM8K gold solution (commas removed)."""
    if "####" not in solution:
        raise GoldAnswerError("no '####' final-answer marker in the gold solution")
    tail = solution.rsplit("####", 1)[1].strip()
    value = parse_number(tail)
    if value is None:
        raise GoldAnswerError(f"the text after '####' is not a number: {tail[:50]!r}")
    return _fraction_str(value)


def gsm8k_extract(response: str) -> tuple[str, Fraction] | None:
    """A response's final answer: the first number after its last ``####``, else the last
    number in the text; None when it holds no number."""
    if "####" in response:
        after = _numbers(response.rsplit("####", 1)[1])
        if after:
            return after[0]
    found = _numbers(response)
    return found[-1] if found else None


def grade_gsm8k(response: str, gold: str) -> Grade:
    """Grade one response against a gold answer (a number, or a full gold solution)."""
    gold_answer = gsm8k_gold_answer(gold) if "####" in gold else _gsm8k_bare(gold)
    gold_value = Fraction(gold_answer)
    found = gsm8k_extract(response)
    if found is None:
        return Grade(False, None, gold_answer)
    text, value = found
    return Grade(value == gold_value, text, gold_answer)


def _fraction_str(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(value)


# ----------------------------------------------------------------------------- boxed


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with nested braces kept;
    ``\\boxed 5`` (no braces) gives ``5``. None when there is none or it never closes."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    for m in reversed(starts):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
                j += 1
            continue  # unbalanced: try an earlier \boxed
        bare = re.match(r"[^\s$]+", text[i:])
        if bare:
            return bare.group(0)
    return None


def boxed_gold_answer(solution: str) -> str:
    """The last boxed answer of a MATH solution, or the whole string when it has none."""
    if "\\boxed" in solution or "\\fbox" in solution:
        ans = last_boxed(solution)
        if ans is None:
            raise GoldAnswerError("the gold solution's \\boxed{...} never closes")
    else:
        ans = solution.strip()
    if not ans:
        raise GoldAnswerError("empty gold answer")
    return ans


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s).replace("\\!", "").replace("\\,", "").replace("\\;", "")


def boxed_equal(predicted: str, gold: str) -> bool:
    """Whether two boxed answers are mathematically equal (math-verify)."""
    if _squash(predicted) == _squash(gold):
        return True
    from math_verify import parse, verify

    # math-verify bounds each parse/compare with signal.alarm, which only works on the
    # main thread; elsewhere (Ray actors, thread pools) it must run without a timeout.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(f"\\boxed{{{gold}}}", parsing_timeout=limit)
        p = parse(f"\\boxed{{{predicted}}}", parsing_timeout=limit)
        return bool(g and p and verify(g, p, timeout_seconds=limit))
    except Exception:  # noqa: BLE001 - a parse failure or timeout is a wrong answer
        return False


def grade_boxed(response: str, gold: str) -> Grade:
    """Grade one response against a gold solution or bare gold answer."""
    gold_answer = boxed_gold_answer(gold)
    predicted = last_boxed(response)
    if predicted is None:
        return Grade(False, None, gold_answer)
    return Grade(boxed_equal(predicted, gold_answer), predicted, gold_answer)


# ----------------------------------------------------------------------------- dispatch


def gold_answer(grader: str, gold: str) -> str:
    """The final answer of a gold solution under ``grader``; GoldAnswerError if none."""
    if grader == "gsm8k":
        return gsm8k_gold_answer(gold) if "####" in gold else _gsm8k_bare(gold)
    if grader == "boxed":
        return boxed_gold_answer(gold)
    raise ValueError(f"grader={grader!r}: must be one of {list(GRADERS)}")


def _gsm8k_bare(gold: str) -> str:
    value = parse_number(gold)
    if value is None:
        raise GoldAnswerError(f"gold {gold[:50]!r} has no '####' marker and is not a number")
    return _fraction_str(value)


def grade(grader: str, response: str, gold: str) -> Grade:
    """Grade ``response`` against ``gold`` (a full gold solution or a bare answer)."""
    if grader == "gsm8k":
        return grade_gsm8k(response, gold)
    if grader == "boxed":
        return grade_boxed(response, gold)
    raise ValueError(f"grader={grader!r}: must be one of {list(GRADERS)}")
