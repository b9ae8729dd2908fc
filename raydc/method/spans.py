"""Text utilities: sentence segmentation and character-span alignment across tokenizers.

Sentence ids drive the ``sentence`` granularity of the weights and DASD's divergence-aware
selection (arXiv 2601.09088 scores sentences, not tokens). Character spans are how two
tokenizers are aligned: never position by position.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence

# A sentence ends after ., ! or ? followed by whitespace, or at a newline. Decimal points
# ("3.5") and abbreviations without a following space do not split.
_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\n+")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of ``text`` (whitespace between
    sentences belongs to the preceding one, so the spans tile the text)."""
    spans, start = [], 0
    for match in _BOUNDARY.finditer(text):
        end = match.end()
        if end > start and text[start : match.start()].strip():
            spans.append((start, end))
            start = end
    if start < len(text):
        if spans and not text[start:].strip():
            spans[-1] = (spans[-1][0], len(text))
        else:
            spans.append((start, len(text)))
    return spans


def token_sentence_ids(
    text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]] | None = None
) -> list[int]:
    """Sentence id of each token, from its character offsets (start, end) into ``text``.

    A token belongs to the sentence containing its first non-space character (a token
    that starts with the space after a full stop belongs to the next sentence). Tokens
    with an empty span (special tokens) get the id of the sentence at their start.
    """
    spans = sentence_spans(text) if spans is None else list(spans)
    if not spans:
        return [0] * len(offsets)
    starts = [s for s, _ in spans]
    ids = []
    for start, end in offsets:
        pos = start
        while pos < end and pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= end:
            pos = start
        ids.append(max(0, min(len(spans) - 1, bisect.bisect_right(starts, pos) - 1)))
    return ids


def credit_by_char_spans(
    src_offsets: Sequence[tuple[int, int]],
    src_values: Sequence[float],
    dst_offsets: Sequence[tuple[int, int]],
) -> tuple[list[float | None], float, int, int]:
    """Carry per-token values (teacher log-probs) from one tokenization to another,
    losing none of their mass.

    Each source value is credited to one destination token: the one its span *ends*
    inside (start < src_end <= end). A source token that ends where no destination token
    does (in a gap between them: whitespace a WordPiece tokenizer drops) or that has an
    empty span (a special or byte-split token) is carried to the *next* destination token,
    the one that produces the text after it. A source token that straddles a destination
    boundary is credited wholly where it ends, so the destination token where it starts is
    not yet "decided" and gets 0.0. A destination token that no value reaches and no
    source token covers gets None (unknown); empty destination tokens get None.

    Returns (values per destination token, the sum and count of source values that end
    after the last destination token (for the caller to place or refuse), the count of
    source values carried past a gap or from an empty span). Sums are conserved:
    sum(credited) + leftover == sum(src_values).
    """
    if len(src_offsets) != len(src_values):
        raise ValueError(f"{len(src_offsets)} source offsets but {len(src_values)} source values")
    real = [k for k, (s, e) in enumerate(dst_offsets) if e > s]
    ends = [dst_offsets[k][1] for k in real]
    acc: dict[int, float] = {}
    leftover, n_left, carried = 0.0, 0, 0
    for (s, e), v in zip(src_offsets, src_values):
        s, e = int(s), int(e)
        # a token with text ends at e; an empty one sits before the character at e
        j = bisect.bisect_left(ends, e) if e > s else bisect.bisect_right(ends, e)
        if j >= len(real):
            leftover += float(v)
            n_left += 1
            continue
        k = real[j]
        acc[k] = acc.get(k, 0.0) + float(v)
        if not (e > s and dst_offsets[k][0] < e):
            carried += 1
    covered = sorted((int(s), int(e)) for s, e in src_offsets if e > s)
    starts = [s for s, _ in covered]
    reach, far = [], -1
    for _, e in covered:  # reach[i]: the furthest end among the first i+1 source spans
        far = max(far, e)
        reach.append(far)
    out: list[float | None] = []
    for k, (s, e) in enumerate(dst_offsets):
        if k in acc:
            out.append(acc[k])
        elif e <= s:
            out.append(None)
        else:
            i = bisect.bisect_left(starts, e) - 1  # source spans starting before e
            out.append(0.0 if i >= 0 and reach[i] > s else None)
    return out, leftover, n_left, carried


def align_by_char_spans(
    src_offsets: Sequence[tuple[int, int]],
    src_values: Sequence[float],
    dst_offsets: Sequence[tuple[int, int]],
) -> list[float | None]:
    """``credit_by_char_spans``'s values per destination token (source values ending
    after the last destination token are not placed)."""
    return credit_by_char_spans(src_offsets, src_values, dst_offsets)[0]
