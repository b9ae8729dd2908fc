"""A teacher whose text differs from the response (chat or channel markup, ``<think>``
tags, whitespace: DASD's decoded ids are never the SFT text byte for byte) is aligned on
the text both share (``raydc.method.align.match_blocks`` / ``align_matched_turn``):
values inside it, unknown (NaN) elsewhere, the teacher mass it cannot place counted, and
a row whose response it covers less than ``data.min_teacher_coverage`` rejected. Real
tokenizers at the prepare level: byte-level Qwen2 as the teacher, tiny-bpe as the student.
Expected values are worked out by hand in the comments."""

from __future__ import annotations

import json
import math
import random

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raydc.config import ConfigError, DataConfig
from raydc.infra.artifacts import collect_parts, prepare_out_dir
from raydc.infra.models import load_tokenizer
from raydc.method.align import align_matched_turn, align_turn, match_blocks, offsets_from_strings
from raydc.prepare.stage import coverage_summary, prepare_batch
from tests.conftest import QWEN2_TOKENIZER

NAN = float("nan")


def _valid(a: str, b: str, blocks) -> None:
    """Blocks match, increase on both sides without overlap, and adjacent ones of one
    diagonal are merged."""
    pa_, pb_ = 0, 0
    for t, r, n in blocks:
        assert n > 0 and t >= pa_ and r >= pb_, blocks
        assert a[t : t + n] == b[r : r + n]
        assert (t, r) != (pa_, pb_) or (t, r) == (0, 0), f"unmerged blocks {blocks}"
        pa_, pb_ = t + n, r + n


def _lcs(a: str, b: str) -> int:
    row = [0] * (len(b) + 1)
    for ca in a:
        prev = 0
        for j, cb in enumerate(b):
            prev, row[j + 1] = row[j + 1], prev + 1 if ca == cb else max(row[j + 1], row[j])
    return row[-1]


# ----------------------------------------------------------------------------- the diff


def test_match_blocks_hand_checked():
    r = "We need 2+2. The answer is 4."
    assert match_blocks(r, r) == [(0, 0, 29)]
    # Markup only around the response: one block where it starts in the teacher's text.
    assert match_blocks("<think>\n" + r + "\n</think>", r) == [(8, 0, 29)]
    # DASD's direction: the SFT response has the tags, the teacher's decoded text not.
    # Response: "<think>\n" 0-8, "We need 2+2." 8-20, "\n</think>\n\n" 20-31, answer 31-47.
    resp = "<think>\nWe need 2+2.\n</think>\n\nThe answer is 4."
    assert match_blocks("We need 2+2.The answer is 4.", resp) == [(0, 8, 12), (12, 31, 16)]
    # Short matches count only at the two ends: "Tw" and "." of "Twx." / "Two.".
    assert match_blocks("Twx.", "Two.") == [(0, 0, 2), (3, 3, 1)]
    # Nothing shared; an empty side.
    assert match_blocks("abc", "xyz") == []
    assert match_blocks("", "xyz") == [] and match_blocks("abc", "") == []
    # "Hello world" vs a doubled space: "Hello " then "world" (5 of 11 are not 8 long,
    # but they reach the texts' ends).
    assert match_blocks("Hello  world", "Hello world") == [(0, 0, 6), (7, 6, 5)]


@settings(max_examples=300, deadline=None)
@given(a=st.text("ab <>\n", max_size=40), b=st.text("ab <>\n", max_size=40))
def test_match_blocks_is_a_valid_common_subsequence(a, b):
    """Any two texts (a small alphabet: many repeats, no unique anchors): the blocks are
    real matches, in order on both sides, never more than the longest common
    subsequence, and the whole text when both are equal."""
    blocks = match_blocks(a, b)
    _valid(a, b, blocks)
    assert sum(n for *_, n in blocks) <= _lcs(a, b)
    if a == b and a:
        assert blocks == [(0, 0, len(a))]


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    pieces=st.integers(1, 12),
    edits=st.lists(st.sampled_from(["insert", "delete", "replace"]), max_size=8),
)
def test_match_blocks_recovers_markup_and_edits(seed, pieces, edits):
    """A response of varied text and a teacher's text made from it by inserting markup
    (characters the response never uses), deleting or replacing short runs: every
    response character outside the edited runs is matched (the runs between edits are
    at least 40 characters long and random, so their 8-grams are unique)."""
    rng = random.Random(seed)
    resp = " ".join(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(pieces * 12)
    )
    inner = range(40, len(resp) - 40)
    cuts = sorted(rng.sample(inner, min(len(edits), len(inner) // 60)))
    cuts = [c for k, c in enumerate(cuts) if k == 0 or c - cuts[k - 1] >= 50]
    teacher, lost, prev = [rng.choice(["", "<|start|>", "<think>\n"])], 0, 0
    for c, kind in zip(cuts, edits):
        teacher.append(resp[prev:c])
        if kind == "insert":
            teacher.append(rng.choice(["<|channel|>", "\n", "\t\t", "</think>"]))
            prev = c
        else:  # delete or replace 1-3 response characters
            k = rng.randint(1, 3)
            lost += k
            teacher.append("" if kind == "delete" else "#" * k)
            prev = c + k
    teacher.append(resp[prev:])
    teacher.append(rng.choice(["", "<|end|>", "\n</think>"]))
    text = "".join(teacher)
    blocks = match_blocks(text, resp)
    _valid(text, resp, blocks)
    assert sum(n for *_, n in blocks) >= len(resp) - lost


def test_match_blocks_on_a_long_trace_stays_near_linear():
    """A 300,000-character trace (about 65K tokens) with markup at both ends and 60
    short edits, and the same against a 300,000-character unrelated text: the diff
    finds the shared text, and the unrelated one covers little. No timing assert;
    measured on a loaded 2-core machine: about 0.1 s and 0.2 s (docstring of
    match_blocks), where difflib takes 8 s on 20,000 characters."""
    rng = random.Random(7)
    vocab = ["the", "answer", "we", "need", "so", "wait", "check", "sum", "=", "48", "24", "72"]

    def prose(n):
        words = [rng.choice(vocab) + rng.choice([" ", " ", ". ", "\n", ", "]) for _ in range(n)]
        return "".join(words)[:n]

    resp = prose(300_000)
    pieces, prev = ["<|start|>assistant<|channel|>analysis<|message|>"], 0
    for c in sorted(rng.sample(range(len(resp)), 60)):
        if c < prev:
            continue
        pieces += [resp[prev:c], rng.choice(["\n\n", " ", "<|x|>", ""])]
        prev = c + rng.choice([0, 1, 3])
    pieces += [resp[prev:], "<|end|>"]
    teacher = "".join(pieces)
    blocks = match_blocks(teacher, resp)
    _valid(teacher, resp, blocks)
    assert sum(n for *_, n in blocks) >= len(resp) - 60 * 3
    other = prose(300_000)
    blocks = match_blocks(other, resp)
    _valid(other, resp, blocks)
    assert sum(n for *_, n in blocks) < 0.2 * len(resp)


# ----------------------------------------------------------------------------- placing values


def test_align_matched_turn_hand_checked():
    # Teacher "<t>abcdef": "<t>" -9, "ab" -1, "cd" -2, "ef" -4, end-of-turn -0.5; the
    # response "abcdef" is teacher[3:9]. Student "a" "bc" "def" get what an exact match
    # gives (0.0: straddled by "ab"; -1; -2 + -4), the markup's -9 is left out.
    src = [(0, 3), (3, 5), (5, 7), (7, 9), (9, 9)]
    vals = [-9.0, -1.0, -2.0, -4.0, -0.5]
    dst = [(0, 1), (1, 3), (3, 6)]
    got = align_matched_turn(6, 9, [(3, 0, 6)], src, vals, dst, True)
    exact = align_turn(6, [(0, 2), (2, 4), (4, 6), (6, 6)], vals[1:], dst, True)
    assert got.values == [0.0, -1.0, -6.0, -0.5] == exact
    assert (got.coverage, got.outside_logprob, got.outside_tokens) == (1.0, -9.0, 1)
    # A teacher token across the block's edge ("<t>a" -3) spells text the response lacks:
    # left out, and the student token "a" it covers is unknown.
    src = [(0, 4), (4, 6), (6, 9), (9, 9)]
    got = align_matched_turn(6, 9, [(3, 0, 6)], src, [-3.0, -1.0, -2.0, -0.5], dst, True)
    assert math.isnan(got.values[0]) and got.values[1:] == [-1.0, -2.0, -0.5]
    assert (got.outside_logprob, got.outside_tokens) == (-3.0, 1)
    # Text in the middle: response "abc def", teacher "abc\n\ndef" (blocks "abc", "def").
    # Student " def" straddles the unmatched space: unknown, and so the teacher's "def"
    # and its end-of-turn token have nowhere to go (-3 - 0.5 + the "\n\n" token's -2).
    src, vals = [(0, 3), (3, 5), (5, 8), (8, 8)], [-1.0, -2.0, -3.0, -0.5]
    blocks = match_blocks("abc\n\ndef", "abc def")
    assert blocks == [(0, 0, 3), (5, 4, 3)]
    got = align_matched_turn(7, 8, blocks, src, vals, [(0, 3), (3, 7)], True)
    assert got.values[0] == -1.0 and math.isnan(got.values[1]) and math.isnan(got.values[2])
    assert (got.coverage, got.outside_logprob, got.outside_tokens) == (6 / 7, -5.5, 3)
    # The same with a student that splits " " from "def": "def" gets the teacher's "def",
    # the end-of-turn its own; only the "\n\n" token (-2) is left out.
    got = align_matched_turn(7, 8, blocks, src, vals, [(0, 3), (3, 4), (4, 7)], True)
    assert got.values[0] == -1.0 and math.isnan(got.values[1])
    assert got.values[2:] == [-3.0, -0.5]
    assert (got.outside_logprob, got.outside_tokens) == (-2.0, 1)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), eot=st.booleans())
def test_align_matched_turn_loses_no_teacher_mass(seed, eot):
    """Random texts, edits and token splits on both sides: every teacher value is either
    placed on a student token or counted outside, never both, never dropped; a student
    token with no matched character is unknown."""
    rng = random.Random(seed)
    resp = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 80)))
    parts, prev = [rng.choice(["", "<t>"])], 0
    for c in sorted(rng.sample(range(len(resp)), min(3, len(resp)))):
        parts += [resp[prev:c], rng.choice(["", "XY", "\n"])]
        prev = c + rng.choice([0, 0, 1])
    parts += [resp[min(prev, len(resp)) :], rng.choice(["", "</t>"])]
    teacher = "".join(parts)

    def split(text):
        cuts = sorted({0, len(text), *rng.sample(range(len(text) + 1), len(text) // 3)})
        return [text[a:b] for a, b in zip(cuts, cuts[1:])]

    src = offsets_from_strings(split(teacher)) + [(len(teacher), len(teacher))]
    vals = [-float(rng.randint(1, 8)) for _ in src]  # integers: sums are exact
    dst = offsets_from_strings(split(resp))
    blocks = match_blocks(teacher, resp)
    got = align_matched_turn(len(resp), len(teacher), blocks, src, vals, dst, eot)
    placed = sum(v for v in got.values if not math.isnan(v))
    assert placed + got.outside_logprob == sum(vals)
    assert 0 <= got.outside_tokens <= len(src)
    assert len(got.values) == len(dst) + int(eot)
    assert got.coverage == sum(n for *_, n in blocks) / len(resp)
    matched = set()
    for _, r, n in blocks:
        matched.update(range(r, r + n))
    for (s, e), v in zip(dst, got.values):
        if e > s and not matched.intersection(range(s, e)):
            assert math.isnan(v)


# ----------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def qwen2():
    return load_tokenizer(QWEN2_TOKENIZER)


def _raw(rows: list[dict]) -> pa.Table:
    lines = [json.dumps(r).encode() for r in rows]
    return pa.table(
        {
            "_raw": pa.array(lines, pa.binary()),
            "_source": pa.array(["traces.jsonl"] * len(lines)),
            "_index": pa.array(range(len(lines)), pa.int64()),
        }
    )


def _on_loss(row: dict) -> list[float]:
    return [v for v, m in zip(row["teacher_logprobs"], row["loss_mask"]) if m]


P1 = "We need the total: 48 + 24 = 72 clips."  # 38 characters
P2 = "The answer is 72."  # 17 characters
RESPONSE = P1 + "\n\n" + P2  # 57 characters
# tiny-bpe splits the response into 21 tokens: 13 for P1 ("We" ... " cl" "ips" "."),
# "\n", "\n", then 6 for P2 ("The" " ans" "wer" " is" " 72" "."), + <|im_end|>.
N1, N2 = 13, 6


def test_teacher_text_with_markup_prepares_on_the_text_both_share(tmp_path, qwen2):
    """DASD's shape: the teacher's ids decode to the response wrapped in channel markup
    and ``<think>`` tags, with other whitespace between reasoning and answer and after
    it. The values inside the matched text are those of the exact row (same teacher ids
    there), the student's "\\n\\n" between them is unknown, the markup's mass is counted
    outside, and the summary reports the coverage; token strings give the same row."""
    enc = lambda t: qwen2(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    eot = qwen2.convert_tokens_to_ids("<|im_end|>")
    # Qwen2 splits: the prefix into 13 tokens; P1 into 18 ("We" ... " clips" "."); the
    # middle "\n</think>\n\n" into "\n" "</" "think" ">\n\n", then "  "; P2 into 7
    # ("The" " answer" " is" " " "7" "2" "."); "  \n" into one.
    prefix, mid, tail = "<|channel|>analysis<|message|><think>\n", "\n</think>\n\n", "  \n"
    seg = [enc(prefix), enc(P1), enc(mid), enc("  "), enc(P2), enc(tail), [eot]]
    assert [len(s) for s in seg] == [13, 18, 4, 1, 7, 1, 1]
    ids = [i for s in seg for i in s]
    lps = [-(k + 1) / 8 for k in range(len(ids))]  # eighths: sums are exact
    v = {}
    k = 0
    for name, s in zip(["prefix", "p1", "mid", "sp", "p2", "tail", "eot"], seg):
        v[name], k = lps[k : k + len(s)], k + len(s)
    # The exact row: the same ids for P1 and P2, "\n\n" between them, the same stop.
    exact_ids = enc(P1) + enc("\n\n") + enc(P2) + [eot]
    exact_lps = v["p1"] + [-9.0] + v["p2"] + v["eot"]
    pieces = [qwen2.decode([i]) for i in ids[:-1]]
    unrelated = P2 + " Natalia sold clips to friends in April."  # 17 + 40 characters
    other = P2 + "\nCompute the area of a circle of radius 3"
    rows = [
        {"id": "exact", "prompt": "Q?", "response": RESPONSE, "ids": exact_ids, "lps": exact_lps},
        {"id": "markup", "prompt": "Q?", "response": RESPONSE, "ids": ids, "lps": lps},
        {
            "id": "unrelated",
            "prompt": "Q?",
            "response": unrelated,
            "ids": enc(other),
            "lps": [-1.0] * len(enc(other)),
        },
    ]
    dcfg = DataConfig(
        teacher_logprobs_key="lps", teacher_token_ids_key="ids", teacher_tokenizer=QWEN2_TOKENIZER
    )
    out = prepare_out_dir(tmp_path / "prep")
    kept = prepare_batch(_raw(rows), "tiny-bpe", dcfg, str(out / "_parts"))
    totals, rejects = collect_parts(out, "prepare")
    assert totals["rows_in"] == kept.num_rows + rejects.num_rows == 3
    kept = {r["row_id"]: r for r in kept.to_pylist()}
    exact, markup = _on_loss(kept["exact"]), _on_loss(kept["markup"])
    assert len(exact) == len(markup) == N1 + 2 + N2 + 1
    # Inside the matched text: the exact row's values (the same ids), bit for bit.
    assert markup[:N1] == exact[:N1] and markup[N1 + 2 : -1] == exact[N1 + 2 : -1]
    assert exact[0] == markup[0] == v["p1"][0] == -14 / 8  # "We": the teacher's "We"
    assert exact[-2] == markup[-2] == v["p2"][-1]  # the final "."
    # The first "\n" is matched and the teacher's own "\n" (the middle's first token)
    # ends in it; the second is not matched ("</" follows in the teacher): unknown.
    assert markup[N1] == v["mid"][0] and math.isnan(markup[N1 + 1])
    assert (exact[N1], exact[N1 + 1]) == (0.0, -9.0)  # "\n\n" straddles both
    # The teacher wrote "  \n" after the answer, then stopped: its end-of-turn mass.
    assert markup[-1] == v["tail"][0] + v["eot"][0] and exact[-1] == v["eot"][0]
    # The unrelated row: "The answer is 72." (17) of 57 characters: 0.298 < 0.9.
    (rej,) = rejects.to_pylist()
    assert (rej["row_id"], rej["field"]) == ("unrelated", "ids")
    assert rej["reason"] == (
        "teacher_tokens_mismatch: teacher_coverage 0.298 of the response's characters "
        "matched the teacher's text (< data.min_teacher_coverage 0.9)"
    )
    # Counts: 56 of 57 characters matched (all but the second "\n"); outside: the prefix,
    # the middle but its "\n", and "  ".
    assert totals["teacher_coverage_permille"] == {"1000": 1, "982": 1, "298": 1}
    summary = coverage_summary(totals)
    assert summary == {
        "rows": 3,
        "exact": 1,
        "partial": 1,
        "rejected": 1,
        "min": 0.298,
        "p10": 0.298,
        "median": 0.982,
        "mean": round((1 + 56 / 57 + 17 / 57) / 3, 6),
        "outside_logprob": pytest.approx(sum(v["prefix"]) + sum(v["mid"][1:]) + v["sp"][0]),
        "outside_tokens": 13 + 3 + 1,
    }
    # The same teacher as token strings (an API's tokens) gives the same row.
    strings = dict(rows[1], id="strings", tokens=pieces, ids=None, lps=lps[:-1])
    dcfg = DataConfig(teacher_logprobs_key="lps", teacher_tokens_key="tokens")
    out = prepare_out_dir(tmp_path / "strings")
    got = prepare_batch(_raw([strings]), "tiny-bpe", dcfg, str(out / "_parts")).to_pylist()
    same = _on_loss(got[0])
    assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(same[:-1], markup[:-1]))
    assert same[-1] == v["tail"][0]  # no stop token among the strings


def test_dasd_direction_the_response_has_the_tags_the_teacher_not(tmp_path, qwen2):
    """DASD's published files: the SFT output wraps the reasoning in ``<think>`` tags,
    the teacher's ids decode to the reasoning and the answer back to back. The tags'
    student tokens are unknown; every teacher value lands on the reasoning or answer
    tokens (nothing outside); the coverage is the reasoning and answer's share."""
    enc = lambda t: qwen2(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    eot = qwen2.convert_tokens_to_ids("<|im_end|>")
    reasoning = " ".join(f"Step {i}: {i} + {i} = {2 * i}." for i in range(1, 16))
    response = "<think>\n" + reasoning + "\n</think>\n\n" + P2
    ids = enc(reasoning) + enc(P2) + [eot]
    lps = [-(k % 7 + 1) / 4 for k in range(len(ids))]
    dcfg = DataConfig(
        teacher_logprobs_key="lps", teacher_token_ids_key="ids", teacher_tokenizer=QWEN2_TOKENIZER
    )
    out = prepare_out_dir(tmp_path / "prep")
    row = {"id": "dasd", "prompt": "Q?", "response": response, "ids": ids, "lps": lps}
    (got,) = prepare_batch(_raw([row]), "tiny-bpe", dcfg, str(out / "_parts")).to_pylist()
    totals, rejects = collect_parts(out, "prepare")
    assert rejects.num_rows == 0
    student = load_tokenizer("tiny-bpe")
    loss = [
        (t, x) for t, x, m in zip(got["input_ids"], got["teacher_logprobs"], got["loss_mask"]) if m
    ]
    text = ""
    for t, x in loss[:-1]:
        piece = student.decode([t])
        inside_tags = len(text) < 8 or len(reasoning) + 8 <= len(text) < len(response) - len(P2)
        text += piece
        assert math.isnan(x) == inside_tags, (piece, x)
    assert text == response
    assert sum(x for _, x in loss if not math.isnan(x)) == pytest.approx(
        sum(lps)
    )  # all placed, stop included
    assert loss[-1][1] == lps[-1]
    counts = coverage_summary(totals)
    share = (len(reasoning) + len(P2)) / len(response)
    assert (counts["partial"], counts["outside_tokens"], counts["outside_logprob"]) == (1, 0, 0.0)
    assert counts["mean"] == round(share, 6) and share > 0.9


def test_min_teacher_coverage_is_validated_and_zero_keeps_any_row(tmp_path, qwen2):
    for bad in (-0.1, 1.5, NAN):
        with pytest.raises(ConfigError, match="min_teacher_coverage"):
            DataConfig(min_teacher_coverage=bad).validate("data")
    DataConfig(min_teacher_coverage=0.0).validate("data")
    # Nothing shared at all, kept at 0: every student value unknown, all mass outside.
    row = {"id": "r", "prompt": "Q?", "response": "Two.", "tokens": ["xyz"], "lps": [-2.0]}
    dcfg = DataConfig(
        teacher_logprobs_key="lps", teacher_tokens_key="tokens", min_teacher_coverage=0.0
    )
    out = prepare_out_dir(tmp_path / "prep")
    (got,) = prepare_batch(_raw([row]), "tiny-bpe", dcfg, str(out / "_parts")).to_pylist()
    assert all(math.isnan(x) for x in _on_loss(got))
    totals, _ = collect_parts(out, "prepare")
    counts = coverage_summary(totals)
    assert (counts["min"], counts["outside_logprob"], counts["outside_tokens"]) == (0.0, -2.0, 1)
