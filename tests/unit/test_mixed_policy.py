"""Mixed-policy traces: the pure parts (length cap, cut point), hand-computed."""

from __future__ import annotations

import math

import pytest

from raydc.mixed_policy import cut_point, length_cap


def test_length_cap_is_the_multiple_rounded_up_and_never_zero():
    assert length_cap(10, 1.5) == 15
    assert length_cap(7, 1.5) == 11  # 10.5 -> 11
    assert length_cap(0, 1.5) == 1
    assert length_cap(3, 1.0) == 3


@pytest.mark.parametrize(
    "n,after", [(2, 0.5), (3, 0.5), (10, 0.5), (10, 0.0), (10, 0.95), (101, 0.5)]
)
def test_cut_point_lies_past_the_fraction_and_before_the_end(n, after):
    lo = min(max(1, math.ceil(after * n)), n - 1)
    seen = {cut_point(n, after, f"row{i}", seed=0) for i in range(400)}
    assert min(seen) >= lo and max(seen) <= n - 1
    # uniform over [lo, n-1]: with 400 draws every value of a short range shows up
    if n - lo <= 10:
        assert seen == set(range(lo, n))


def test_cut_point_is_reproducible_per_row_and_seed():
    a = [cut_point(50, 0.5, f"r{i}", seed=3) for i in range(20)]
    assert a == [cut_point(50, 0.5, f"r{i}", seed=3) for i in range(20)]
    assert a != [cut_point(50, 0.5, f"r{i}", seed=4) for i in range(20)]


def test_a_response_of_fewer_than_two_tokens_cannot_be_cut():
    assert cut_point(0, 0.5, "r", 0) is None
    assert cut_point(1, 0.5, "r", 0) is None
    assert cut_point(2, 0.5, "r", 0) == 1


def test_a_continuation_is_kept_only_when_its_answer_grades_correct():
    from types import SimpleNamespace

    from raydc.config import from_dict
    from raydc.mixed_policy import Item, _verdict

    cfg = from_dict({"mixed_policy": {"require_correct": True, "grader": "gsm8k"}})
    it = Item("r", "p", "Sum mod 10: a b", gold="a3=3\nb1=4\n#### 4", extra={})
    stop = SimpleNamespace(finish_reason="stop")
    assert _verdict(cfg, it, stop, "a3=3\nb1=4\n#### 4") is None
    assert _verdict(cfg, it, stop, "a3=3\nb2=5\n#### 5").startswith("wrong_answer: ")
    cut = SimpleNamespace(finish_reason="length")
    assert _verdict(cfg, it, cut, "a3=3\nb1=4\n#### 4").startswith("truncated")
    # without require_correct only truncation drops a trace
    loose = from_dict({"mixed_policy": {"require_correct": False}})
    assert _verdict(loose, it, stop, "#### 5") is None
    # a gold without an answer is a reject with its reason, not a crash
    assert _verdict(cfg, Item("r", "p", "q", gold="none", extra={}), stop, "#### 4").startswith(
        "no_gold_answer"
    )


def test_a_pass_that_keeps_no_trace_fails_naming_why(tmp_path):
    """No usable input trace: the stage fails with the counts by reason and the rejects
    file (written first), instead of finishing with nothing for prepare to read."""
    import pyarrow.parquet as pq

    from raydc.config import from_dict
    from raydc.mixed_policy import MixedPolicyError, run_mixed_policy

    traces = tmp_path / "traces.jsonl"
    traces.write_text('{"prompt": "  ", "response": "A."}\n{"prompt": "Q?", "response": ""}\n')
    cfg = from_dict({"mixed_policy": {"engine": {"backend": "local"}}})
    out = tmp_path / "mp"
    with pytest.raises(
        MixedPolicyError,
        match=r"kept no traces: 2 in, 2 rejected \(reasons \{'missing_prompt': 1, "
        r"'missing_response': 1\}\); see .*rejects.parquet",
    ):
        run_mixed_policy(cfg, "tiny-bpe", "tiny-bpe", traces, out)
    assert pq.read_table(out / "rejects.parquet").num_rows == 2
