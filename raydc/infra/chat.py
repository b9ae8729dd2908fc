"""A chat template's rendering of a conversation, in the terms every stage aligns by: the
rendered text, each assistant content's character span, the tokens with their offsets, and
each assistant turn's content tokens and end-of-turn token. The student's rendering
(prepare) and the teacher's own (score, for a teacher with another tokenizer) both use it.

Thinking templates (Qwen3-style): an assistant message's ``reasoning_content`` goes to the
template, which renders it (or drops it, as Qwen3 does for turns before the last user
message) in a ``<think>...</think>`` block before the answer; a template may also split a
``<think>`` block out of the content and re-render it. A turn's span is what the assistant
wrote as the template renders it: from its ``<think>`` tag through the answer. An empty
block (``<think>\n\n</think>\n\n``, which Qwen3 inserts in a turn without reasoning) is
left out of the span unless ``train_empty_think``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from raydc.infra.artifacts import RowReject


def special_ids(tok) -> set[int]:
    ids = set(getattr(tok, "all_special_ids", []) or [])
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
_THINK_TAIL = re.compile(r"\s*</think>\s*")


def render(
    tok, messages: list[dict], train_empty_think: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and each assistant turn's (start, end) in it.

    Messages are located in order (a cursor walks the rendered text message by message),
    so an assistant answer that also appears inside the prompt is found at its own place.
    An assistant turn's span runs from its ``<think>`` tag (when the template renders its
    reasoning) to the end of its answer; see the module for empty think blocks.
    """
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if not m["content"]:
            continue
        if m["role"] == "assistant":
            start, end = _assistant_span(text, cursor, m, i)
            spans.append(_empty_think(text, cursor, start, end, train_empty_think))
            cursor = end
            continue
        pos = text.find(m["content"], cursor)
        if pos >= 0:  # else e.g. a template that rewrites the system prompt
            cursor = pos + len(m["content"])
    return text, spans


def _assistant_span(text: str, lo: int, m: dict, i: int) -> tuple[int, int]:
    """Where the template put assistant message ``i`` (at or after ``lo``): its reasoning
    block and answer when the reasoning is rendered, else its content."""
    content = m["content"]
    reasoning = (m.get("reasoning_content") or "").strip()
    if not reasoning and THINK_CLOSE in content:
        # A think block inside the content: kept verbatim, or split out and re-rendered
        # by the template (Qwen3 takes the text before the first </think>, after <think>).
        pos = text.find(content, lo)
        if pos >= 0:
            return pos, pos + len(content)
        reasoning = content.split(THINK_CLOSE)[0].split(THINK_OPEN)[-1].strip()
        content = content.split(THINK_CLOSE)[-1]
    answers = [a for a in dict.fromkeys((content, content.lstrip("\n"), content.strip())) if a]
    if reasoning:
        found = _think_block(text, lo, reasoning, answers)
        if found is not None:
            return found
        rp = text.find(reasoning, lo)
        if rp >= 0:  # in another markup: from the reasoning through the answer after it
            for answer in answers or [""]:
                pos = text.find(answer, rp + len(reasoning))
                if pos >= 0:
                    return rp, pos + len(answer)
    # No reasoning, or a template that drops it: the content as it is, or as a thinking
    # template strips it (leading newlines, or all surrounding whitespace).
    for answer in dict.fromkeys((m["content"], *answers)):
        pos = text.find(answer, lo)
        if pos >= 0:
            return pos, pos + len(answer)
    raise RowReject(
        f"messages[{i}].content",
        "template",
        "the chat template changed or dropped this assistant message's content",
    )


def _think_block(text: str, lo: int, reasoning: str, answers: list[str]) -> tuple[int, int] | None:
    """(start, end) of ``<think> reasoning </think> answer`` in ``text[lo:]``, any
    whitespace around the reasoning; None when the template did not render it so."""
    rp = text.find(reasoning, lo)
    while rp >= 0:
        op = text.rfind(THINK_OPEN, lo, rp)
        tail = _THINK_TAIL.match(text, rp + len(reasoning))
        if op >= 0 and tail and not text[op + len(THINK_OPEN) : rp].strip():
            end = _answer_end(text, tail.end(), answers)
            if end is not None:
                return op, end
        rp = text.find(reasoning, rp + 1)
    return None


def _answer_end(text: str, at: int, answers: list[str]) -> int | None:
    """Where the answer that follows ``at`` (after whitespace) ends; ``at`` for a turn
    with no answer (only reasoning); None when none follows."""
    if not answers:
        return at
    k = at
    while k < len(text) and text[k].isspace():
        k += 1
    for a in answers:
        for pos in range(at, k + 1):
            if text.startswith(a, pos):
                return pos + len(a)
    return None


def _empty_think(text: str, lo: int, start: int, end: int, train: bool) -> tuple[int, int]:
    """A turn's span without the empty think block it starts with; with ``train``, with
    the one the template put right before it."""
    if not train:
        block = _EMPTY_THINK.match(text, start, end)
        return (block.end(), end) if block and block.end() < end else (start, end)
    op = text.rfind(THINK_OPEN, lo, start)
    if op >= 0 and _EMPTY_THINK.fullmatch(text, op, start):
        return op, end
    return start, end


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
