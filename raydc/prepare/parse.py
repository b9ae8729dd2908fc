"""One trace row in: the conversations it holds as candidates, or a reject naming the field.

A row is normalised to a conversation (``messages``): the chat schema gives it directly,
the prompt/response schema becomes ``[system?, user: prompt, assistant: response]``; a list
of responses gives several candidates of one prompt (one bad candidate is rejected on its
own). Given teacher log-probs (with their token strings, offsets or ids) are checked and
kept on the candidate; ``raydc.prepare.render`` renders and tokenises it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from raydc.method.weights import LOGPROB_POSITIVE_TOL


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
    # The first characters of the (last) assistant turn that the student wrote (a
    # mixed-policy trace); None: all of it is the teacher's.
    prefix_chars: int | None = None


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
    prefix = _student_prefix(row, dcfg.student_prefix_key)
    out = []
    for k, (msgs, teacher) in enumerate(zip(convs, teachers)):
        if dcfg.system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": dcfg.system_prompt}, *msgs]
        rid = row_id if len(convs) == 1 else f"{row_id}#{k}"
        error = teacher if isinstance(teacher, RowReject) else None
        teacher = None if error else teacher
        out.append(Candidate(rid, given_pid or prompt_hash(msgs), msgs, teacher, error, prefix))
    return out


def _student_prefix(row: dict, key: str) -> int | None:
    if _missing(row, key):
        return None
    v = row[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise RowReject(key, "wrong_type", f"expected a character count >= 0, got {v!r}")
    return int(v)


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
