"""Thinking chat templates (Qwen3's real one, tests/assets/qwen3-chat-template): reasoning
is rendered as the template renders it and carries loss; an empty think block carries
none unless data.train_empty_think. Expected texts are written out by hand from the
template's rules: reasoning between '<think>\\n' and '\\n</think>\\n\\n' before the answer,
only for assistant turns after the last user message; an empty block in the last turn
when it has no reasoning."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from raydc.config import DataConfig, from_dict
from raydc.infra.artifacts import collect_parts, prepare_out_dir
from raydc.infra.chat import render
from raydc.infra.models import load_tokenizer
from raydc.prepare.parse import RowReject, parse_row
from raydc.prepare.render import prepare_candidate
from raydc.prepare.stage import prepare_batch

from ..conftest import QWEN2_TOKENIZER, QWEN3_TEMPLATE, qwen3_tokenizer
from .test_prepare import _raw_table

THINK, END_THINK = 151667, 151668  # Qwen3's ids
Q = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def qwen3():
    return qwen3_tokenizer()


def _prep(tok, row, **cfg):
    dcfg = DataConfig(**cfg)
    (cand,) = parse_row(row, dcfg, "f.jsonl:0")
    return prepare_candidate(tok, cand, dcfg)


def _masked(tok, p) -> str:
    return tok.decode([i for i, m in zip(p.input_ids, p.loss_mask) if m])


def _spans(p) -> list[str]:
    return [p.text[s:e] for s, e in zip(p.response_spans[::2], p.response_spans[1::2])]


def _chat(*turns) -> dict:
    return {"id": "c", "messages": list(turns)}


USER = {"role": "user", "content": "What is 2+3?"}


def test_the_asset_is_qwen3s_template_byte_for_byte():
    # SOURCE.md records this hash of the file llama.cpp fetched from Qwen/Qwen3-0.6B.
    with open(QWEN3_TEMPLATE, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    assert digest == "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5"
    with open(os.path.join(os.path.dirname(QWEN3_TEMPLATE), "SOURCE.md")) as fh:
        assert digest in fh.read()


def test_qwen3_template_renders_an_empty_think_block_before_a_plain_answer(qwen3):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = qwen3.apply_chat_template(msgs, tokenize=False)
    # Qwen3's documented rendering of this conversation.
    assert text == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\nHello<|im_end|>\n"
    )
    ids = qwen3(text, add_special_tokens=False)["input_ids"]
    assert ids.count(THINK) == 1 and ids.count(END_THINK) == 1  # one token each


def test_reasoning_content_is_rendered_and_carries_loss(qwen3):
    a = {"role": "assistant", "content": "It is 5.", "reasoning_content": "Add 2 and 3."}
    p = _prep(qwen3, _chat(USER, a))
    turn = "<think>\nAdd 2 and 3.\n</think>\n\nIt is 5."
    assert p.text == Q + turn + "<|im_end|>\n"
    assert _spans(p) == [turn]
    assert _masked(qwen3, p) == turn + "<|im_end|>"
    masked_ids = [i for i, m in zip(p.input_ids, p.loss_mask) if m]
    assert masked_ids[0] == THINK and END_THINK in masked_ids
    # The conversation keeps the reasoning (a teacher re-renders it with its template).
    assert json.loads(p.conversation)[1]["reasoning_content"] == "Add 2 and 3."


def test_an_empty_think_block_carries_no_loss_unless_asked(qwen3):
    row = _chat(USER, {"role": "assistant", "content": "It is 5."})
    p = _prep(qwen3, row)
    assert p.text == Q + "<think>\n\n</think>\n\nIt is 5.<|im_end|>\n"
    assert _masked(qwen3, p) == "It is 5.<|im_end|>"
    assert THINK not in [i for i, m in zip(p.input_ids, p.loss_mask) if m]
    p = _prep(qwen3, row, train_empty_think=True)
    assert _spans(p) == ["<think>\n\n</think>\n\nIt is 5."]
    assert _masked(qwen3, p) == "<think>\n\n</think>\n\nIt is 5.<|im_end|>"
    # An empty reasoning_content is no reasoning.
    row["messages"][1]["reasoning_content"] = ""
    assert _masked(qwen3, _prep(qwen3, row)) == "It is 5.<|im_end|>"


def test_a_think_block_in_the_response_is_rendered_as_the_template_rewrites_it(qwen3):
    # DASD-style output: the reasoning between <think> tags in the response text. Qwen3's
    # template splits it out and re-renders it with its own newlines.
    p = _prep(qwen3, {"prompt": "What is 2+3?", "response": "<think>Add 2 and 3.</think>It is 5."})
    turn = "<think>\nAdd 2 and 3.\n</think>\n\nIt is 5."
    assert p.text == Q + turn + "<|im_end|>\n"
    assert _masked(qwen3, p) == turn + "<|im_end|>"
    # Already in the template's form: found as it is.
    p = _prep(qwen3, {"prompt": "What is 2+3?", "response": turn})
    assert _spans(p) == [turn] and _masked(qwen3, p) == turn + "<|im_end|>"


def test_an_empty_think_block_written_in_the_response_carries_no_loss_either(qwen3):
    qwen2 = load_tokenizer(QWEN2_TOKENIZER)  # a template that knows nothing of thinking
    row = {"prompt": "What is 2+3?", "response": "<think>\n\n</think>\n\nIt is 5."}
    for tok in (qwen3, qwen2):
        p = _prep(tok, row)
        assert p.text.endswith("<think>\n\n</think>\n\nIt is 5.<|im_end|>\n")
        assert _masked(tok, p) == "It is 5.<|im_end|>"
        assert _masked(tok, _prep(tok, row, train_empty_think=True)) == (
            "<think>\n\n</think>\n\nIt is 5.<|im_end|>"
        )


def test_multi_turn_reasoning_follows_the_template(qwen3):
    # Qwen3 drops the reasoning of turns before the last user message: that turn trains
    # on its answer alone; the last turn on its reasoning and answer.
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
        USER,
        {"role": "assistant", "content": "It is 5.", "reasoning_content": "Add 2 and 3."},
    ]
    p = _prep(qwen3, _chat(*msgs))
    assert p.text == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        + Q
        + "<think>\nAdd 2 and 3.\n</think>\n\nIt is 5.<|im_end|>\n"
    )
    assert _spans(p) == ["Hello.", "<think>\nAdd 2 and 3.\n</think>\n\nIt is 5."]
    assert _masked(qwen3, p) == (
        "Hello.<|im_end|><think>\nAdd 2 and 3.\n</think>\n\nIt is 5.<|im_end|>"
    )


def test_an_answer_that_also_appears_in_the_reasoning_is_found_after_it(qwen3):
    a = {"role": "assistant", "content": "5", "reasoning_content": "2+3 is 5"}
    p = _prep(qwen3, _chat(USER, a))
    assert _spans(p) == ["<think>\n2+3 is 5\n</think>\n\n5"]
    assert _masked(qwen3, p) == "<think>\n2+3 is 5\n</think>\n\n5<|im_end|>"


def test_a_template_that_drops_reasoning_trains_on_what_it_renders():
    qwen2 = load_tokenizer(QWEN2_TOKENIZER)
    a = {"role": "assistant", "content": "It is 5.", "reasoning_content": "Add 2 and 3."}
    p = _prep(qwen2, _chat(USER, a))
    assert "Add 2 and 3." not in p.text
    assert _masked(qwen2, p) == "It is 5.<|im_end|>"


def test_reasoning_rendered_in_another_markup_carries_loss_from_the_reasoning_on():
    tok = load_tokenizer(QWEN2_TOKENIZER)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.reasoning_content %}[R] {{ m.reasoning_content }} [/R] {% endif %}"
        "{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    a = {"role": "assistant", "content": "It is 5.", "reasoning_content": "Add 2 and 3."}
    text, spans = render(tok, [USER, a])
    assert [text[s:e] for s, e in spans] == ["Add 2 and 3. [/R] It is 5."]


def test_reasoning_content_of_the_wrong_type_is_rejected_naming_it(qwen3):
    a = {"role": "assistant", "content": "It is 5.", "reasoning_content": ["Add"]}
    with pytest.raises(RowReject) as e:
        parse_row(_chat(USER, a), DataConfig(), "f.jsonl:0")
    assert (e.value.field, e.value.code) == ("messages[1].reasoning_content", "wrong_type")


def test_prepare_batch_with_a_saved_qwen3_tokenizer(qwen3, tmp_path):
    folder = tmp_path / "qwen3-tok"
    qwen3.save_pretrained(folder)
    rows = [
        _chat(USER, {"role": "assistant", "content": "It is 5.", "reasoning_content": "2+3."}),
        {"id": "plain", "prompt": "What is 2+3?", "response": "It is 5."},
        {
            "id": "bad",
            "messages": [USER, {"role": "assistant", "content": "x", "reasoning_content": 3}],
        },
    ]
    out = prepare_out_dir(tmp_path / "prep")
    dcfg = DataConfig(max_length=64)
    lines = [json.dumps(r).encode() for r in rows]
    table = prepare_batch(_raw_table(lines), str(folder), dcfg, str(out / "_parts"))
    totals, rejects = collect_parts(out, "prepare")
    assert totals["rows_in"] == 3 == table.num_rows + rejects.num_rows
    (rej,) = rejects.to_pylist()
    assert (rej["row_id"], rej["field"]) == ("bad", "messages[1].reasoning_content")
    got = {r["row_id"]: r for r in table.to_pylist()}
    masked = {
        k: qwen3.decode([i for i, m in zip(r["input_ids"], r["loss_mask"]) if m])
        for k, r in got.items()
    }
    assert masked == {
        "c": "<think>\n2+3.\n</think>\n\nIt is 5.<|im_end|>",
        "plain": "It is 5.<|im_end|>",
    }


class _ByIdScorer:
    """A scorer whose log-prob of each token is a function of its id alone."""

    def score(self, rows):
        import numpy as np

        return [np.array([_lp(t) for t in ids], np.float32) for ids in rows]


def _lp(token_id: int) -> float:
    return -0.5 - (token_id % 97) / 100


@pytest.mark.parametrize("train_empty_think", [False, True])
def test_a_teacher_with_another_tokenizer_renders_the_empty_think_block_as_prepare_did(
    qwen3, tmp_path, monkeypatch, train_empty_think
):
    """score.teacher with its own tokenizer re-renders the conversation; its turn spans must
    hold the empty think block exactly when the student's do (data.train_empty_think), or
    the teacher's values land on other characters than the student's. Here the teacher's
    tokenizer is the student's, so each loss token must get the value of its own id."""
    import raydc.score.teacher as teacher_mod
    from raydc.score.teacher import TeacherScorer

    folder = tmp_path / "teacher"
    qwen3.save_pretrained(folder)
    (folder / "config.json").write_text(
        json.dumps({"vocab_size": 151936, "max_position_embeddings": 4096})
    )
    monkeypatch.setattr(teacher_mod, "make_scorer", lambda *a, **k: _ByIdScorer())
    dcfg = DataConfig(max_length=64, train_empty_think=train_empty_think)
    row = _chat(USER, {"role": "assistant", "content": "It is 5."})
    out = prepare_out_dir(tmp_path / "prep")
    prepared = prepare_batch(
        _raw_table([json.dumps(row).encode()]), str(folder), dcfg, str(out / "_parts")
    )
    assert THINK in prepared.column("input_ids")[0].as_py()  # the template's empty block

    actor = TeacherScorer(
        str(folder),
        from_dict({"score": {"student": str(folder)}}).score,
        same_tokenizer=False,
        train_empty_think=train_empty_think,
    )
    (got,) = actor(prepared).to_pylist()
    ids, mask = got["input_ids"], got["loss_mask"]
    masked = [t for t, m in zip(ids, mask) if m]
    assert (THINK in masked) is train_empty_think
    want = [pytest.approx(_lp(t), abs=1e-6) for t in masked]
    assert [v for v, m in zip(got["teacher_logprobs"], mask) if m] == want
