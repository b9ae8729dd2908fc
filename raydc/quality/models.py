"""The benchmark's Qwen2 models: build, save, load, count."""

from __future__ import annotations

import os

import torch

from raydc.models import qwen2_config
from raydc.quality.task import EOS, PAD, VOCAB_SIZE

# (hidden, layers, heads, kv heads, intermediate); head_dim = hidden / heads = 64.
TEACHER_SIZE = (192, 3, 3, 1, 512)
STUDENT_SIZE = (128, 3, 2, 1, 256)


def build_model(sizes: tuple[int, int, int, int, int], seed: int, max_len: int = 256):
    """A random-init Qwen2 causal LM over the task vocabulary."""
    from transformers import Qwen2ForCausalLM

    config = qwen2_config(sizes, VOCAB_SIZE, EOS, PAD, max_len)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def save_model(model, path: str | os.PathLike) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def load_model(path: str | os.PathLike):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
