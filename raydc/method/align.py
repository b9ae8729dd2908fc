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

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

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


# ----------------------------------------------------------------------------- text that differs

# Anchor lengths tried in turn (characters). A k-gram found exactly once in each text is an
# anchor; the longest k places the bulk of a long trace in one pass, the shorter ones
# re-anchor what is left between the blocks found.
ANCHOR_LENGTHS = (32, 8)
_ROUNDS = 2  # anchoring passes per length: a gap is re-anchored once on its own uniqueness


def match_blocks(teacher: str, response: str, min_match: int = 8) -> list[tuple[int, int, int]]:
    """The character blocks a teacher's text and a response have in common, in order:
    ``(teacher start, response start, length)``, ``teacher[t:t+n] == response[r:r+n]``,
    strictly increasing and non-overlapping on both sides, adjacent blocks of one diagonal
    merged.

    A diff anchored on long runs (patience diff on character k-grams): the common prefix
    and suffix are matched first (or the whole of one text found inside the other); then
    every k-gram that occurs exactly once in each text is an anchor (those starting at
    whitespace or punctuation: picked by their content, so every occurrence of a picked
    k-gram is picked and the counts stay exact; all of them in a text with too few such
    characters, CJK without spaces), consecutive anchors of one diagonal form a run, the heaviest chain of
    runs increasing on both sides is kept (a Fenwick tree, O(r log r)), and each run is
    extended to a maximal match within its neighbours (galloping slice comparisons). The
    gaps left between blocks are anchored again on their own uniqueness, then with shorter
    k-grams, down to ``min_match``: a match shorter than that is found only at the texts'
    two ends, so an unrelated text matches little instead of the scattered letters and
    words a longest common subsequence would pair. Each pass is linear in the text it
    reads (slices hashed by a Counter) and the passes are bounded (``ANCHOR_LENGTHS`` x
    ``_ROUNDS``), so the whole is O(n log n), unlike difflib's quadratic worst case on
    long texts.

    Measured on one core of a loaded 2-core machine (CPython 3.11, best of 3): a
    300,000-character synthetic trace (about 65K tokens) with channel markup and
    ``<think>`` tags at its ends and 60 short edits inside: 0.09 s (coverage 0.9997);
    the same with the tags inside the response instead (DASD's shape): 0.06 s; against
    an unrelated 300,000-character text: 0.19 s (coverage 0.026); a CJK text without
    spaces (every k-gram indexed): 0.10 s. Scaling with markup every 5,000 characters:
    30K 0.011 s, 100K 0.026 s, 300K 0.22 s, 1M 0.58 s. difflib's SequenceMatcher
    (autojunk off) takes 8.4 s on the first 20,000 characters of the first case, where
    this takes 0.004 s.
    """
    na, nb = len(teacher), len(response)
    if nb and (at := teacher.find(response)) >= 0:  # markup only around it: one block
        return [(at, 0, nb)]
    if na and (at := response.find(teacher)) >= 0:
        return [(0, at, na)]
    head = _forward(teacher, 0, response, 0, min(na, nb))
    tail = _backward(teacher, na, response, nb, min(na, nb) - head)
    blocks = [(0, 0, head)] if head else []
    ks = tuple(k for k in ANCHOR_LENGTHS if k > min_match) + (max(1, min_match),)
    _diff(teacher, response, head, na - tail, head, nb - tail, ks, 0, 0, blocks)
    if tail:
        blocks.append((na - tail, nb - tail, tail))
    blocks.sort()
    merged: list[tuple[int, int, int]] = []
    for t, r, n in blocks:
        if merged and merged[-1][0] + merged[-1][2] == t and merged[-1][1] + merged[-1][2] == r:
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + n)
        else:
            merged.append((t, r, n))
    return merged


def _forward(a: str, i: int, b: str, j: int, limit: int) -> int:
    """How many characters ``a[i:]`` and ``b[j:]`` share at their start (at most limit)."""
    n, step = 0, 16
    while n < limit:
        s = min(step, limit - n)
        if a[i + n : i + n + s] == b[j + n : j + n + s]:
            n += s
            step = s * 2
        elif s == 1:
            break
        else:
            step = s // 2
    return n


def _backward(a: str, i: int, b: str, j: int, limit: int) -> int:
    """How many characters ``a[:i]`` and ``b[:j]`` share at their end (at most limit)."""
    n, step = 0, 16
    while n < limit:
        s = min(step, limit - n)
        if a[i - n - s : i - n] == b[j - n - s : j - n]:
            n += s
            step = s * 2
        elif s == 1:
            break
        else:
            step = s // 2
    return n


def _diff(a, b, a0, a1, b0, b1, ks, ki, rounds, out) -> None:
    """Append to ``out`` the blocks of ``a[a0:a1]`` and ``b[b0:b1]`` (whose first and last
    characters need not differ), anchoring with ``ks[ki]``-grams."""
    chain = []
    while ki < len(ks):
        k = ks[ki]
        if a1 - a0 >= k and b1 - b0 >= k:
            chain = _anchor_chain(a, b, a0, a1, b0, b1, k)
            if chain:
                break
        ki, rounds = ki + 1, 0
    if not chain:
        return
    found = []
    pa, pb = a0, b0  # where the previous block ends
    for i, j, run in chain:
        skip = max(pa - i, pb - j, 0)  # a run the previous block's extension overlapped
        if skip >= run:
            continue
        i, j = i + skip, j + skip
        back = _backward(a, i, b, j, min(i - pa, j - pb))
        fwd = _forward(a, i, b, j, min(a1 - i, b1 - j))
        found.append((i - back, j - back, back + fwd))
        pa, pb = i + fwd, j + fwd
    out.extend(found)
    ki, rounds = (ki, rounds + 1) if rounds + 1 < _ROUNDS else (ki + 1, 0)
    if ki >= len(ks):
        return
    ga, gb = a0, b0
    for i, j, n in [*found, (a1, b1, 0)]:
        if i > ga and j > gb:
            _diff(a, b, ga, i, gb, j, ks, ki, rounds, out)
        ga, gb = i + n, j + n


def _anchor_chain(a, b, a0, a1, b0, b1, k) -> list[tuple[int, int, int]]:
    """Runs of k-grams unique in both ranges, ``(a pos, b pos, characters known to
    match)``, the heaviest chain increasing in both."""
    from collections import Counter

    starts_a, starts_b = _gram_starts(a, a0, a1, k), _gram_starts(b, b0, b1, k)
    if isinstance(starts_a, range) != isinstance(starts_b, range):
        # Sampling must pick a k-gram by its content alone, so that every occurrence of
        # a picked k-gram is picked: both sides sample alike, or neither does.
        starts_a, starts_b = range(a0, a1 - k + 1), range(b0, b1 - k + 1)
    grams_a = [a[i : i + k] for i in starts_a]
    grams_b = [b[j : j + k] for j in starts_b]
    count_a, count_b = Counter(grams_a), Counter(grams_b)
    where_b = {g: j for j, g in zip(starts_b, grams_b) if count_b[g] == 1 and count_a[g] == 1}
    runs: list[list[int]] = []  # [a pos, b pos, characters], a pos increasing
    for i, g in zip(starts_a, grams_a):
        j = where_b.get(g)
        if j is None:
            continue
        if runs and i - runs[-1][0] == j - runs[-1][1] and i <= runs[-1][0] + runs[-1][2]:
            runs[-1][2] = i + k - runs[-1][0]  # overlaps the run on its diagonal: one match
        else:
            runs.append([i, j, k])
    if not runs:
        return []
    # Heaviest increasing chain in b position (a position already increases): a Fenwick
    # tree of (best weight, run index) over the runs' b ranks.
    rank = {j: q + 1 for q, j in enumerate(sorted(run[1] for run in runs))}
    size = len(runs)
    tree: list[tuple[int, int]] = [(0, -1)] * (size + 1)
    prev = [-1] * size
    best = (0, -1)
    for idx, (_, j, c) in enumerate(runs):
        q, top = rank[j] - 1, (0, -1)
        while q > 0:
            top = max(top, tree[q])
            q -= q & -q
        here = (top[0] + c, idx)
        prev[idx] = top[1]
        best = max(best, here)
        q = rank[j]
        while q <= size:
            if tree[q] < here:
                tree[q] = here
            q += q & -q
    chain, idx = [], best[1]
    while idx >= 0:
        chain.append(tuple(runs[idx]))
        idx = prev[idx]
    return chain[::-1]


# k-grams sampled by content: those that start with whitespace or punctuation (a fifth
# of the positions of prose); a text with too few (CJK without spaces) uses them all.
_SAMPLE = re.compile(r"[\s.,;:!?，。、]")


def _gram_starts(text: str, lo: int, hi: int, k: int) -> list[int] | range:
    everything = range(lo, hi - k + 1)
    if len(everything) < 64:
        return everything
    found = [m.start() for m in _SAMPLE.finditer(text, lo, hi - k + 1)]
    return found if len(found) * 32 >= len(everything) else everything


@dataclass(frozen=True)
class PartialAlignment:
    """``align_matched_turn``'s result: a value per student token, how much of the response
    the teacher's text covers, and the teacher mass it could not place."""

    values: list[float]
    coverage: float  # share of the response's characters inside matched blocks
    outside_logprob: float  # sum of the teacher log-probs not placed (missing ones apart)
    outside_tokens: int  # how many teacher tokens that is (missing ones included)


def align_matched_turn(
    content_len: int,
    teacher_len: int,
    blocks: Sequence[tuple[int, int, int]],
    src_offsets: Sequence[tuple[int, int]],
    src_values: Sequence[float],
    dst_offsets: Sequence[tuple[int, int]],
    dst_has_eot: bool,
) -> PartialAlignment:
    """``align_turn`` for a teacher whose text differs from the response (chat or channel
    markup, ``<think>`` tags, whitespace): values only inside the text both share.

    blocks: ``match_blocks(teacher text, content)``. src_offsets: teacher token spans in
    the *teacher's* text (``teacher_len`` characters; spans at or after its end are its
    end-of-turn); dst_offsets: the student's content tokens in the content, as for
    ``align_turn``. Within each block, the stretch between its first and last *common
    cut* (a position no teacher token straddles that ends a student token, the content's
    start counting as one) is aligned by ``align_turn``'s rules: each teacher token lies
    wholly inside or outside such a stretch, so the values placed in it sum to the teacher
    values in it, and each student token in it gets exactly the value an exact match
    would give it. Every other student token is unknown (NaN), and every other teacher
    token is left out, counted in ``outside_logprob`` / ``outside_tokens``: a teacher
    token that straddles a block's edge spells text the response does not have, so its
    log-prob belongs to no student token. When the last block ends both the response and
    a stretch, the teacher tokens after it (its end-of-turn, or text it went on with) go
    to the student's end-of-turn token, as ``align_turn`` places those after an exact
    match; otherwise that token is unknown. Linear in the texts and tokens.
    """
    if len(src_offsets) != len(src_values):
        raise ValueError(f"{len(src_offsets)} teacher spans but {len(src_values)} values")
    n, m = int(content_len), int(teacher_len)
    dst = disjoint_spans([(max(0, s), min(e, n)) for s, e in dst_offsets])
    src = [(max(0, int(s)), max(0, int(e))) for s, e in src_offsets]
    vals = [float(v) for v in src_values]
    covered = sum(k for _, _, k in blocks)
    ends_at_n = bool(blocks) and blocks[-1][1] + blocks[-1][2] == n
    eot_possible = dst_has_eot and ends_at_n
    # Cuts on the student side: the content's start, each token's end, and the content's
    # end when the teacher's end-of-turn can follow it (a gap belongs to the token after).
    student_cut = bytearray(n + 1)
    student_cut[0] = 1
    for _, e in dst:
        student_cut[e] = 1
    if eot_possible:
        student_cut[n] = 1
    inside = _straddled(src, m)  # positions strictly inside a teacher token
    stretches = []  # (response start, response end, teacher minus response offset)
    for t0, r0, k in blocks:
        d = t0 - r0
        lo = next((x for x in range(r0, r0 + k + 1) if student_cut[x] and not inside[x + d]), None)
        if lo is None:
            continue
        hi = next(x for x in range(r0 + k, lo - 1, -1) if student_cut[x] and not inside[x + d])
        if hi > lo:
            stretches.append((lo, hi, d))
    eot_ok = eot_possible and bool(stretches) and stretches[-1][1] == n
    t_end = stretches[-1][1] + stretches[-1][2] if eot_ok else None
    # Teacher tokens to stretches (both in text order): inside one, after, or left out.
    t_starts = [lo + d for lo, _, d in stretches]
    per_src: list[list[int]] = [[] for _ in stretches]
    after: list[int] = []
    out_sum, out_n = 0.0, 0
    for q, (s, e) in enumerate(src):
        if t_end is not None and s >= t_end:
            after.append(q)
            continue
        z = bisect.bisect_right(t_starts, s) - 1
        if z >= 0:
            lo, hi, d = stretches[z]
            if e <= hi + d and s < hi + d:
                per_src[z].append(q)
                continue
        out_n += 1
        out_sum += 0.0 if math.isnan(vals[q]) else vals[q]
    # Student tokens to stretches: a token belongs when it lies between two cuts of one.
    per_dst: list[list[int]] = [[] for _ in stretches]
    z, prev_end = 0, 0
    for p, (_, e) in enumerate(dst):
        start, prev_end = prev_end, max(prev_end, e)  # with its gap before it
        while z < len(stretches) and stretches[z][1] <= start:
            z += 1
        if z < len(stretches) and stretches[z][0] <= start and e <= stretches[z][1]:
            per_dst[z].append(p)
    out = [NAN] * (len(dst) + int(dst_has_eot))
    eot_vals = [vals[q] for q in after]
    for z, (_, _, d) in enumerate(stretches):
        sv = [(src[q][0] - d, src[q][1] - d) for q in per_src[z]]
        got, rest, n_rest, _ = credit_by_char_spans(
            sv, [vals[q] for q in per_src[z]], [dst[p] for p in per_dst[z]]
        )
        if n_rest and eot_ok and z == len(stretches) - 1:
            eot_vals.append(rest)
        elif n_rest:  # past the stretch's last student token, with no end-of-turn after
            last = max((dst[p][1] for p in per_dst[z] if dst[p][1] > dst[p][0]), default=-1)
            for q, (s, e) in zip(per_src[z], sv):
                if e > last or (e == s and s >= last):
                    out_n += 1
                    out_sum += 0.0 if math.isnan(vals[q]) else vals[q]
        lo_c = min((s for s, _ in sv), default=None)
        hi_c = max((e for _, e in sv), default=None)
        for p, v in zip(per_dst[z], got):
            s, e = dst[p]
            if v is not None:
                out[p] = v
            elif e <= s and lo_c is not None and lo_c <= s <= hi_c:
                out[p] = 0.0  # emptied by disjoint_spans: its character is paid later
    if dst_has_eot and eot_vals:
        out[-1] = float(sum(eot_vals))
    return PartialAlignment(out, covered / n if n else 1.0, out_sum, out_n)


def _straddled(spans: Sequence[tuple[int, int]], length: int) -> bytearray:
    """1 at each position in [0, length] strictly inside one of ``spans``."""
    depth = [0] * (length + 2)
    for s, e in spans:
        s, e = min(s, length), min(e, length)
        if e - s >= 2:
            depth[s + 1] += 1
            depth[e] -= 1
    out, level = bytearray(length + 1), 0
    for x in range(length + 1):
        level += depth[x]
        if level:
            out[x] = 1
    return out
