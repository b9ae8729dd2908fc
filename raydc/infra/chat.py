"""A chat template's rendering of a conversation, in the terms every stage aligns by: the
rendered text, each assistant content's character span, the tokens with their offsets, and
each assistant turn's content tokens and end-of-turn token. The student's rendering
(prepare) and the teacher's own (score, for a teacher with another tokenizer) both use it.
"""

from __future__ import annotations

from collections.abc import Sequence

from raydc.infra.artifacts import RowReject


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
