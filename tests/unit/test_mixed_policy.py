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


def test_a_length_cap_too_small_for_every_trace_fails_naming_it_before_any_engine(tmp_path):
    """length_cap=0.01 gives every trace here a 1-token budget (ceil(0.01 x n) = 1 for
    n <= 100), and a cut needs 2: a config error naming mixed_policy.length_cap, raised
    before an engine starts. It used to be reported as prompt_too_long with field 'auto'."""
    from raydc.config import ConfigError, from_dict
    from raydc.mixed_policy import run_mixed_policy

    traces = tmp_path / "traces.jsonl"
    traces.write_text(
        '{"prompt": "Q1?", "response": "one two three"}\n{"prompt": "Q2?", "response": "A."}\n'
    )
    cfg = from_dict({"mixed_policy": {"length_cap": 0.01, "engine": {"backend": "local"}}})
    # "tiny-bpe" is a tokenizer, not a model: reaching an engine would fail differently
    with pytest.raises(ConfigError, match=r"^mixed_policy\.length_cap=0\.01: too small for every"):
        run_mixed_policy(cfg, "tiny-bpe", "tiny-bpe", traces, tmp_path / "mp")


def test_budgets_fit_both_engines_contexts_or_the_row_is_rejected_before_generating():
    """Before the student writes anything: each row's budget is cut so that the teacher's
    prompt + the longest prefix (budget - 1 tokens) + max_new_tokens fits
    mixed_policy.engine.max_model_len, or the row is rejected with the field that stops it.
    A teacher context too small used to be found after the whole student pass."""
    from raydc.config import from_dict
    from raydc.infra.models import load_tokenizer
    from raydc.mixed_policy import Item, fit_budgets

    tok = load_tokenizer("tiny-bpe")

    def head(prompt: str) -> int:  # the rendered prompt's tokens (student and teacher alike)
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return len(tok(text, add_special_tokens=False)["input_ids"])

    short, longer, longest = "Q1?", "Q1?" + " word" * 5, "Q1?" + " word" * 40
    h = head(short)
    new = 16
    context = h + new + 5  # the short prompt's prefix may be 5 tokens under the teacher
    assert h + 6 <= head(longer) <= context - 3  # the student fits it, the teacher does not
    assert head(longest) >= context - 2  # no room for the student's 2 tokens
    cfg = from_dict(
        {
            "mixed_policy": {
                "length_cap": 0.5,
                "max_new_tokens": new,
                "engine": {"max_model_len": context},
            }
        }
    )

    def item(rid: str, prompt: str, trace_tokens: int) -> Item:
        cap = max(1, -(-trace_tokens // 2))  # ceil(0.5 x n), at least 1
        return Item(rid, rid, prompt, None, {}, cap=cap, trace_tokens=trace_tokens)

    items = [
        item("fits", short, 6),  # cap 3: fits as it is
        item("cut", short, 40),  # cap 20 -> 6 (a 5-token prefix at most)
        item("tiny", short, 1),  # cap 1
        item("teacher", longer, 40),
        item("long", longest, 40),
    ]
    rejects: list[dict] = []
    kept, shortened = fit_budgets(cfg, tok, tok, items, "question", rejects)
    assert [(it.row_id, it.cap) for it in kept] == [("fits", 3), ("cut", 6)]
    assert kept[0].prompt_ids and len(kept[0].prompt_ids) == h
    assert shortened == 1
    assert [(r["row_id"], r["field"], r["reason"].split(":")[0]) for r in rejects] == [
        ("tiny", "mixed_policy.length_cap", "student_cap_too_small"),
        ("teacher", "mixed_policy.engine.max_model_len", "teacher_context_too_small"),
        ("long", "question", "prompt_too_long"),  # the prompt column, not 'auto'
    ]
    assert rejects[0]["reason"] == (
        "student_cap_too_small: length_cap=0.5 x 1 teacher trace token(s) gives the student 1; "
        "a cut needs a response of 2"
    )
    n = head(longer)
    assert rejects[1]["reason"] == (
        f"teacher_context_too_small: the teacher's prompt ({n} tokens) + "
        f"mixed_policy.max_new_tokens ({new}) + a 1-token student prefix need {n + new + 1} > "
        f"mixed_policy.engine.max_model_len={context}"
    )


def test_a_teacher_context_too_small_for_every_row_fails_before_the_student_pass(tmp_path):
    """max_new_tokens=60 of max_model_len=64 leaves no teacher room for a prefix after a
    14-token prompt: every row is rejected up front and the stage fails naming the field,
    with no engine started (it used to spend the whole student pass first)."""
    import pyarrow.parquet as pq

    from raydc.config import from_dict
    from raydc.mixed_policy import MixedPolicyError, run_mixed_policy

    traces = tmp_path / "traces.jsonl"
    traces.write_text(
        '{"prompt": "Q1?", "response": "one two three"}\n{"prompt": "Q2?", "response": "A B C"}\n'
    )
    cfg = from_dict(
        {
            "mixed_policy": {
                "max_new_tokens": 60,
                "engine": {"backend": "local", "max_model_len": 64},
            }
        }
    )
    out = tmp_path / "mp"
    with pytest.raises(
        MixedPolicyError,
        match=r"2 rejected \(reasons \{'teacher_context_too_small': 2\}\); see .*; e\.g\. row "
        r"'traces\.jsonl:0', mixed_policy\.engine\.max_model_len: teacher_context_too_small: "
        r"the teacher's prompt \(14 tokens\) \+ mixed_policy\.max_new_tokens \(60\) \+ a "
        r"1-token student prefix need 75 > mixed_policy\.engine\.max_model_len=64",
    ):
        run_mixed_policy(cfg, "tiny-bpe", "tiny-bpe", traces, out)
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert {r["field"] for r in rejects} == {"mixed_policy.engine.max_model_len"}
