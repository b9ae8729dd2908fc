"""Graders: GSM8K numbers (all 1,319 real gold solutions) and boxed MATH-style answers."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from raydc.eval.graders import (
    GoldAnswerError,
    boxed_equal,
    grade,
    gsm8k_extract,
    gsm8k_gold_answer,
    last_boxed,
    parse_number,
)

GSM8K_TEST = Path(__file__).resolve().parents[2] / "raydc" / "assets" / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    return [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]


def test_gsm8k_gold_solutions_score_100_percent(gsm8k_rows):
    assert len(gsm8k_rows) == 1319
    results = [grade("gsm8k", r["answer"], r["answer"]) for r in gsm8k_rows]
    assert all(g.correct for g in results)
    assert all(g.predicted is not None for g in results)


def test_gsm8k_gold_solutions_fail_against_other_problems(gsm8k_rows):
    # The same check is able to fail: each gold solution graded against its neighbour's
    # answer is right only where the two answers happen to be equal.
    golds = [Fraction(gsm8k_gold_answer(r["answer"])) for r in gsm8k_rows]
    wrong_pairs = 0
    for i in range(len(gsm8k_rows) - 1):
        g = grade("gsm8k", gsm8k_rows[i]["answer"], gsm8k_rows[i + 1]["answer"])
        assert g.correct == (golds[i] == golds[i + 1])
        wrong_pairs += not g.correct
    assert wrong_pairs > 1200


def test_gsm8k_gold_answer_removes_commas():
    assert gsm8k_gold_answer("so 1,450,000\n#### 1,450,000") == "1450000"
    with pytest.raises(GoldAnswerError, match="####"):
        gsm8k_gold_answer("no marker here 12")
    with pytest.raises(GoldAnswerError, match="not a number"):
        gsm8k_gold_answer("#### twelve")


@pytest.mark.parametrize(
    "response, gold, correct, predicted",
    [
        ("She makes 9 * 2 = $18 a day.\n#### 18", "18", True, "18"),
        ("#### $18.00", "18", True, "$18.00"),
        ("The profit is 70,000 dollars.\n#### 70,000", "70000", True, "70,000"),
        ("half of it: #### 1/2", "0.5", True, "1/2"),
        ("#### -3", "-3", True, "-3"),
        ("#### −3", "-3", True, "−3"),
        ("So 16 - 3 - 4 = 9 eggs, and 9 * 2 = 18 dollars.", "18", True, "18"),  # last number
        ("The answer is 18.", "#### 18", True, "18"),
        ("#### 18 (from 9 * 2)", "18", True, "18"),  # first number after the marker
        ("First 18, then #### 17", "18", False, "17"),
        ("It is 17.5", "18", False, "17.5"),
        ("3,4 and 5", "5", True, "5"),  # "3,4" is not thirty-four
        ("#### 34", "34", True, "34"),
        ("I don't know.", "18", False, None),
        ("#### no idea, maybe 12", "12", True, "12"),  # nothing after the marker: last number
        ("x2 items", "2", False, None),  # digits inside a word are not a number
    ],
)
def test_gsm8k_grade_cases(response, gold, correct, predicted):
    g = grade("gsm8k", response, gold)
    assert g.correct is correct
    assert g.predicted == predicted


def test_parse_number_normalises():
    assert parse_number("$1,200.50") == Fraction(240100, 200)
    assert parse_number("45%") == 45
    assert parse_number("18.0") == 18
    assert parse_number("3/4") == Fraction(3, 4)
    assert parse_number("1/0") is None
    assert parse_number("1,2") is None
    assert parse_number("abc") is None
    assert gsm8k_extract("") is None


def test_last_boxed_nested_and_bare():
    assert last_boxed(r"so \boxed{\frac{a}{b^{2}}} done") == r"\frac{a}{b^{2}}"
    assert last_boxed(r"\boxed{1} then \boxed{ 2 }") == "2"
    assert last_boxed(r"\boxed 7$") == "7"
    assert last_boxed(r"\fbox{x}") == "x"
    assert last_boxed(r"\boxed{1} and \boxed{unclosed") == "1"
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("0.5", r"\frac{1}{2}"),
        (r"\dfrac{3}{4}", r"\frac34"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"90^\circ", "90"),
        (r"50\%", "50"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        (r"x^2+2x+1", r"(x+1)^2"),
        (r"\{1,2\}", r"\{2,1\}"),
        (r"\text{(B)}", "B"),
        ("10", "10.0"),
        (r"\pi/2", r"\frac{\pi}{2}"),
        (r"5\text{ cm}", "5"),
    ],
)
def test_boxed_equal_right(predicted, gold):
    assert boxed_equal(predicted, gold)


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("3", "4"),
        (r"\frac{1}{3}", "0.33"),
        ("(1,2)", "(2,1)"),
        ("[0,1)", "(0,1]"),
        ("x+1", "x-1"),
        (r"\sqrt{2}", "2"),
    ],
)
def test_boxed_equal_wrong(predicted, gold):
    assert not boxed_equal(predicted, gold)


def test_grade_boxed_gold_forms():
    solution = r"We get $x = \frac{14}{3}$, so the answer is $\boxed{\frac{14}{3}}$."
    g = grade("boxed", r"Thus \boxed{\dfrac{14}{3}}.", solution)
    assert g.correct and g.gold == r"\frac{14}{3}" and g.predicted == r"\dfrac{14}{3}"
    assert grade("boxed", r"\boxed{4.6667}", solution).correct is False
    # A bare gold answer (MATH500's answer column) and an answer with no box at all.
    assert grade("boxed", r"\boxed{(3, -1)}", r"\left(3,-1\right)").correct
    missing = grade("boxed", "The answer is 14/3.", solution)
    assert missing.correct is False and missing.predicted is None
    with pytest.raises(GoldAnswerError):
        grade("boxed", r"\boxed{1}", r"\boxed{1")
    with pytest.raises(GoldAnswerError):
        grade("boxed", r"\boxed{1}", "  ")


def test_unknown_grader():
    with pytest.raises(ValueError, match="grader='exact'"):
        grade("exact", "1", "1")
