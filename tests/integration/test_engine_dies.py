"""A generate stage whose vLLM engine dies on every try (Ray Data actors, the real vLLM CPU
build): the engine actor is restarted a bounded number of times, then the stage fails with
the engine's own error. It used to restart the actor forever with nothing at the driver.

The engine dies for real: a teacher whose embedding has 64 rows while its tokenizer has
2,048 tokens. vLLM accepts prompt ids up to the tokenizer's largest, so every rendered
prompt reaches the engine, whose embedding lookup fails (``IndexError``) on every try.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SMALL_VOCAB = 64


def _small_vocab_teacher(tiny_teacher: str, out: Path) -> str:
    """The tiny teacher's tokenizer over a random model whose vocabulary is SMALL_VOCAB."""
    import torch
    from transformers import Qwen2ForCausalLM

    from raydc.infra.models import TINY_SIZES, qwen2_config

    src = json.loads((Path(tiny_teacher) / "config.json").read_text())
    config = qwen2_config(
        TINY_SIZES["student"],
        SMALL_VOCAB,
        src["eos_token_id"],
        src.get("pad_token_id"),
        src["max_position_embeddings"],
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for f in Path(tiny_teacher).iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens", "generation")):
            shutil.copy(f, out / f.name)
    return str(out)


def test_a_generate_whose_engine_always_dies_fails_naming_the_engines_error(
    tiny_teacher, ray_local, tmp_path
):
    from raydc.config import load_config
    from raydc.config.engines import ENGINE_RESTARTS
    from raydc.engines.sampler import ENGINE_ERRORS, GenerationError
    from raydc.generate import run_generate

    teacher = _small_vocab_teacher(tiny_teacher, tmp_path / "teacher")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"What is {i} + 3?"}) + "\n" for i in range(4)
        )
    )
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'run'}",
            "generate.engine.backend=ray",
            "generate.engine.max_model_len=256",
            "generate.max_new_tokens=4",
            "generate.n_samples=1",
        ],
    )
    out = tmp_path / "run" / "generate"
    with pytest.raises(GenerationError) as err:
        run_generate(cfg, teacher, prompts, out)
    msg = str(err.value)
    # The engine's own error, from its worker process, not Ray's "the actor died".
    assert f"the vLLM engine of {teacher} died: IndexError: index out of range in self" in msg
    assert "a dead engine is restarted 1 time(s) on Ray, then the stage fails" in msg
    assert str(out / ENGINE_ERRORS) in msg
    # One fatal error of the engine core per engine that was started: the first engine and
    # ENGINE_RESTARTS (1) replacement, then Ray gave up instead of restarting it forever.
    log = (out / ENGINE_ERRORS).read_text()
    assert ENGINE_RESTARTS == 1
    assert len(re.findall(r"EngineCore encountered a fatal error", log)) == 2
