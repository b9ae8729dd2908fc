"""Carry teacher log-probs from the teacher's tokens onto the student's, per assistant turn.

Two tokenizers split a response at different places, so log-probs are never paired
position by position across them (METHOD.md, "Different tokenizers"). Both sides are
expressed as character spans relative to the assistant content, and
``raydc.method.spans.align_by_char_spans`` gives each student token the sum of the teacher
log-probs of the teacher tokens that *end* inside it. The rules this module adds:

- Student tokens that share characters (byte-level BPE splits one multi-byte character
  into several tokens with the same span) are made disjoint first: a token's span ends
  where the next one starts, so the character is credited once, to the token that
  completes it; the tokens before it get 0.0 (their probability is paid by the last).
- A student content token that the teacher's tokens straddle (no teacher token ends
  inside it) gets 0.0: its log-prob is paid by the student token where that teacher token
  ends. A student token that no teacher token covers at all gets NaN ("unknown"); the
  scoring stage replaces unknown teacher log-probs by the student's own (a neutral
  ratio of 1), marks them in ``teacher_mask`` and counts them.
- No teacher mass is lost: a teacher token with an empty span, or one that ends in a gap
  between student tokens (whitespace a WordPiece student drops), is carried to the next
  student token. Teacher content that ends after the last student content token goes to
  the student's end-of-turn token; without one the row cannot be aligned
  (``AlignmentError``, a reject).
- Teacher tokens at or after the end of the content (the teacher's own end-of-turn
  token, or text after the response) are summed into the student's end-of-turn token;
  without any, that token's teacher log-prob is NaN (unknown). Without a student
  end-of-turn token they are not placed: they are not part of the response's text.
"""

from __future__ import annotations

from collections.abc import Sequence

from raydc.method.spans import credit_by_char_spans

NAN = float("nan")


def disjoint_spans(offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Trim each span so it ends where the next one starts (spans given in text order).

    ``[(84, 86), (85, 86)]`` -> ``[(84, 85), (85, 86)]``; four tokens of one emoji, all
    ``(89, 90)`` -> three empty ``(89, 89)`` and a last ``(89, 90)``.
    """
    out = [(int(s), int(e)) for s, e in offsets]
    for i in range(len(out) - 1):
        s, e = out[i]
        nxt = out[i + 1][0]
        if nxt < e:
            out[i] = (s, max(s, nxt))
    return out


class AlignmentError(ValueError):
    """Teacher log-probs that cannot be placed on the student's tokens without loss."""


def align_turn(
    content_len: int,
    src_offsets: Sequence[tuple[int, int]],
    src_values: Sequence[float],
    dst_offsets: Sequence[tuple[int, int]],
    dst_has_eot: bool,
    counts: dict | None = None,
) -> list[float]:
    """Teacher values for the student tokens of one assistant turn.

    content_len: length of the assistant content in characters. src_offsets/src_values:
    teacher token spans (relative to the content start; spans at or beyond ``content_len``
    are end-of-turn) and their log-probs. dst_offsets: spans of the student's content
    tokens, relative to the content start, in order. Returns one value per student
    content token, plus one for the student's end-of-turn token when ``dst_has_eot``.
    NaN marks "unknown" (no teacher token covers it). The placed values sum to the
    teacher's content values (plus its end-of-turn values when the student has one).
    ``counts``, when given, gains ``carried``: teacher values moved past a gap or from an
    empty span.
    """
    if len(src_offsets) != len(src_values):
        raise ValueError(f"{len(src_offsets)} teacher spans but {len(src_values)} values")
    inside_off, inside_val, after = [], [], []
    for (s, e), v in zip(src_offsets, src_values):
        s, e = int(s), int(e)
        if s >= content_len:
            after.append(float(v))
        elif e > 0 or s == e == 0:
            inside_off.append((max(s, 0), min(e, content_len)))
            inside_val.append(float(v))
    dst = disjoint_spans([(max(0, s), min(e, content_len)) for s, e in dst_offsets])
    vals, rest, n_rest, carried = credit_by_char_spans(inside_off, inside_val, dst)
    if n_rest and not dst_has_eot:
        raise AlignmentError(
            f"{n_rest} teacher token(s) end after the student's last content token and the "
            "student has no end-of-turn token to carry them"
        )
    if counts is not None:
        counts["carried"] = counts.get("carried", 0) + carried + n_rest
    covered_lo = min((s for s, _ in inside_off), default=None)
    covered_hi = max((e for _, e in inside_off), default=None)
    out: list[float] = []
    for (s, e), v in zip(dst, vals):
        if v is not None:
            out.append(v)
        elif e <= s and covered_lo is not None and covered_lo <= s <= covered_hi:
            out.append(0.0)  # emptied by disjoint_spans: its character is paid later
        else:
            out.append(NAN)
    if dst_has_eot:
        out.append(float(sum(after) + rest) if after or n_rest else NAN)
    return out


def offsets_from_strings(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of consecutive token strings (their concatenation is the text)."""
    spans, pos = [], 0
    for t in tokens:
        spans.append((pos, pos + len(t)))
        pos += len(t)
    return spans


# ----------------------------------------------------------------------------- token ids to text


def token_pieces(tokenizer, token_ids: Sequence[int], special: set[int]) -> tuple[str, list[str]]:
    """The decoded text (special tokens skipped) and each token's piece of it.

    ``"".join(pieces) == text``: a special token's piece is ``""``, and a byte-level token
    that ends inside a multi-byte character gets ``""`` while the token completing the
    character gets all of it. Decodes a sliding window per token (linear time) and checks
    the result against the full decode, falling back to exact prefix decodes.
    """
    ids = [int(t) for t in token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    pieces = _pieces(tokenizer, ids, special, window=8)
    if "".join(pieces) != text:
        pieces = _pieces(tokenizer, ids, special, window=None)
    if "".join(pieces) != text:
        raise AlignmentError("token pieces do not concatenate to the decoded text")
    return text, pieces


def _pieces(tokenizer, ids: list[int], special: set[int], window: int | None) -> list[str]:
    kept = [t for t in ids if t not in special]
    pieces, k = [], 0  # k: index of the current token within `kept`
    for t in ids:
        if t in special:
            pieces.append("")
            continue
        lo = 0 if window is None else max(0, k - window)
        before = _stable(tokenizer.decode(kept[lo:k], skip_special_tokens=True)) if k > lo else ""
        after = _stable(tokenizer.decode(kept[lo : k + 1], skip_special_tokens=True))
        pieces.append(after[len(before) :] if after.startswith(before) else "\x00")
        k += 1
    # The last token may end mid-character: its bytes show up only in the full decode.
    text = tokenizer.decode(kept, skip_special_tokens=True)
    joined = "".join(pieces)
    if pieces and text.startswith(joined) and len(text) > len(joined):
        last = max(i for i, t in enumerate(ids) if t not in special)
        pieces[last] += text[len(joined) :]
    return pieces


def _stable(s: str) -> str:
    """Text without a trailing incomplete character (decoded as U+FFFD)."""
    return s.rstrip("\ufffd")


def char_spans(pieces: Sequence[str], token_ids: Sequence[int], special: set[int]):
    """Character spans that keep every token's log-prob: like a fast tokenizer's offset
    mapping, a byte token that ends inside a character (empty piece) gets the span of
    the character it starts, ``(p, p + 1)`` where the next non-empty piece begins, so it
    overlaps the token that completes the character. An aligner that sums the values of
    the tokens *ending* inside a span then counts both. Special tokens keep their empty
    span (the stop token's is ``(len, len)``: after the text)."""
    spans = offsets_from_strings(pieces)
    out = list(spans)
    nxt = None  # start of the next non-empty piece, scanning backwards
    for i in range(len(pieces) - 1, -1, -1):
        if pieces[i]:
            nxt = spans[i][0]
        elif int(token_ids[i]) not in special and nxt is not None:
            out[i] = (nxt, nxt + 1)
    return out


def byte_pieces(token_bytes: Sequence[bytes]) -> tuple[str, list[str]]:
    """The text that tokens' UTF-8 bytes spell, and each token's piece of it: the
    characters whose last byte is among the token's bytes (an API's ``bytes`` per token).

    ``"".join(pieces) == text``; a token that ends inside a multi-byte character gets
    ``""`` and the token completing the character gets all of it, as ``token_pieces``
    does, so ``char_spans`` gives both the character's span. Raises UnicodeDecodeError
    when the bytes together are not UTF-8.
    """
    text = b"".join(token_bytes).decode("utf-8")
    ends, pos = [], 0  # the byte offset where each character ends
    for ch in text:
        pos += len(ch.encode("utf-8"))
        ends.append(pos)
    pieces, c, b = [], 0, 0
    for tb in token_bytes:
        b += len(tb)
        start = c
        while c < len(ends) and ends[c] <= b:
            c += 1
        pieces.append(text[start:c])
    return text, pieces
