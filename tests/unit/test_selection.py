"""DASD selection and sentence segmentation (raydc.method.selection, raydc.method.spans)."""

import pytest
import torch

from raydc.method.selection import divergence_scores, select_top_k, sentence_deltas
from raydc.method.spans import align_by_char_spans, sentence_spans, token_sentence_ids


def test_sentence_spans_tile_the_text():
    text = "She has 3.5 apples. Then she buys 2! Total?\nSo 5.5 apples.\n#### 5.5"
    spans = sentence_spans(text)
    assert [text[s:e].strip() for s, e in spans] == [
        "She has 3.5 apples.",
        "Then she buys 2!",
        "Total?",
        "So 5.5 apples.",
        "#### 5.5",
    ]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert sentence_spans("") == []
    assert sentence_spans("no boundary here") == [(0, 16)]


def test_token_sentence_ids_from_offsets():
    text = "Ab cd. Ef gh."
    # tokens: "Ab", " cd", ".", " Ef", " gh", "."
    offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 12), (12, 13)]
    assert token_sentence_ids(text, offsets) == [0, 0, 0, 1, 1, 1]
    # an empty-span (special) token takes the sentence at its start
    assert token_sentence_ids(text, [(13, 13)]) == [1]


def test_sentence_deltas_and_scores_hand_computed():
    s = torch.tensor([[0.0, -1.0, -1.0, -2.0, -2.0], [0.0, -1.0, -1.0, -1.0, -1.0]])
    t = torch.tensor([[0.0, -0.5, -0.5, -3.0, -3.0], [0.0, -0.1, -0.1, -0.1, -0.1]])
    m = torch.tensor([[False, True, True, True, True]] * 2)
    sid = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 2]])
    delta, present = sentence_deltas(s, t, sid, m)
    assert delta[0, :2].tolist() == pytest.approx([0.5, -1.0])
    assert present[0].tolist() == [True, True, False]
    assert delta[1].tolist() == pytest.approx([0.9, 0.9, 0.9])
    scores = divergence_scores(s, t, sid, m, threshold=0.0)
    assert scores.tolist() == pytest.approx([0.5, 1.0])
    scores = divergence_scores(s, t, sid, m, threshold=0.95)
    assert scores.tolist() == pytest.approx([0.0, 0.0])


def test_select_top_k_per_prompt():
    prompts = ["a", "a", "a", "b", "b", "c"]
    scores = [0.1, 0.9, 0.5, 0.3, 0.3, 0.0]
    assert select_top_k(prompts, scores, 1) == [1, 3, 5]
    assert select_top_k(prompts, scores, 2) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="k must be"):
        select_top_k(prompts, scores, 0)
    with pytest.raises(ValueError, match="scores"):
        select_top_k(prompts, scores[:2], 1)


def test_selection_rejects_bad_logprobs():
    s = torch.tensor([[-1.0, float("nan")]])
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="NaN"):
        divergence_scores(s, s.clone(), torch.zeros(1, 2, dtype=torch.long), m)


def test_align_by_char_spans_hand_checked():
    # text "abcdef": source tokens "ab" "cde" "f"; destination "a" "bc" "def"
    src = [(0, 2), (2, 5), (5, 6)]
    vals = [-1.0, -2.0, -4.0]
    dst = [(0, 1), (1, 3), (3, 6)]
    # "ab" ends in "bc"; "cde" ends in "def", "f" ends in "def"; "a" is covered by the
    # straddling "ab" that ends later: 0.0
    assert align_by_char_spans(src, vals, dst) == [0.0, -1.0, -6.0]
    # sums over a range both tokenizers split at (0..6) agree
    assert sum(v for v in align_by_char_spans(src, vals, dst)) == sum(vals)
    # a destination token after all of the source text receives the values carried to it
    # (nothing is lost); special tokens (empty) get None
    assert align_by_char_spans(src, vals, [(6, 8), (3, 3)]) == [-7.0, None]
    # a destination token no source covers and no value reaches: None
    assert align_by_char_spans([(0, 2)], [-1.0], [(0, 2), (4, 6)]) == [-1.0, None]
    with pytest.raises(ValueError, match="source values"):
        align_by_char_spans(src, vals[:2], dst)


def test_stage_batch_scores_match_the_padded_computation_on_ragged_rows():
    """The select stage scores each batch of ragged Parquet rows; the result must equal
    divergence_scores on hand-padded tensors, row by row, whatever the batch holds."""
    import pyarrow as pa

    from raydc.engines.base import ScoreError
    from raydc.select import dasd_batch_scores

    rows = [
        dict(
            row_id="p-1",
            prompt_id="p",
            student_logprobs=[0.0, -1.0, -2.0],
            teacher_logprobs=[0.0, -0.5, -3.0],
            sentence_ids=[0, 0, 1],
            loss_mask=[False, True, True],
        ),
        dict(
            row_id="p-2",
            prompt_id="p",
            student_logprobs=[0.0, -1.0, -1.0, -1.0, -1.0],
            teacher_logprobs=[0.0, -0.1, -0.1, -0.1, -0.1],
            sentence_ids=[0, 0, 1, 1, 2],
            loss_mask=[False, True, True, True, True],
        ),
    ]
    out = dasd_batch_scores(pa.Table.from_pylist(rows), threshold=0.0)
    assert out.column_names == ["row_id", "prompt_id", "score"]
    assert out.column("row_id").to_pylist() == ["p-1", "p-2"]
    assert out.column("score").to_pylist() == pytest.approx([0.5, 1.0])
    alone = dasd_batch_scores(pa.Table.from_pylist(rows[:1]), threshold=0.0)
    assert alone.column("score").to_pylist() == pytest.approx([0.5])

    rows[1]["teacher_logprobs"] = None
    with pytest.raises(ScoreError, match="p-2"):
        dasd_batch_scores(pa.Table.from_pylist(rows), threshold=0.0)


def test_stage_orders_ids_naturally():
    from raydc.select import _natural_key

    ids = ["t.jsonl:10#1", "t.jsonl:2#0", "t.jsonl:2#1", "t.jsonl:10#0"]
    assert sorted(ids, key=_natural_key) == [
        "t.jsonl:2#0",
        "t.jsonl:2#1",
        "t.jsonl:10#0",
        "t.jsonl:10#1",
    ]
