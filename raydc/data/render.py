"""One trace row in, one prepared row out (or a reject with its field and reason).

Pure Python + a Hugging Face tokenizer; no Ray here, so every rule tests in milliseconds.

A row is normalised to a conversation (``messages``) first: the chat schema gives it
directly, the prompt/response schema becomes ``[system?, user: prompt, assistant:
response]``; a list of responses gives several candidates of one prompt. The conversation
is rendered with the student's chat template, tokenised with character offsets, and:

- ``loss_mask`` is True on the tokens that overlap an assistant message's content, plus
  the end-of-turn token right after it (the first token at or after the content's end
  when it is a special token, e.g. ``<|im_end|>``): the student must learn to stop.
- ``sentence_ids`` number the sentences of the assistant content (``raydc.text``),
  consecutively across turns; 0 off the response.
- Given teacher log-probs are carried onto the student tokens (``raydc.data.align``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from raydc.data.align import (
    NAN,
    AlignmentError,
    align_turn,
    char_spans,
    offsets_from_strings,
    token_pieces,
)
from raydc.text import token_sentence_ids
from raydc.weights import LOGPROB_POSITIVE_TOL


class RowReject(Exception):
    """A row that cannot be used; ``field`` names the offending input key, ``code`` is a
    stable reason code (``missing_key``, ``wrong_type``...), ``detail`` says more."""

    def __init__(self, field: str, code: str, detail: str = ""):
        self.field, self.code, self.detail = field, code, detail
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


# The roles chat templates render; another role would be dropped or mis-rendered.
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Candidate:
    """One conversation to render: a source row, or one of its candidate responses."""

    row_id: str
    prompt_id: str
    messages: list[dict]
    teacher: dict | None = None  # {"logprobs": [...], "tokens": [...] | None, "offsets": ...}
    error: RowReject | None = None  # a candidate rejected on its own (one of several)


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


# ----------------------------------------------------------------------------- values


def as_text(value, field: str, allow_empty: bool = True) -> str:
    """A string field: bytes are decoded as UTF-8; anything else is rejected."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowReject(
                field, "undecodable", f"not UTF-8 ({e.reason} at byte {e.start})"
            ) from None
    if not isinstance(value, str):
        raise RowReject(field, "wrong_type", f"expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RowReject(field, "undecodable", "contains lone surrogate code points") from None
    if not allow_empty and not value.strip():
        raise RowReject(field, "empty_response", "empty or whitespace only")
    return value


def as_logprobs(value, field: str) -> list[float]:
    if not isinstance(value, (list, tuple)):
        raise RowReject(
            field, "wrong_type", f"expected a list of numbers, got {type(value).__name__}"
        )
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            if v is None:
                raise RowReject(field, "logprobs_not_finite", f"null at index {i}")
            raise RowReject(field, "wrong_type", f"index {i} is {type(v).__name__}, not a number")
        v = float(v)
        if not math.isfinite(v):
            raise RowReject(field, "logprobs_not_finite", f"{v} at index {i}")
        if v > LOGPROB_POSITIVE_TOL:
            raise RowReject(field, "logprobs_positive", f"{v:.4g} at index {i}: log-probs are <= 0")
        out.append(min(v, 0.0))
    return out


def _missing(row: dict, key: str) -> bool:
    return key not in row or row[key] is None


def prompt_hash(messages: Sequence[dict]) -> str:
    """Candidates of one prompt share it: a hash of everything before the last assistant."""
    last = max(
        (i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages)
    )
    blob = json.dumps(list(messages[:last]), sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- parsing


def parse_row(row: dict, dcfg, default_id: str) -> list[Candidate]:
    """Normalise a raw row to one or more candidates; raise RowReject when unusable."""
    row_id = default_id
    if not _missing(row, dcfg.id_key):
        row_id = str(row[dcfg.id_key])
    schema = dcfg.schema
    if schema == "auto":
        # A column that exists but is null in this row (Parquet unions) does not count.
        if not _missing(row, dcfg.messages_key):
            schema = "chat"
        elif not _missing(row, dcfg.prompt_key):
            schema = "prompt_response"
        elif dcfg.messages_key in row:
            schema = "chat"
        elif dcfg.prompt_key in row:
            schema = "prompt_response"
        else:
            raise RowReject(
                f"{dcfg.messages_key}|{dcfg.prompt_key}",
                "missing_key",
                f"neither {dcfg.messages_key!r} nor {dcfg.prompt_key!r} is present",
            )
    if schema == "chat":
        convs = [_chat_messages(row, dcfg)]
        teachers = [_teacher_fields(row, dcfg, None)]
    else:
        convs, teachers = _prompt_response(row, dcfg)
    given_pid = None if _missing(row, dcfg.prompt_id_key) else str(row[dcfg.prompt_id_key])
    out = []
    for k, (msgs, teacher) in enumerate(zip(convs, teachers)):
        if dcfg.system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": dcfg.system_prompt}, *msgs]
        rid = row_id if len(convs) == 1 else f"{row_id}#{k}"
        error = teacher if isinstance(teacher, RowReject) else None
        teacher = None if error else teacher
        out.append(Candidate(rid, given_pid or prompt_hash(msgs), msgs, teacher, error))
    return out


def _chat_messages(row: dict, dcfg) -> list[dict]:
    key = dcfg.messages_key
    if _missing(row, key):
        raise RowReject(key, "missing_key", f"{key!r} is missing or null")
    msgs = row[key]
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise RowReject(
                key, "wrong_type", "a string that is not a JSON list of messages"
            ) from None
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise RowReject(key, "wrong_type", "expected a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise RowReject(where, "wrong_type", f"expected an object, got {type(m).__name__}")
        for k in ("role", "content"):
            if _missing(m, k):
                raise RowReject(f"{where}.{k}", "missing_key", f"{k!r} is missing or null")
        role = as_text(m["role"], f"{where}.role")
        if role not in ROLES:
            raise RowReject(
                f"{where}.role", "unknown_role", f"{role!r} is not one of {list(ROLES)}"
            )
        content = as_text(m["content"], f"{where}.content")
        out.append({"role": role, "content": content})
    assistants = [i for i, m in enumerate(out) if m["role"] == "assistant"]
    if not assistants:
        raise RowReject(key, "empty_response", "no assistant message")
    for i in assistants:
        if not out[i]["content"].strip():
            raise RowReject(f"{key}[{i}].content", "empty_response", "empty assistant message")
    return out


def _prompt_response(row: dict, dcfg) -> tuple[list[list[dict]], list[dict | None]]:
    pk, rk = dcfg.prompt_key, dcfg.response_key
    if _missing(row, pk):
        raise RowReject(pk, "missing_key", f"{pk!r} is missing or null")
    if _missing(row, rk):
        raise RowReject(rk, "missing_key", f"{rk!r} is missing or null")
    prompt = as_text(row[pk], pk, allow_empty=False)
    raw = row[rk]
    many = isinstance(raw, (list, tuple))
    responses = list(raw) if many else [raw]
    if not responses:
        raise RowReject(rk, "empty_response", "an empty list of candidate responses")
    convs, teachers = [], []
    for k, r in enumerate(responses):
        where = f"{rk}[{k}]" if many else rk
        try:
            text = as_text(r, where, allow_empty=False)
            teacher = _teacher_fields(row, dcfg, k if many else None)
        except RowReject as e:
            if not many:
                raise
            # One bad candidate does not sink its siblings: it is rejected on its own.
            text, teacher = str(r), e
        convs.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": text}])
        teachers.append(teacher)
    return convs, teachers


def _teacher_fields(row: dict, dcfg, k: int | None) -> dict | None:
    """The given teacher log-probs (and their token strings / offsets) of candidate k."""
    lk = dcfg.teacher_logprobs_key
    if _missing(row, lk):
        return None

    def pick(key):
        if _missing(row, key):
            return None
        v = row[key]
        if k is None:
            return v
        if not isinstance(v, (list, tuple)) or k >= len(v):
            raise RowReject(
                key, "wrong_type", "with several responses, expected one list per response"
            )
        return v[k]

    where = lk if k is None else f"{lk}[{k}]"
    lps = as_logprobs(pick(lk), where)
    tokens, offsets = pick(dcfg.teacher_tokens_key), pick(dcfg.teacher_offsets_key)
    if tokens is not None:
        tk = dcfg.teacher_tokens_key
        if not isinstance(tokens, (list, tuple)):
            raise RowReject(tk, "wrong_type", "expected a list of token strings")
        tokens = [as_text(t, f"{tk}[{i}]") for i, t in enumerate(tokens)]
        if len(tokens) != len(lps):
            raise RowReject(
                where, "logprobs_length", f"{len(lps)} log-probs for {len(tokens)} teacher tokens"
            )
    token_ids = None
    if tokens is None and offsets is None and dcfg.teacher_tokenizer:
        token_ids = pick(dcfg.teacher_token_ids_key)
    if token_ids is not None:
        ik = dcfg.teacher_token_ids_key
        if not isinstance(token_ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in token_ids
        ):
            raise RowReject(ik, "wrong_type", "expected a list of non-negative token ids")
        if len(token_ids) != len(lps):
            raise RowReject(
                where, "logprobs_length", f"{len(lps)} log-probs for {len(token_ids)} token ids"
            )
    elif offsets is not None:
        ok = dcfg.teacher_offsets_key
        try:
            offsets = [(int(s), int(e)) for s, e in offsets]
        except (TypeError, ValueError):
            raise RowReject(ok, "wrong_type", "expected a list of [start, end] pairs") from None
        if any(s < 0 or e < s for s, e in offsets):
            raise RowReject(ok, "wrong_type", "offsets need 0 <= start <= end")
        if len(offsets) != len(lps):
            raise RowReject(
                where, "logprobs_length", f"{len(lps)} log-probs for {len(offsets)} offsets"
            )
    return {
        "logprobs": lps,
        "tokens": tokens,
        "offsets": offsets,
        "token_ids": None if token_ids is None else [int(i) for i in token_ids],
        "field": where,
        "tokens_field": dcfg.teacher_tokens_key,
        "token_ids_field": dcfg.teacher_token_ids_key,
    }


def teacher_ids_to_offsets(cand: Candidate, teacher_tok, teacher_specials: set[int]) -> Candidate:
    """Character spans, in the response, of a candidate's teacher token ids (given in the
    teacher's own tokenizer, as public teacher-log-prob sets ship them).

    The ids are decoded piece by piece (``raydc.data.align.token_pieces``); when the
    decoded text is the response, each token's span is its piece's. Otherwise (a WordPiece
    teacher's decode puts spaces between words) the ids must be the teacher tokenizer's own
    encoding of the response, whose offset mapping then gives the spans. Special tokens
    get the empty span where the next text starts (the end-of-turn token: the end), so
    their log-probs are carried, not dropped. Anything else is a reject: the ids do not
    spell this response."""
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
    teacher = {**t, "offsets": spans, "token_ids": None}
    return replace(cand, teacher=teacher)


# ----------------------------------------------------------------------------- rendering


def special_ids(tok) -> set[int]:
    ids = set(getattr(tok, "all_special_ids", []) or [])
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def render(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and each assistant content's (start, end) in it.

    Contents are located in order (a cursor walks the rendered text message by message),
    so an assistant answer that also appears inside the prompt is found at its own place.
    """
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if not m["content"]:
            continue
        pos = text.find(m["content"], cursor)
        if pos < 0:
            if m["role"] == "assistant":
                raise RowReject(
                    f"messages[{i}].content",
                    "template",
                    "the chat template changed or dropped this assistant message's content",
                )
            continue  # e.g. a template that rewrites the system prompt
        if m["role"] == "assistant":
            spans.append((pos, pos + len(m["content"])))
        cursor = pos + len(m["content"])
    return text, spans


def tokenize(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]


def turn_tokens(
    offsets: Sequence[tuple[int, int]], ids: Sequence[int], spans, specials: set[int]
) -> list[tuple[list[int], int | None]]:
    """Per assistant turn: (indices of tokens overlapping the content, end-of-turn index)."""
    turns = []
    for cs, ce in spans:
        content = [i for i, (s, e) in enumerate(offsets) if s < ce and e > cs and i > 0]
        eot = None
        after = [i for i, (s, _) in enumerate(offsets) if s >= ce]
        if after and ids[after[0]] in specials:
            eot = after[0]
        turns.append((content, eot))
    return turns


def prepare_candidate(tok, cand: Candidate, dcfg, specials: set[int] | None = None) -> Prepared:
    """Render, tokenise, mask, number sentences and align given teacher log-probs."""
    if cand.error is not None:
        raise cand.error
    specials = special_ids(tok) if specials is None else specials
    text, spans = render(tok, cand.messages)
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
    teacher = None
    if cand.teacher is not None:
        teacher = _given_teacher(cand, text, spans, offsets, turns, T)
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
    )


def _given_teacher(cand: Candidate, text, spans, offsets, turns, T) -> list[float]:
    """Given teacher log-probs on student positions: 0.0 off the loss mask, NaN unknown."""
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
        return out
    if len(spans) != 1:
        raise RowReject(
            field, "wrong_type", "teacher tokens/offsets need exactly one assistant turn"
        )
    (cs, ce), (content, eot) = spans[0], turns[0]
    content_text = text[cs:ce]
    if t["tokens"] is not None:
        joined = "".join(t["tokens"])
        if not joined.startswith(content_text):
            at = next(
                (i for i, (a, b) in enumerate(zip(joined, content_text)) if a != b),
                min(len(joined), len(content_text)),
            )
            raise RowReject(
                t["tokens_field"],
                "teacher_tokens_mismatch",
                f"teacher token strings differ from the response at character {at}",
            )
        src = offsets_from_strings(t["tokens"])
    else:
        src = t["offsets"]
    rel = [(offsets[i][0] - cs, offsets[i][1] - cs) for i in content]
    try:
        vals = align_turn(len(content_text), src, lps, rel, eot is not None)
    except AlignmentError as e:
        raise RowReject(field, "teacher_alignment", str(e)) from None
    for i, v in zip([*content, *([eot] if eot is not None else [])], vals):
        out[i] = v
    return out
