"""Cross-tokenizer alignment of teacher log-probs: hand-checked cases, and two genuinely
different tokenizers (byte-level BPE vs WordPiece) whose span sums must agree."""

from __future__ import annotations

import math
import random

import pytest

from raydc.infra.models import load_tokenizer
from raydc.method.align import AlignmentError, align_turn, disjoint_spans, offsets_from_strings
from raydc.method.spans import credit_by_char_spans


def test_disjoint_spans_hand_checked():
    assert disjoint_spans([(84, 86), (85, 86)]) == [(84, 85), (85, 86)]
    assert disjoint_spans([(89, 90)] * 4) == [(89, 89)] * 3 + [(89, 90)]
    assert disjoint_spans([(0, 2), (2, 5)]) == [(0, 2), (2, 5)]


def test_align_turn_hand_checked():
    # content "abcdef"; teacher tokens "ab" "cd" "ef" + an end-of-turn token.
    src = [(0, 2), (2, 4), (4, 6), (6, 7)]
    vals = [-1.0, -2.0, -4.0, -0.5]
    # Student tokens "a" "bc" "def": "a" is straddled by "ab" (paid at "bc"): 0.0;
    # "bc" gets "ab" (ends at 2); "def" gets "cd" + "ef" (end at 4 and 6); eot gets -0.5.
    got = align_turn(6, src, vals, [(0, 1), (1, 3), (3, 6)], True)
    assert got == [0.0, -1.0, -6.0, -0.5]
    # No end-of-turn on the student side: the teacher's is dropped.
    assert align_turn(6, src, vals, [(0, 1), (1, 3), (3, 6)], False) == [0.0, -1.0, -6.0]
    # A teacher that gives nothing past the content: the student's eot is unknown (NaN).
    got = align_turn(6, src[:3], vals[:3], [(0, 3), (3, 6)], True)
    assert got[:2] == [-1.0, -6.0] and math.isnan(got[2])
    # Student tokens beyond what the teacher covers are unknown, never 0.
    got = align_turn(6, [(0, 2)], [-1.0], [(0, 2), (2, 6)], False)
    assert got[0] == -1.0 and math.isnan(got[1])


def test_no_teacher_mass_is_lost_gaps_and_empty_spans_carry_to_the_next_student_token():
    # content "ab cd ef" (8 chars). A WordPiece-style student drops the spaces:
    # "ab" (0,2) "cd" (3,5) "ef" (6,8). Teacher: "ab " (0,3) ends in the gap after "ab",
    # an empty-span token at 5 (between "cd" and the space), "d ef"-style straddler
    # " e" (5,7), "f" (7,8), and its end-of-turn.
    src = [(0, 3), (3, 5), (5, 5), (5, 7), (7, 8), (8, 9)]
    vals = [-1.0, -2.0, -0.25, -4.0, -8.0, -0.5]
    dst = [(0, 2), (3, 5), (6, 8)]
    got = align_turn(8, src, vals, dst, True)
    # "ab " ends in the gap: carried to "cd" (with "cd"'s own -2); "ab" is covered by it
    # and gets 0.0. The empty token at 5 and " e" (ends at 7) and "f" go to "ef".
    assert got == [0.0, -3.0, -12.25, -0.5]
    assert sum(got) == sum(vals)
    counts: dict = {}
    align_turn(8, src, vals, dst, True, counts=counts)
    assert counts == {"carried": 2}  # "ab " and the empty-span token
    _, rest, n_rest, carried = credit_by_char_spans(src[:5], vals[:5], dst)
    assert (rest, n_rest, carried) == (0.0, 0, 2)
    # Teacher text past the student's last content token ("ef" ends at 6 here) goes to
    # the student's end-of-turn token...
    got = align_turn(8, src, vals, [(0, 2), (3, 5), (6, 6)], True)
    assert got == [0.0, -3.0, 0.0, -0.5 - 0.25 - 4.0 - 8.0]
    # ...and without one the row cannot be aligned without loss: refused, with the reason.
    with pytest.raises(AlignmentError, match="end after the student's last content token"):
        align_turn(8, src[:5], vals[:5], [(0, 2), (3, 5)], False)


def test_wordpiece_student_under_a_bpe_teacher_keeps_every_teacher_log_prob():
    bpe, wp = load_tokenizer("tiny-bpe"), load_tokenizer("tiny-wordpiece")
    for text in TEXTS:
        src = bpe(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        dst = wp(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        rng = random.Random(1)
        vals = [-rng.uniform(0.01, 5.0) for _ in src]
        counts: dict = {}
        got = align_turn(len(text), src, vals, dst, True, counts=counts)
        # BPE's newline token ends in a gap of the WordPiece student: carried, not lost
        assert (counts["carried"] > 0) == ("\n" in text), (text, counts)
        assert not any(math.isnan(v) for v in got[:-1])  # BPE covers every character
        assert math.isnan(got[-1])  # no teacher end-of-turn given, none carried
        assert sum(got[:-1]) == pytest.approx(sum(vals), abs=1e-9), text


def test_align_turn_byte_split_character_counted_once():
    # "é" split by a byte-level student into two tokens with the same span (1, 2).
    got = align_turn(
        3, [(0, 1), (1, 2), (2, 3)], [-1.0, -2.0, -3.0], [(0, 1), (1, 2), (1, 2), (2, 3)], False
    )
    assert got == [-1.0, 0.0, -2.0, -3.0]
    assert sum(got) == -6.0


def test_offsets_from_strings():
    assert offsets_from_strings(["ab", "", "c"]) == [(0, 2), (2, 2), (2, 3)]


TEXTS = [
    "Natalia sold 48/2 = 24 clips in May. She sold 48+24 = 72 clips altogether.",
    "It is 5.5. Done!\nYes: the answer is 12, not 13.",
    "Weng earns $12 an hour; 50 minutes is 0.2 x 50 = $10.\n#### 10",
]


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_and_wordpiece_span_sums_agree(text):
    bpe, wp = load_tokenizer("tiny-bpe"), load_tokenizer("tiny-wordpiece")
    src = wp(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    dst = bpe(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert [tuple(o) for o in src] != [tuple(o) for o in dst]  # genuinely different splits
    rng = random.Random(0)
    vals = [-rng.uniform(0.01, 5.0) for _ in src]
    got = align_turn(len(text), src, vals, dst, False)
    # WordPiece covers every non-space character; a BPE token of whitespace alone (the
    # newline) lies in a gap the teacher says nothing about: unknown, never 0.
    for (a, b), v in zip(dst, got):
        assert math.isnan(v) == (not text[a:b].strip()), (text[a:b], v)
    assert sum(v for v in got if not math.isnan(v)) == pytest.approx(sum(vals))
    # Every character boundary both tokenizations split at: the sums up to it agree.
    src_ends = {e for _, e in src}
    dst_d = disjoint_spans(dst)
    for cut in sorted(src_ends & {e for _, e in dst_d}):
        left_dst = sum(v for (s, e), v in zip(dst_d, got) if e <= cut and not math.isnan(v))
        left_src = sum(v for (s, e), v in zip(src, vals) if e <= cut)
        assert left_dst == pytest.approx(left_src), cut


def test_bpe_and_wordpiece_hand_checked_mapping():
    bpe, wp = load_tokenizer("tiny-bpe"), load_tokenizer("tiny-wordpiece")
    text = "It is 5.5. Done!"
    s = wp(text, add_special_tokens=False, return_offsets_mapping=True)
    d = bpe(text, add_special_tokens=False, return_offsets_mapping=True)
    src_tok = [text[a:b] for a, b in s["offset_mapping"]]
    dst_tok = [text[a:b] for a, b in d["offset_mapping"]]
    # WordPiece drops spaces; byte-level BPE keeps them on the following word.
    assert src_tok == ["It", "is", "5", ".", "5", ".", "D", "one", "!"]
    assert dst_tok == ["It", " is", " 5", ".", "5", ".", " D", "one", "!"]
    vals = [-(k + 1.0) for k in range(len(src_tok))]
    got = align_turn(len(text), s["offset_mapping"], vals, d["offset_mapping"], False)
    # Same word boundaries, so the values pair up one to one despite the spaces.
    assert got == vals
