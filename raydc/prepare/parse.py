"""One trace row in: the conversations it holds as candidates, or a reject naming the field.

A row is normalised to a conversation (``messages``): the chat schema gives it directly,
the prompt/response schema becomes ``[system?, user: prompt, assistant: response]``; a list
of responses gives several candidates of one prompt (one bad candidate is rejected on its
own); an assistant message's ``reasoning_content`` is kept for a thinking template. Given teacher log-probs are read in the shape users have them (``read_teacher``:
lists with token strings, offsets or ids; OpenAI API ``logprobs``; vLLM's per-position
maps), checked and kept on the candidate; ``raydc.prepare.render`` renders and tokenises
it. A value that cannot be a log-prob (null, NaN, inf, a sentinel below
``GIVEN_LOGPROB_FLOOR``, a positive one) is *missing*, never a value; a cell of the wrong
type is a reject naming its field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from raydc.infra.artifacts import RowReject
from raydc.method.align import NAN, byte_pieces, char_spans
from raydc.method.weights import LOGPROB_POSITIVE_TOL

# A given log-prob below this is a sentinel, not a value: OpenAI's -9999.0 (a token
# outside the top 20), float16's -65504 or -1e30 for a masked logit. A real one is a
# log-softmax of bounded logits: LLM logits span some tens of nats (Gemma 2 soft-caps them
# at 30), so a token 40 nats below the best is -40, or -400 scored at temperature 0.1;
# -1000 stays an order of magnitude below anything a model returns.
GIVEN_LOGPROB_FLOOR = -1000.0
# Why a given log-prob is missing (NaN: the teacher mask's neutral weight), as counted.
MISSING_KINDS = ("null", "not_finite", "below_floor", "positive")
JOINED = "_joined_teacher"  # a row's teacher read from data.teacher_logprobs_path (join.py)
_TOKEN_ID = re.compile(r"token_id:(\d+)")  # vLLM's return_tokens_as_token_ids spelling


# The roles chat templates render; another role would be dropped or mis-rendered.
ROLES = ("system", "user", "assistant", "tool")
# An assistant message's reasoning, passed to the chat template as thinking templates
# (Qwen3, and the OpenAI-compatible APIs of vLLM and DeepSeek) name it.
REASONING_KEY = "reasoning_content"


@dataclass
class Candidate:
    """One conversation to render: a source row, or one of its candidate responses."""

    row_id: str
    prompt_id: str
    messages: list[dict]
    teacher: dict | None = None  # read_teacher's {"logprobs": [...], "tokens": ..., ...}
    error: RowReject | None = None  # a candidate rejected on its own (one of several)
    # The first characters of the (last) assistant turn that the student wrote (a
    # mixed-policy trace); None: all of it is the teacher's.
    prefix_chars: int | None = None


# ----------------------------------------------------------------------------- values


def table_rows(table: pa.Table) -> list[dict]:
    """An Arrow table's rows as dicts. A string cell that is not UTF-8 (a Parquet writer
    that did not check) comes back as its bytes, so the field that reads it rejects that
    row (``as_text``: ``undecodable``), as it does the same bytes in a binary column,
    instead of the batch failing on ``UnicodeDecodeError``."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        pass
    columns = []
    for col in table.columns:
        try:
            columns.append(col.to_pylist())
        except UnicodeDecodeError:
            raw = pa.chunked_array([c.view(_as_binary(c.type)) for c in col.chunks])
            columns.append([_decode_strings(v, col.type) for v in raw.to_pylist()])
    return [dict(zip(table.column_names, vals)) for vals in zip(*columns)]


def _as_binary(t: pa.DataType) -> pa.DataType:
    """``t`` with its strings as binaries (the same memory layout: a view, not a cast)."""
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_map(t):
        return pa.map_(_as_binary(t.key_type), _as_binary(t.item_type))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        field = pa.field(t.value_field.name, _as_binary(t.value_type))
        if pa.types.is_fixed_size_list(t):
            return pa.list_(field, t.list_size)
        return pa.large_list(field) if pa.types.is_large_list(t) else pa.list_(field)
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _as_binary(f.type)) for f in t])
    return t


def _decode_strings(v, t: pa.DataType):
    """A value read through ``_as_binary(t)``: its strings decoded where they are UTF-8."""
    if v is None:
        return None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return v
    if pa.types.is_map(t):
        return [(_decode_strings(k, t.key_type), _decode_strings(x, t.item_type)) for k, x in v]
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return [_decode_strings(x, t.value_type) for x in v]
    if pa.types.is_struct(t):
        return {f.name: _decode_strings(v[f.name], f.type) for f in t}
    return v


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


def as_logprobs(value, field: str, missing: dict) -> list[float]:
    """A list of log-probs; a missing one (``logprob_value``) is NaN, counted in ``missing``."""
    if not isinstance(value, (list, tuple)):
        raise RowReject(
            field, "wrong_type", f"expected a list of numbers, got {type(value).__name__}"
        )
    return [logprob_value(v, field, f"index {i}", missing) for i, v in enumerate(value)]


def logprob_value(v, field: str, at: str, missing: dict) -> float:
    """One given log-prob: a number <= 0 (values in (0, LOGPROB_POSITIVE_TOL] are 0), or
    NaN, "missing", for what cannot be one: null, NaN, +-inf, a value below
    ``GIVEN_LOGPROB_FLOOR`` (a sentinel) or above the tolerance. ``missing[kind]`` counts
    them; a value that is not a number at all (a string, a bool) is a reject."""
    if v is None:
        kind = "null"
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RowReject(field, "wrong_type", f"{at} is {v!r} ({type(v).__name__}), not a number")
    else:
        v = float(v)
        if not math.isfinite(v):
            kind = "not_finite"
        elif v < GIVEN_LOGPROB_FLOOR:
            kind = "below_floor"
        elif v > LOGPROB_POSITIVE_TOL:
            kind = "positive"
        else:
            return min(v, 0.0)
    missing[kind] = missing.get(kind, 0) + 1
    return NAN


def as_token_ids(value, field: str) -> list[int]:
    """Token ids: a list of integers >= 0 (a float, a string or a bool is a reject)."""
    if not isinstance(value, (list, tuple)):
        raise RowReject(
            field, "wrong_type", f"expected a list of token ids, got {type(value).__name__}"
        )
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise RowReject(field, "wrong_type", f"index {i} is {t!r}: token ids are integers >= 0")
    return [int(t) for t in value]


def _missing(row: dict, key: str) -> bool:
    return key not in row or row[key] is None


def row_id_of(row: dict, key: str) -> str | None:
    """The row's id (``data.id_key``), None when it has none; an id cell that is not
    UTF-8 is a reject naming the key."""
    if _missing(row, key):
        return None
    v = row[key]
    return as_text(v, key) if isinstance(v, (bytes, bytearray)) else str(v)


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
    row_id = row_id_of(row, dcfg.id_key) or default_id
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
        msg = {"role": role, "content": content}
        if role == "assistant" and not _missing(m, REASONING_KEY):
            # the reasoning, for a template that renders it (Qwen3: <think>...</think>)
            msg[REASONING_KEY] = as_text(m[REASONING_KEY], f"{where}.{REASONING_KEY}")
        out.append(msg)
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


# ----------------------------------------------------------------------------- teacher log-probs


def _teacher_fields(row: dict, dcfg, k: int | None) -> dict | None:
    """The given teacher log-probs of candidate k: joined in from
    ``data.teacher_logprobs_path`` (``JOINED``, read there by ``read_teacher``), or read
    from the row's own columns."""
    if JOINED in row:
        t = row[JOINED]
        if k is not None:
            raise RowReject(
                dcfg.response_key,
                "wrong_type",
                "a list of responses, but data.teacher_logprobs_path gives one row of "
                "log-probs per trace",
            )
        if isinstance(t, RowReject):
            raise t
        return t
    return read_teacher(row, dcfg, k)


def read_teacher(row: dict, dcfg, k: int | None = None) -> dict | None:
    """The teacher log-probs a row gives under ``data.teacher_logprobs_key`` (None when it
    gives none), read in the shape ``data.teacher_logprobs_format`` names (``auto``: the
    value's own shape, ``logprobs_format``).

    Returns ``logprobs`` (NaN where missing, ``logprob_value``), ``missing`` (their counts
    by kind) and what places them on the text: ``tokens`` (strings), ``offsets``
    (character spans; with the ``text`` they index when they came from bytes),
    ``token_ids`` (decoded with data.teacher_tokenizer), or none (one per student loss
    token); ``field``, ``tokens_field`` and ``token_ids_field`` name the keys a later
    reject blames. With a list of responses each column holds one value per response
    (``k``). A row whose every log-prob is missing is a reject: it gives none."""
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
    value = pick(lk)
    fmt = dcfg.teacher_logprobs_format
    if fmt == "auto":
        fmt = logprobs_format(value)
    missing = dict.fromkeys(MISSING_KINDS, 0)
    if fmt == "openai":
        got = _openai(value, where, missing)
    elif fmt == "vllm":
        ik, ids = dcfg.teacher_token_ids_key, pick(dcfg.teacher_token_ids_key)
        ids = None if ids is None else as_token_ids(ids, ik)
        got = _vllm(value, where, ids, ik, missing, bool(dcfg.teacher_tokenizer))
    elif fmt == "lists":
        got = _lists(value, where, pick, dcfg, missing)
    else:
        raise RowReject(
            where,
            "wrong_type",
            f"a {type(value).__name__} of no known shape: expected a list of numbers "
            "(lists), OpenAI logprobs {content: [...]} or {tokens, token_logprobs} (openai), "
            "or a list of {token_id: {logprob, ...}} (vllm)",
        )
    t = {
        "logprobs": [],
        "tokens": None,
        "offsets": None,
        "token_ids": None,
        "text": None,
        "field": where,
        "tokens_field": dcfg.teacher_tokens_key,
        "token_ids_field": dcfg.teacher_token_ids_key,
        **got,
        "missing": missing,
    }
    if t["token_ids"] is not None and not dcfg.teacher_tokenizer:
        raise RowReject(
            t["token_ids_field"],
            "no_teacher_tokenizer",
            "teacher token ids without token strings; set data.teacher_tokenizer (the "
            "tokenizer they are in) to decode them",
        )
    lps = t["logprobs"]
    if lps and all(math.isnan(v) for v in lps):
        kinds = ", ".join(f"{n} {kind}" for kind, n in missing.items() if n)
        raise RowReject(
            where,
            "logprobs_all_missing",
            f"none of its {len(lps)} log-probs is a value ({kinds}): null, NaN, inf, below "
            f"{GIVEN_LOGPROB_FLOOR:g} or above 0",
        )
    return t


def logprobs_format(value) -> str | None:
    """The format a teacher-log-prob value is in, by its shape (the formats' shapes do
    not overlap): ``openai`` for a {content} / {tokens, token_logprobs} object or a list
    of {token, logprob} entries, ``vllm`` for a list of per-position {token_id: ...}
    maps (or entry lists), ``lists`` for anything else (its reader names a wrong type);
    None: an object of no known shape."""
    if isinstance(value, dict):
        return "openai" if "content" in value or "token_logprobs" in value else None
    if not isinstance(value, (list, tuple)):
        return "lists"  # the lists reader names the wrong type
    first = next((v for v in value if v is not None), None)
    if isinstance(first, dict) and "token" in first:
        return "openai"
    if isinstance(first, (dict, list, tuple)):
        return "vllm"
    return "lists"


def _lists(value, where: str, pick, dcfg, missing: dict) -> dict:
    """``lists``: log-probs, with token strings, ``[start, end]`` offsets or (with
    data.teacher_tokenizer) token ids in sibling columns, or alone."""
    lps = as_logprobs(value, where, missing)
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
        token_ids = as_token_ids(token_ids, dcfg.teacher_token_ids_key)
        if len(token_ids) != len(lps):
            raise RowReject(
                where, "logprobs_length", f"{len(lps)} log-probs for {len(token_ids)} token ids"
            )
    elif offsets is not None:
        ok = dcfg.teacher_offsets_key
        if not isinstance(offsets, (list, tuple)) or not all(
            isinstance(se, (list, tuple))
            and len(se) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in se)
            for se in offsets
        ):
            raise RowReject(ok, "wrong_type", "expected a list of [start, end] integer pairs")
        offsets = [(int(s), int(e)) for s, e in offsets]
        if any(s < 0 or e < s for s, e in offsets):
            raise RowReject(ok, "wrong_type", "offsets need 0 <= start <= end")
        if len(offsets) != len(lps):
            raise RowReject(
                where, "logprobs_length", f"{len(lps)} log-probs for {len(offsets)} offsets"
            )
    return {"logprobs": lps, "tokens": tokens, "offsets": offsets, "token_ids": token_ids}


def _spelt_ids(tokens: list[str]) -> list[int] | None:
    """Token ids when every token is spelt ``token_id:<n>`` (vLLM's
    ``return_tokens_as_token_ids``), else None."""
    found = [_TOKEN_ID.fullmatch(t) for t in tokens]
    if not found or not all(found):
        return None
    return [int(m.group(1)) for m in found]


def _openai(value, where: str, missing: dict) -> dict:
    """``openai``: chat completions' ``logprobs`` ({content: [{token, logprob, bytes,
    top_logprobs}]}, or the content list itself), whose tokens' ``bytes`` give exact
    character spans even for a token that splits a character; or the completions API's
    {tokens, token_logprobs}. Tokens spelt ``token_id:<n>`` are token ids."""
    if isinstance(value, dict) and "content" in value:
        entries, base = value["content"], f"{where}.content"
    elif isinstance(value, dict) and "token_logprobs" in value:
        return _openai_completions(value, where, missing)
    elif isinstance(value, (list, tuple)):
        entries, base = value, where
    else:
        raise RowReject(
            where,
            "wrong_type",
            f"expected OpenAI logprobs ({{content: [...]}} or {{tokens, token_logprobs}}), "
            f"got {type(value).__name__}",
        )
    if not isinstance(entries, (list, tuple)):
        raise RowReject(
            base, "wrong_type", f"expected a list of {{token, logprob, bytes}}, not {entries!r}"
        )
    tokens, raw, lps = [], [], []
    for i, e in enumerate(entries):
        at = f"{base}[{i}]"
        if not isinstance(e, dict):
            raise RowReject(at, "wrong_type", f"expected {{token, logprob, bytes}}, got {e!r}")
        if _missing(e, "token"):
            raise RowReject(f"{at}.token", "missing_key", "'token' is missing or null")
        tokens.append(as_text(e["token"], f"{at}.token"))
        lps.append(logprob_value(e.get("logprob"), f"{at}.logprob", "it", missing))
        b = e.get("bytes")
        raw.append(tokens[-1].encode("utf-8") if b is None else _as_bytes(b, f"{at}.bytes"))
    ids = _spelt_ids(tokens)
    if ids is not None:
        return {"logprobs": lps, "token_ids": ids, "token_ids_field": base}
    try:
        text, pieces = byte_pieces(raw)
    except UnicodeDecodeError as err:
        i, start = 0, 0
        while i < len(raw) - 1 and start + len(raw[i]) <= err.start:
            start += len(raw[i])
            i += 1
        raise RowReject(
            f"{base}[{i}].bytes",
            "undecodable",
            f"the tokens' bytes are not UTF-8 ({err.reason} at byte {err.start - start} of "
            f"token {i})",
        ) from None
    spans = char_spans(pieces, range(len(pieces)), set())
    return {"logprobs": lps, "offsets": spans, "text": text, "tokens_field": base}


def _as_bytes(value, field: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (list, tuple)) and all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in value
    ):
        return bytes(value)
    raise RowReject(field, "wrong_type", "expected a list of byte values 0..255")


def _openai_completions(value: dict, where: str, missing: dict) -> dict:
    toks, tlps = value.get("tokens"), value.get("token_logprobs")
    if not isinstance(toks, (list, tuple)):
        raise RowReject(f"{where}.tokens", "wrong_type", "expected a list of token strings")
    lps = as_logprobs(tlps, f"{where}.token_logprobs", missing)
    tokens = [as_text(t, f"{where}.tokens[{i}]") for i, t in enumerate(toks)]
    if len(tokens) != len(lps):
        raise RowReject(
            where, "logprobs_length", f"{len(lps)} token_logprobs for {len(tokens)} tokens"
        )
    ids = _spelt_ids(tokens)
    if ids is not None:
        return {"logprobs": lps, "token_ids": ids, "token_ids_field": f"{where}.tokens"}
    return {"logprobs": lps, "tokens": tokens, "tokens_field": f"{where}.tokens"}


def _vllm(value, where, given_ids, ids_field, missing: dict, has_tokenizer: bool) -> dict:
    """``vllm``: per position None or {token_id: {logprob, rank, decoded_token}} (keys
    also spelt ``"<n>"`` or ``"token_id:<n>"``; an Arrow map's (key, value) pairs; Ray
    Data LLM's flattened [{token_id, logprob, rank, decoded_token}]). The position's
    token is the given id (``data.teacher_token_ids_key``) or else its first entry: vLLM
    puts the sampled (or prompt) token first, the top-k after it. A None position (the
    first of prompt log-probs) is a missing log-prob of the given id."""
    if not isinstance(value, (list, tuple)):
        raise RowReject(
            where,
            "wrong_type",
            "expected vLLM logprobs: a list of null or {token_id: {logprob, rank, "
            f"decoded_token}}, got {type(value).__name__}",
        )
    if given_ids is not None and len(given_ids) != len(value):
        raise RowReject(
            where, "logprobs_length", f"{len(value)} positions for {len(given_ids)} {ids_field}"
        )
    ids, lps, decoded = [], [], []
    for i, pos in enumerate(value):
        at = f"{where}[{i}]"
        entries = _vllm_entries(pos, at)
        want = None if given_ids is None else given_ids[i]
        if not entries:
            if want is None:
                raise RowReject(
                    at, "missing_key", f"a null position, and no {ids_field} to tell its token"
                )
            ids.append(want)
            decoded.append(None)
            lps.append(logprob_value(None, at, "it", missing))
            continue
        found = entries[:1] if want is None else [e for e in entries if e[0] == want]
        if not found:
            raise RowReject(
                at,
                "teacher_tokens_mismatch",
                f"the token id {want} ({ids_field}[{i}]) is not among its entries "
                f"{[e[0] for e in entries][:5]}",
            )
        tid, info = found[0]
        if not isinstance(info, dict):
            raise RowReject(
                at, "wrong_type", f"token {tid}: expected {{logprob, rank, decoded_token}}"
            )
        lps.append(logprob_value(info.get("logprob"), f"{at}.logprob", "it", missing))
        ids.append(tid)
        decoded.append(info.get("decoded_token"))
    if not has_tokenizer and ids and all(isinstance(d, str) for d in decoded):
        tokens = [as_text(d, f"{where}[{i}].decoded_token") for i, d in enumerate(decoded)]
        return {"logprobs": lps, "tokens": tokens, "tokens_field": where}
    return {"logprobs": lps, "token_ids": ids, "token_ids_field": where}


def _vllm_entries(pos, at: str) -> list[tuple[int, object]]:
    """One position's (token id, info) entries, in their order; [] for None."""
    if pos is None:
        return []
    if isinstance(pos, dict):
        if "token_id" in pos and "logprob" in pos:  # one flattened entry
            return [(_token_id_key(pos["token_id"], at), pos)]
        return [(_token_id_key(k, at), v) for k, v in pos.items()]
    if isinstance(pos, (list, tuple)):
        out = []
        for e in pos:
            if isinstance(e, dict) and "token_id" in e:
                out.append((_token_id_key(e["token_id"], at), e))
            elif isinstance(e, (list, tuple)) and len(e) == 2:
                out.append((_token_id_key(e[0], at), e[1]))
            else:
                raise RowReject(at, "wrong_type", f"an entry {e!r} is not (token_id, info)")
        return out
    raise RowReject(
        at,
        "wrong_type",
        f"expected null or {{token_id: {{logprob, ...}}}}, got {type(pos).__name__}",
    )


def _token_id_key(k, at: str) -> int:
    if isinstance(k, int) and not isinstance(k, bool) and k >= 0:
        return k
    if isinstance(k, str):
        m = _TOKEN_ID.fullmatch(k)
        if k.isdigit() or m:
            return int(k if k.isdigit() else m.group(1))
    raise RowReject(at, "wrong_type", f"the key {k!r} is not a token id")
