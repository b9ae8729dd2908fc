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
