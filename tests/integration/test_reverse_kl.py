"""The sweep metric val_reverse_kl on real models: the student samples with vLLM (CPU
build), the teacher scores the same tokens (transformers scorer). Against itself the
estimate is ~0; against a different teacher it is clearly positive."""

from __future__ import annotations

import pytest

from raydc.config import from_dict
from raydc.eval.reverse_kl import reverse_kl
from raydc.pipeline.resolve import PACKAGE_DIR

pytestmark = pytest.mark.integration


def _cfg(teacher: str):
    return from_dict(
        {
            "score": {
                "backend": "transformers",
                "teacher": teacher,
                "engine": {"max_model_len": 512},
            },
            "eval": {
                "path": str(PACKAGE_DIR / "assets" / "example" / "eval.jsonl"),
                "num_prompts": 6,
                "max_new_tokens": 24,
                "engine": {"backend": "local", "max_model_len": 512},
            },
        }
    )


def test_reverse_kl_is_zero_against_itself_and_positive_against_another_teacher(
    tiny_student, tiny_teacher, tmp_path
):
    from raydc.engines.sampler import LocalEngine

    cfg = _cfg(tiny_student)
    engine = LocalEngine(tiny_student, cfg.eval.engine)
    same = reverse_kl(cfg, tiny_student, tmp_path / "same", engine=engine)
    other = reverse_kl(_cfg(tiny_teacher), tiny_student, tmp_path / "other", engine=engine)
    assert same["samples"] == 6 and same["sampled_tokens"] > 6
    assert abs(same["val_reverse_kl"]) < 1e-3, same
    assert other["val_reverse_kl"] > 0.1, other
    assert (tmp_path / "other" / "reverse_kl.json").is_file()


def test_reverse_kl_refuses_a_teacher_with_another_tokenizer(
    tiny_student, tiny_teacher_other_tokenizer, tmp_path
):
    from raydc.config import ConfigError

    with pytest.raises(ConfigError, match="another tokenizer"):
        reverse_kl(_cfg(tiny_teacher_other_tokenizer), tiny_student, tmp_path)
