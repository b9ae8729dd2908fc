"""Shared fixtures: tiny models (built once per session) and one local Ray cluster.

Tests never reach a model hub: the environment is set offline before anything imports
transformers. DeepSpeed runs on the CPU accelerator.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from raydc.infra.models import build_tiny_model, offline_env  # noqa: E402

offline_env()

import pytest  # noqa: E402

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
QWEN2_TOKENIZER = os.path.join(ASSETS, "qwen2-tokenizer")
QWEN3_TEMPLATE = os.path.join(ASSETS, "qwen3-chat-template", "chat_template.jinja")
# Qwen3's added tokens after the three the Qwen2 files hold, in id order from 151646, with
# Qwen3's `special` flags (<think> is 151667, </think> 151668). The Qwen2 files have no
# <think> token: the text would split into '<th', 'ink', '>'.
QWEN3_ADDED = [
    (t, True)
    for t in "<|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|> <|quad_start|> "
    "<|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> "
    "<|video_pad|>".split()
] + [
    (t, False)
    for t in "<tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> "
    "<|fim_pad|> <|repo_name|> <|file_sep|> <tool_response> </tool_response> <think> "
    "</think>".split()
]


def qwen3_tokenizer():
    """Qwen3's tokenizer for tests: the Qwen2 vocabulary (which Qwen3 shares), Qwen3's
    added tokens and Qwen3's chat template (tests/assets/qwen3-chat-template)."""
    from transformers import AddedToken

    from raydc.infra.models import load_tokenizer

    tok = load_tokenizer(QWEN2_TOKENIZER)
    tok.add_tokens([AddedToken(t, special=sp, normalized=False) for t, sp in QWEN3_ADDED])
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    with open(QWEN3_TEMPLATE) as fh:
        tok.chat_template = fh.read()
    return tok


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> str:
    """A random-init tiny Qwen2 student (hidden 128, 2 layers, tiny-bpe tokenizer)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "student", "student", seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A larger tiny teacher with the same tokenizer as the student."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "teacher", "teacher", seed=1)


@pytest.fixture(scope="session")
def tiny_teacher_other_tokenizer(tmp_path_factory) -> str:
    """A tiny teacher with a genuinely different tokenizer (WordPiece, 1,024 tokens)."""
    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "teacher_wp",
        "teacher",
        tokenizer="tiny-wordpiece",
        seed=2,
    )


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole test session (2 CPUs, no dashboard)."""
    import ray

    from raydc.infra.runtime import connect_ray

    connect_ray(None, num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
