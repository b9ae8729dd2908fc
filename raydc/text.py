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


def align_by_char_spans(
    src_offsets: Sequence[tuple[int, int]],
    src_values: Sequence[float],
    dst_offsets: Sequence[tuple[int, int]],
) -> list[float | None]:
    """Carry per-token values (teacher log-probs) from one tokenization to another.

    Each destination token gets the sum of the values of the source tokens whose spans
    *end* inside it (start < src_end <= end). A source token that straddles a destination
    boundary is thus credited wholly to the destination token where it ends: the
    destination token where it starts is then not yet "decided" by the teacher, and every
    source value is counted exactly once, so per-span sums over any range both tokenizers
    split at agree exactly. A destination token that no source token ends in gets 0.0 when
    it is covered by a straddling source token (its log-prob was paid later), and None
    when no source token covers it at all (outside the source text).
    """
    if len(src_offsets) != len(src_values):
        raise ValueError(f"{len(src_offsets)} source offsets but {len(src_values)} source values")
    src = sorted(
        ((s, e, v) for (s, e), v in zip(src_offsets, src_values) if e > s), key=lambda x: x[1]
    )
    ends = [e for _, e, _ in src]
    out: list[float | None] = []
    for s, e in dst_offsets:
        if e <= s:
            out.append(None)
            continue
        lo = bisect.bisect_right(ends, s)
        hi = bisect.bisect_right(ends, e)
        if hi > lo:
            out.append(float(sum(v for _, _, v in src[lo:hi])))
        else:
            # Source tokens do not overlap, so src[lo] (the first ending after s) is the
            # only candidate that could straddle this destination token.
            covered = lo < len(src) and src[lo][0] < e
            out.append(0.0 if covered else None)
    return out
