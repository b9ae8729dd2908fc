"""One candidate in (``raydc.prepare.parse``), one prepared row out (or a reject with its field
and reason).

Pure Python + a Hugging Face tokenizer; no Ray here, so every rule tests in milliseconds.

The conversation is rendered with the student's chat template, tokenised with character
offsets, and:

- ``loss_mask`` is True on the tokens that overlap an assistant message's content as
  the template renders it (with its ``<think>`` reasoning block; an empty block only with
  ``data.train_empty_think``: ``raydc.infra.chat.render``), plus the end-of-turn token
  right after it (the first token at or after the content's end when it is a special
  token, e.g. ``<|im_end|>``): the student must learn to stop.
- ``sentence_ids`` number the sentences of the assistant content (``raydc.method.spans``),
  consecutively across turns; 0 off the response.
- Given teacher log-probs are carried onto the student tokens (``raydc.method.align``).
  A teacher whose text differs from the response (chat or channel markup, ``<think>``
  tags, whitespace) is aligned on the text both share (``match_blocks``,
  ``align_matched_turn``): values inside it, unknown (NaN) elsewhere; a row whose
  response is covered less than ``data.min_teacher_coverage`` is rejected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from raydc.infra.chat import render, special_ids, tokenize, turn_tokens
from raydc.method.align import (
    NAN,
    AlignmentError,
    align_matched_turn,
    align_turn,
    char_spans,
    match_blocks,
    offsets_from_strings,
    token_pieces,
)
from raydc.method.spans import token_sentence_ids
from raydc.prepare.parse import Candidate, RowReject


@dataclass(frozen=True)
class TeacherMatch:
    """How a row's given teacher text (token strings, bytes or decoded ids) met its
    response: ``exact`` when it spells the response (anything after it is end-of-turn),
    else aligned on the blocks both share."""

    exact: bool
    coverage: float  # share of the response's characters the teacher's text matched
    outside_logprob: float  # teacher log-probs not placed (text the response lacks)
    outside_tokens: int


class TeacherCoverageReject(RowReject):
    """A row whose teacher text covers too little of its response; ``coverage`` says how
    much (the prepare summary's distribution counts rejected rows too)."""

    def __init__(self, field: str, coverage: float, minimum: float):
        self.coverage = coverage
        shown = math.floor(coverage * 1000 + 1e-9) / 1000
        super().__init__(
            field,
            "teacher_tokens_mismatch",
            f"teacher_coverage {shown:g} of the response's characters matched the "
            f"teacher's text (< data.min_teacher_coverage {minimum:g})",
        )


@dataclass
class Prepared:
    row_id: str
    prompt_id: str
    input_ids: list[int]
    loss_mask: list[bool]
    sentence_ids: list[int]
    teacher_logprobs: list[float] | None
    text: str
    offsets: list[int]  # interleaved (start, end) of each token in ``text``: [2T]
    response_spans: list[int]  # interleaved (start, end) of each assistant content: [2K]
    conversation: str  # the messages as JSON, for re-rendering with a teacher's template
    truncated: bool = False
    teacher_match: TeacherMatch | None = None  # given teacher text vs the response (counts)

    def to_row(self) -> dict:
        return {
            "row_id": self.row_id,
            "prompt_id": self.prompt_id,
            "input_ids": self.input_ids,
            "loss_mask": self.loss_mask,
            "sentence_ids": self.sentence_ids,
            "teacher_logprobs": self.teacher_logprobs,
            "num_tokens": len(self.input_ids),
            "num_loss_tokens": int(sum(self.loss_mask)),
            "text": self.text,
            "offsets": self.offsets,
            "response_spans": self.response_spans,
            "conversation": self.conversation,
        }


def teacher_ids_to_offsets(cand: Candidate, teacher_tok, teacher_specials: set[int]) -> Candidate:
    """Character spans, in the response, of a candidate's teacher token ids (given in the
    teacher's own tokenizer, as public teacher-log-prob sets ship them).

    The ids are decoded piece by piece (``raydc.method.align.token_pieces``); when the
    decoded text is the response, each token's span is its piece's. Otherwise, when the
    ids are the teacher tokenizer's own encoding of the response (a WordPiece teacher's
    decode puts spaces between words), its offset mapping gives the spans. Special tokens
    get the empty span where the next text starts (the end-of-turn token: the end), so
    their log-probs are carried, not dropped. Any other decoded text (markup around or
    inside the response) goes on as the teacher's ``text`` with its pieces' spans in it,
    for ``prepare_candidate`` to align on the text both share; ids that cannot be
    decoded piece by piece are a reject."""
    t = cand.teacher
    if cand.error is not None or t is None or t.get("token_ids") is None:
        return cand
    ids, field = t["token_ids"], t["token_ids_field"]
    text = cand.messages[-1]["content"]
    try:
        decoded, pieces = token_pieces(teacher_tok, ids, teacher_specials)
    except AlignmentError:
        decoded, pieces = None, None
    if decoded == text:
        spans = char_spans(pieces, ids, teacher_specials)
    else:
        enc = teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        body = [i for i in ids if i not in teacher_specials]
        if list(enc["input_ids"]) != body and decoded is not None:
            spans = char_spans(pieces, ids, teacher_specials)
            teacher = {**t, "offsets": spans, "text": decoded, "token_ids": None}
            return replace(cand, teacher={**teacher, "tokens_field": field})
        if list(enc["input_ids"]) != body:
            shown = decoded if decoded is not None else ""
            at = next(
                (k for k, (a, b) in enumerate(zip(shown, text)) if a != b),
                min(len(shown), len(text)),
            )
            raise RowReject(
                field,
                "teacher_tokens_mismatch",
                f"the teacher token ids decode to text that differs from the response at "
                f"character {at}, and are not the teacher tokenizer's encoding of it",
            )
        found = iter([(int(s), int(e)) for s, e in enc["offset_mapping"]])
        spans = [None if i in teacher_specials else next(found) for i in ids]
        nxt = len(text)
        for k in range(len(spans) - 1, -1, -1):  # specials: empty, where the next text starts
            if spans[k] is None:
                spans[k] = (nxt, nxt)
            else:
                nxt = spans[k][0]
    # the spans are in the response's coordinates: it is the text they spell
    teacher = {**t, "offsets": spans, "token_ids": None, "text": text}
    return replace(cand, teacher=teacher)


# ----------------------------------------------------------------------------- rendering


def prepare_candidate(tok, cand: Candidate, dcfg, specials: set[int] | None = None) -> Prepared:
    """Render, tokenise, mask, number sentences and align given teacher log-probs."""
    if cand.error is not None:
        raise cand.error
    specials = special_ids(tok) if specials is None else specials
    text, spans = render(tok, cand.messages, dcfg.train_empty_think)
    ids, offsets = tokenize(tok, text)
    T = len(ids)
    turns = turn_tokens(offsets, ids, spans, specials)
    mask = [False] * T
    sids = [0] * T
    next_sid = 0
    for (cs, ce), (content, eot) in zip(spans, turns):
        rel = [(offsets[i][0] - cs, offsets[i][1] - cs) for i in content]
        content_text = text[cs:ce]
        local = token_sentence_ids(content_text, [(max(0, s), max(0, e)) for s, e in rel])
        for i, sid in zip(content, local):
            mask[i] = True
            sids[i] = next_sid + sid
        top = next_sid + (max(local) if local else 0)
        if eot is not None:
            mask[eot] = True
            sids[eot] = top
        next_sid = top + 1
    if cand.prefix_chars and dcfg.mask_student_prefix:
        _mask_student_prefix(mask, offsets, spans[-1][0] + cand.prefix_chars, turns[-1][0])
    teacher, match = None, None
    if cand.teacher is not None:
        teacher, match = _given_teacher(
            cand, text, spans, offsets, turns, T, dcfg.min_teacher_coverage
        )
    truncated = False
    if T > dcfg.max_length:
        if dcfg.overlength == "drop":
            raise RowReject(
                "input_ids", "too_long", f"{T} tokens > data.max_length={dcfg.max_length}"
            )
        truncated = True
        T = dcfg.max_length
        ids, offsets, mask, sids = ids[:T], offsets[:T], mask[:T], sids[:T]
        teacher = teacher[:T] if teacher is not None else None
    if not any(mask):
        raise RowReject(
            "input_ids",
            "no_loss_tokens",
            "no response token within data.max_length" if truncated else "no response tokens",
        )
    return Prepared(
        row_id=cand.row_id,
        prompt_id=cand.prompt_id,
        input_ids=ids,
        loss_mask=mask,
        sentence_ids=sids,
        teacher_logprobs=teacher,
        text=text,
        offsets=[x for se in offsets for x in se],
        response_spans=[x for se in spans for x in se],
        conversation=json.dumps(cand.messages, ensure_ascii=False),
        truncated=truncated,
        teacher_match=match,
    )


def _mask_student_prefix(mask: list[bool], offsets, end: int, content: list[int]) -> None:
    """No loss on the tokens the student wrote (those ending at or before ``end``, the
    prefix's last character); a token that runs into the teacher's text keeps it."""
    for i in content:
        if offsets[i][1] <= end:
            mask[i] = False


def _given_teacher(
    cand: Candidate, text, spans, offsets, turns, T, min_coverage: float
) -> tuple[list[float], TeacherMatch | None]:
    """Given teacher log-probs on student positions (0.0 off the loss mask, NaN unknown),
    and how the teacher's text met the response (None without a teacher text)."""
    t = cand.teacher
    lps, field = t["logprobs"], t["field"]
    out = [0.0] * T
    loss_idx = [
        i for content, eot in turns for i in [*content, *([eot] if eot is not None else [])]
    ]
    if t["tokens"] is None and t["offsets"] is None:
        # Student-tokenizer log-probs: one per loss token, or one per content token.
        n_content = sum(len(c) for c, _ in turns)
        if len(lps) == len(loss_idx):
            for i, v in zip(loss_idx, lps):
                out[i] = v
        elif len(lps) == n_content:
            k = 0
            for content, eot in turns:
                for i in content:
                    out[i] = lps[k]
                    k += 1
                if eot is not None:
                    out[eot] = NAN
        else:
            raise RowReject(
                field,
                "logprobs_length",
                f"{len(lps)} log-probs, but the response has {len(loss_idx)} loss tokens "
                f"({n_content} without end-of-turn); give teacher tokens, offsets, or token "
                "ids with data.teacher_tokenizer for another tokenizer",
            )
        return out, None
    if len(spans) != 1:
        raise RowReject(
            field, "wrong_type", "teacher tokens/offsets need exactly one assistant turn"
        )
    (cs, ce), (content, eot) = spans[0], turns[0]
    content_text = text[cs:ce]
    # the text the teacher's tokens spell: their strings, or the text their bytes decode to
    joined = "".join(t["tokens"]) if t["tokens"] is not None else t.get("text")
    src = offsets_from_strings(t["tokens"]) if t["tokens"] is not None else t["offsets"]
    rel = [(offsets[i][0] - cs, offsets[i][1] - cs) for i in content]
    match = None
    if joined is not None and not joined.startswith(content_text):
        # The teacher's text is not the response: align on the text both share.
        blocks = match_blocks(joined, content_text)
        part = align_matched_turn(
            len(content_text), len(joined), blocks, src, lps, rel, eot is not None
        )
        if part.coverage < min_coverage:
            raise TeacherCoverageReject(t["tokens_field"], part.coverage, min_coverage)
        vals = part.values
        match = TeacherMatch(False, part.coverage, part.outside_logprob, part.outside_tokens)
    else:
        try:
            vals = align_turn(len(content_text), src, lps, rel, eot is not None)
        except AlignmentError as e:
            raise RowReject(field, "teacher_alignment", str(e)) from None
        if joined is not None:
            match = TeacherMatch(True, 1.0, 0.0, 0)
    for i, v in zip([*content, *([eot] if eot is not None else [])], vals):
        out[i] = v
    return out, match
