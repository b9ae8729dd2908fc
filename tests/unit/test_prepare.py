"""Ingest rules without Ray: rendering, masks, sentence ids, given teacher log-probs and a
corpus of malformed rows, each rejected with the right field and reason code."""

from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc.config import DataConfig
from raydc.infra.artifacts import collect_parts, prepare_out_dir
from raydc.infra.models import load_tokenizer
from raydc.infra.schemas import PREPARED_SCHEMA
from raydc.prepare.parse import Candidate, RowReject, parse_row
from raydc.prepare.render import prepare_candidate
from raydc.prepare.stage import prepare_batch

QWEN2 = os.path.join(os.path.dirname(__file__), "..", "assets", "qwen2-tokenizer")
GSM8K = os.path.join(
    os.path.dirname(__file__), "..", "..", "raydc", "assets", "gsm8k", "train.jsonl"
)


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer("tiny-bpe")


@pytest.fixture(scope="module")
def qwen2():
    return load_tokenizer(QWEN2)


def _prep(tok, row, **cfg):
    dcfg = DataConfig(**cfg)
    (cand,) = parse_row(row, dcfg, "f.jsonl:0")
    return prepare_candidate(tok, cand, dcfg)


def _masked_text(tok, prep):
    return tok.decode([i for i, m in zip(prep.input_ids, prep.loss_mask) if m])


def test_prompt_response_mask_is_response_plus_end_of_turn(bpe):
    p = _prep(bpe, {"prompt": "What is 2+3?", "response": "It is 5. Done!"})
    assert p.loss_mask[0] is False
    assert _masked_text(bpe, p) == "It is 5. Done!<|im_end|>"
    # The prompt side carries no loss; the final newline after <|im_end|> neither.
    assert bpe.decode(p.input_ids[: p.loss_mask.index(True)]).endswith("assistant\n")
    assert p.loss_mask[-1] is False and bpe.decode([p.input_ids[-1]]) == "\n"
    # Two sentences: "It is 5. " then "Done!" (+ the end-of-turn token in the last one).
    sids = [s for s, m in zip(p.sentence_ids, p.loss_mask) if m]
    assert sids[0] == 0 and sids[-1] == 1 and sorted(set(sids)) == [0, 1]
    assert all(s == 0 for s, m in zip(p.sentence_ids, p.loss_mask) if not m)
    assert p.row_id == "f.jsonl:0" and p.teacher_logprobs is None


def test_chat_multi_turn_masks_every_assistant_turn(bpe):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Sum 1 and 1?"},
        {"role": "assistant", "content": "Two."},
    ]
    p = _prep(bpe, {"id": "c1", "messages": msgs})
    assert _masked_text(bpe, p) == "Hello.<|im_end|>Two.<|im_end|>"
    sids = [s for s, m in zip(p.sentence_ids, p.loss_mask) if m]
    assert sids[0] == 0 and sids[-1] == 1  # sentence ids run on across turns
    assert p.row_id == "c1"
    assert json.loads(p.conversation) == msgs
    spans = list(zip(p.response_spans[::2], p.response_spans[1::2]))
    assert [p.text[s:e] for s, e in spans] == ["Hello.", "Two."]


def test_qwen2_tokenizer_renders_and_masks_a_gsm8k_trace(qwen2):
    with open(GSM8K) as fh:
        row = json.loads(fh.readline())
    p = _prep(qwen2, {"prompt": row["question"], "response": row["answer"]}, max_length=4096)
    # The real Qwen2 template adds its default system prompt and ends turns with <|im_end|>.
    assert p.text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert p.text.endswith(row["answer"] + "<|im_end|>\n")
    assert _masked_text(qwen2, p) == row["answer"] + "<|im_end|>"
    im_end = qwen2.convert_tokens_to_ids("<|im_end|>")
    masked_ids = [i for i, m in zip(p.input_ids, p.loss_mask) if m]
    assert masked_ids[-1] == im_end and masked_ids.count(im_end) == 1
    # GSM8K answers are a few lines: each line is a sentence of its own.
    n_lines = len([ln for ln in row["answer"].split("\n") if ln.strip()])
    sids = [s for s, m in zip(p.sentence_ids, p.loss_mask) if m]
    assert len(set(sids)) >= n_lines and sids == sorted(sids)
    assert len(p.offsets) == 2 * len(p.input_ids)


def test_candidates_share_a_prompt_id(bpe):
    dcfg = DataConfig()
    cands = parse_row({"id": "p7", "prompt": "Q?", "response": ["A one.", "A two."]}, dcfg, "x:0")
    assert [c.row_id for c in cands] == ["p7#0", "p7#1"]
    assert cands[0].prompt_id == cands[1].prompt_id
    other = parse_row({"prompt": "Other?", "response": "B."}, dcfg, "x:1")[0]
    assert other.prompt_id != cands[0].prompt_id
    given = parse_row({"prompt": "Q?", "response": "C.", "prompt_id": "g"}, dcfg, "x:2")[0]
    assert given.prompt_id == "g"


def test_given_student_token_logprobs_land_on_loss_tokens(bpe):
    base = _prep(bpe, {"prompt": "Q?", "response": "Yes it is."})
    n = sum(base.loss_mask)
    lps = [-0.1 * (k + 1) for k in range(n)]
    p = _prep(bpe, {"prompt": "Q?", "response": "Yes it is.", "teacher_logprobs": lps})
    got = [v for v, m in zip(p.teacher_logprobs, p.loss_mask) if m]
    assert got == pytest.approx(lps)
    assert all(v == 0.0 for v, m in zip(p.teacher_logprobs, p.loss_mask) if not m)
    # One per content token: the end-of-turn token's teacher log-prob is unknown (NaN).
    p2 = _prep(bpe, {"prompt": "Q?", "response": "Yes it is.", "teacher_logprobs": lps[:-1]})
    got2 = [v for v, m in zip(p2.teacher_logprobs, p2.loss_mask) if m]
    assert got2[:-1] == pytest.approx(lps[:-1]) and math.isnan(got2[-1])


def test_given_teacher_token_strings_are_aligned_by_characters(bpe):
    resp = "Yes it is."
    # A teacher that split the response into words, plus its own end-of-turn token.
    toks, lps = ["Yes", " it", " is", ".", "</s>"], [-1.0, -2.0, -3.0, -0.5, -0.25]
    p = _prep(
        bpe, {"prompt": "Q?", "response": resp, "teacher_logprobs": lps, "teacher_tokens": toks}
    )
    got = [v for v, m in zip(p.teacher_logprobs, p.loss_mask) if m]
    assert sum(got) == pytest.approx(sum(lps))
    assert got[-1] == pytest.approx(-0.25)  # the end-of-turn token gets the teacher's
    # Offsets instead of strings give the same result.
    offs = [[0, 3], [3, 6], [6, 9], [9, 10], [10, 10]]
    q = _prep(
        bpe, {"prompt": "Q?", "response": resp, "teacher_logprobs": lps, "teacher_offsets": offs}
    )
    assert q.teacher_logprobs == pytest.approx(p.teacher_logprobs)


def test_truncate_keeps_a_prefix_and_counts(bpe):
    long = " ".join(["word"] * 80)
    p = _prep(bpe, {"prompt": "Q?", "response": long}, max_length=24, overlength="truncate")
    assert p.truncated and len(p.input_ids) == 24 == len(p.loss_mask) == len(p.sentence_ids)
    with pytest.raises(RowReject) as e:
        _prep(bpe, {"prompt": "Q?", "response": long}, max_length=24, overlength="drop")
    assert e.value.code == "too_long"
    with pytest.raises(RowReject) as e:
        _prep(
            bpe,
            {"prompt": "A long question " * 10, "response": "x"},
            max_length=10,
            overlength="truncate",
        )
    assert e.value.code == "no_loss_tokens"


# ----------------------------------------------------------------------------- rejects

OK = {"prompt": "What is 1+1?", "response": "Two."}
# (raw JSONL line, expected field, expected reason code)
MALFORMED = [
    (b"{not json", "line", "invalid_json"),
    (b"[1, 2, 3]", "line", "invalid_json"),
    (b'{"prompt": "caf\xe9", "response": "x"}', "line", "undecodable"),
    (b'{"prompt": "hi", "response": "\\ud800 lone"}', "response", "undecodable"),
    (b'{"question": "no known keys"}', "messages|prompt", "missing_key"),
    (b'{"prompt": "hi"}', "response", "missing_key"),
    (b'{"prompt": "hi", "response": null}', "response", "missing_key"),
    (b'{"prompt": "hi", "response": ""}', "response", "empty_response"),
    (b'{"prompt": "hi", "response": "   \\n "}', "response", "empty_response"),
    (b'{"prompt": "hi", "response": 42}', "response", "wrong_type"),
    (b'{"prompt": ["a"], "response": "x"}', "prompt", "wrong_type"),
    (b'{"messages": "not json"}', "messages", "wrong_type"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "messages", "empty_response"),
    (
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["x"]}]}',
        "messages[1].content",
        "wrong_type",
    ),
    (
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}',
        "messages[1].content",
        "missing_key",
    ),
    (
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
        "messages[1].content",
        "empty_response",
    ),
    (b'{"prompt": "hi", "response": "' + b"word " * 200 + b'"}', "input_ids", "too_long"),
    (
        b'{"prompt": "hi", "response": "Two.", "teacher_logprobs": [-1.0]}',
        "teacher_logprobs",
        "logprobs_length",
    ),
    # A null, NaN, inf, sentinel or positive log-prob is missing (tests/unit/
    # test_teacher_logprobs.py); a row with no value at all gives none.
    (
        b'{"prompt": "hi", "response": "Two.", "teacher_logprobs": [NaN, -Infinity, null]}',
        "teacher_logprobs",
        "logprobs_all_missing",
    ),
    (
        b'{"prompt": "hi", "response": "Two.", "teacher_logprobs": [-9999.0, 0.5, -1e30]}',
        "teacher_logprobs",
        "logprobs_all_missing",
    ),
    (
        b'{"prompt": "hi", "response": "Two.", "teacher_logprobs": [-1.0, "a", -1.0]}',
        "teacher_logprobs",
        "wrong_type",
    ),
    (
        b'{"prompt": "hi", "response": "Two.", "teacher_logprobs": [-1.0, "-0.5", -1.0]}',
        "teacher_logprobs",
        "wrong_type",
    ),
    (
        b'{"prompt": "hi", "response": "Two.", "teacher_logprobs": [-1.0, true, -1.0]}',
        "teacher_logprobs",
        "wrong_type",
    ),
    (
        b'{"prompt": "hi", "response": "Two.", "teacher_logprobs": -1.0}',
        "teacher_logprobs",
        "wrong_type",
    ),
    (
        b'{"prompt": "hi", "response": "Two.", "teacher_logprobs": [-1.0, -1.0], '
        b'"teacher_tokens": ["Tw", "x."]}',
        "teacher_tokens",
        "teacher_tokens_mismatch",
    ),
    (
        b'{"prompt": "hi", "response": "Two.", "teacher_logprobs": [-1.0, -1.0], '
        b'"teacher_tokens": ["Two."]}',
        "teacher_logprobs",
        "logprobs_length",
    ),
]


def _raw_table(lines: list[bytes], name="traces.jsonl") -> pa.Table:
    return pa.table(
        {
            "_raw": pa.array(lines, pa.binary()),
            "_source": pa.array([name] * len(lines)),
            "_index": pa.array(range(len(lines)), pa.int64()),
        }
    )


def test_malformed_corpus_each_rejected_with_its_reason(tmp_path):
    good = [json.dumps({**OK, "id": f"good{i}"}).encode() for i in range(3)]
    two = json.dumps({"id": "cands", "prompt": "Q?", "response": ["A.", ""]}).encode()
    lines = good + [two] + [m[0] for m in MALFORMED]
    out = prepare_out_dir(tmp_path / "prep")
    dcfg = DataConfig(max_length=64)
    table = prepare_batch(_raw_table(lines), "tiny-bpe", dcfg, str(out / "_parts"))
    assert table.schema.equals(PREPARED_SCHEMA)
    assert table.column("row_id").to_pylist() == ["good0", "good1", "good2", "cands#0"]
    totals, rejects = collect_parts(out, "prepare")
    by_id = {r["row_id"]: r for r in rejects.to_pylist()}
    assert by_id.pop("cands#1")["reason"].startswith("empty_response")
    for k, (_, field, code) in enumerate(MALFORMED):
        r = by_id[f"traces.jsonl:{4 + k}"]
        assert (r["field"], r["reason"].split(":")[0]) == (field, code), (k, r)
        assert r["stage"] == "prepare"
    # Nothing lost: 3 good + 2 candidates + the malformed rows.
    assert totals["rows_in"] == 3 + 2 + len(MALFORMED)
    assert totals["rows_in"] == table.num_rows + rejects.num_rows
    assert pq.read_table(out / "rejects.parquet").num_rows == rejects.num_rows


def test_reject_field_names_follow_configured_keys(bpe):
    dcfg = DataConfig(prompt_key="q", response_key="a")
    with pytest.raises(RowReject) as e:
        parse_row({"q": "hi", "a": 3}, dcfg, "x:0")
    assert (e.value.field, e.value.code) == ("a", "wrong_type")
    with pytest.raises(RowReject) as e:
        prepare_candidate(
            bpe,
            Candidate(
                "r",
                "p",
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ok"}],
                {
                    "logprobs": [-1.0] * 9,
                    "tokens": None,
                    "offsets": None,
                    "field": "teacher_logprobs",
                    "tokens_field": "t",
                },
            ),
            dcfg,
        )
    assert e.value.code == "logprobs_length"


def test_an_unknown_chat_role_is_rejected_naming_the_turn():
    dcfg = DataConfig()
    msgs = [{"role": "wizard", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    with pytest.raises(RowReject) as e:
        parse_row({"messages": msgs}, dcfg, "x:0")
    assert (e.value.field, e.value.code) == ("messages[0].role", "unknown_role")
    assert "'wizard'" in e.value.detail
    for role in ("system", "user", "tool"):
        ok = [{"role": role, "content": "2+2?"}, {"role": "assistant", "content": "4"}]
        assert len(parse_row({"messages": ok}, dcfg, "x:1")) == 1


def test_a_list_response_is_a_list_of_candidates():
    # Documented in docs/scoring.md: ["2"] is one candidate, the same as "2".
    dcfg = DataConfig()
    (one,) = parse_row({"prompt": "1+1?", "response": ["2"]}, dcfg, "x:0")
    (plain,) = parse_row({"prompt": "1+1?", "response": "2"}, dcfg, "x:0")
    assert one.messages == plain.messages and one.prompt_id == plain.prompt_id
    assert one.row_id == "x:0"


def _dasd_rows(teacher_tok, texts, seed=0):
    """Rows shaped like DASD's public -Logprob set: a ``sample_uuid``, and the teacher's
    ``token_ids`` and ``logprobs`` in the teacher's own tokenizer (its end-of-turn token
    last), beside the prompt and response."""
    import random

    rng = random.Random(seed)
    eot = teacher_tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for k, text in enumerate(texts):
        ids = teacher_tok(text, add_special_tokens=False)["input_ids"] + [eot]
        lps = [-rng.uniform(0.01, 4.0) for _ in ids]
        rows.append(
            {
                "sample_uuid": f"u{k}",
                "prompt": "Q?",
                "response": text,
                "token_ids": ids,
                "logprobs": lps,
            }
        )
    return rows


DASD_TEXTS = [
    "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips altogether.\n#### 72",
    "It is 5.5. Done!\nYes: the answer is 12, not 13. Déjà vu: 3×4 = 12.",
]


@pytest.mark.parametrize("teacher", ["qwen2", "tiny-wordpiece"])
def test_public_teacher_logprob_set_in_the_teachers_tokenizer(tmp_path, teacher):
    """Teacher token ids + a teacher tokenizer (byte-level Qwen2, 151K tokens; or a
    WordPiece one) onto the tiny-bpe student: every teacher log-prob lands on a student
    loss token, the row sums agree, and ids that do not spell the response are rejected."""
    from tests.conftest import QWEN2_TOKENIZER

    path = QWEN2_TOKENIZER if teacher == "qwen2" else teacher
    ttok = load_tokenizer(path)
    rows = _dasd_rows(ttok, DASD_TEXTS)
    wrong = dict(rows[0], sample_uuid="wrong", response="Natalia sold 50 clips.\n#### 50")
    lines = [json.dumps(r).encode() for r in [*rows, wrong]]
    dcfg = DataConfig(
        id_key="sample_uuid",
        teacher_logprobs_key="logprobs",
        teacher_token_ids_key="token_ids",
        teacher_tokenizer=path,
    )
    out = prepare_out_dir(tmp_path / "prep")
    table = prepare_batch(_raw_table(lines), "tiny-bpe", dcfg, str(out / "_parts"))
    totals, rejects = collect_parts(out, "prepare")
    assert totals["rows_in"] == 3 and table.num_rows == 2
    (rej,) = rejects.to_pylist()
    assert (rej["row_id"], rej["field"]) == ("wrong", "token_ids")
    assert rej["reason"].startswith("teacher_tokens_mismatch")
    student = load_tokenizer("tiny-bpe")
    for got, src in zip(table.to_pylist(), rows):
        assert got["row_id"] == src["sample_uuid"]
        s_ids = [t for t, m in zip(got["input_ids"], got["loss_mask"]) if m]
        assert s_ids != src["token_ids"]  # genuinely another tokenization
        on_loss = [v for v, m in zip(got["teacher_logprobs"], got["loss_mask"]) if m]
        # Unknown (NaN) only where the teacher covers no character: whitespace a
        # WordPiece teacher drops; byte-level Qwen2 covers every character.
        for t, v in zip(s_ids[:-1], on_loss[:-1]):
            assert not math.isnan(v) or (teacher != "qwen2" and not student.decode([t]).strip())
        on_loss = [v for v in on_loss if not math.isnan(v)]
        # The end-of-turn token carries the teacher's; the content carries the rest.
        assert on_loss[-1] == pytest.approx(src["logprobs"][-1], abs=1e-6)
        assert sum(on_loss) == pytest.approx(sum(src["logprobs"]), abs=1e-4)  # float32 store
        assert student.decode(s_ids[:-1]) == src["response"]


def test_a_mixed_policy_traces_student_prefix_trains_unless_masked(bpe):
    """``student_prefix_chars``: the student wrote the response's first characters. They
    carry loss by default (DASD trained on them); ``data.mask_student_prefix`` drops the
    tokens that end within them, and a token running into the teacher's text keeps it."""
    row = {"prompt": "Q?", "response": "Alpha beta. Gamma delta!", "student_prefix_chars": 11}
    kept = _prep(bpe, row)
    assert _masked_text(bpe, kept) == "Alpha beta. Gamma delta!<|im_end|>"
    masked = _prep(bpe, row, mask_student_prefix=True)
    assert _masked_text(bpe, masked).lstrip() == "Gamma delta!<|im_end|>"
    # exactly the loss tokens of `kept` whose text lies within "Alpha beta." went
    dropped = [i for i, (a, b) in enumerate(zip(kept.loss_mask, masked.loss_mask)) if a != b]
    assert bpe.decode([kept.input_ids[i] for i in dropped]) == "Alpha beta."
    # a wrong type is a reject naming the column
    with pytest.raises(RowReject) as e:
        _prep(bpe, dict(row, student_prefix_chars="11"), mask_student_prefix=True)
    assert (e.value.field, e.value.code) == ("student_prefix_chars", "wrong_type")
