"""The shipped sumtask models (teacher 192 x 3, student 128 x 2) and the chat-format ids."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from bench.quality.task import MODELS, PAD


def load_model(path: str | os.PathLike):
    """A shipped (float16) model as float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_tokenizer():
    from raydc.infra.models import load_tokenizer as load

    tok = load(MODELS / "student")
    if tok.pad_token_id != PAD:
        raise ValueError(f"the shipped tokenizer's pad id is {tok.pad_token_id}, not {PAD}")
    return tok


def prompt_ids(tok, prompts: Sequence[str]) -> list[list[int]]:
    """Chat-format prompt ids up to the assistant turn (what prepare renders)."""
    out = []
    for p in prompts:
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def response_ids(tok, responses: Sequence[str]) -> list[list[int]]:
    """Response ids ending with the end-of-turn token (the model's EOS)."""
    return [tok(r + tok.eos_token, add_special_tokens=False)["input_ids"] for r in responses]


def newline_ids(tok) -> set[int]:
    """Token ids whose text holds a newline (they close a scratchpad line: a sentence)."""
    return {i for i in range(len(tok)) if "\n" in tok.decode([i])}


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
