"""From a config to real paths, checked before any stage runs.

Configs may name packaged files as ``pkg:assets/example/train.jsonl`` and the built-in
tiny models as ``tiny:student`` / ``tiny:teacher`` (built under ``<output_dir>/models/``
on first use, from ``raydc.infra.models``); ``resolve`` turns both into real paths before any
stage sees the config. ``check_inputs`` then looks for what would otherwise fail late: a
missing input file or model folder, a teacher whose vocabulary is smaller than its
tokenizer, a bad Tune space, no eval prompts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from raydc.config import ConfigError, RaydcConfig

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # raydc/
# role -> (size role in raydc.infra.models.TINY_SIZES, seed). The teacher is larger than the
# student and shares its tokenizer.
TINY_MODELS = {"tiny:student": ("student", 0), "tiny:teacher": ("teacher", 1)}


def resolve_path(value: str | None) -> str | None:
    """``pkg:<rel>`` -> the packaged file; other paths -> absolute (``~`` expanded)."""
    if not value:
        return value
    if value.startswith("pkg:"):
        return str(PACKAGE_DIR / value[len("pkg:") :])
    if "://" in value:
        return value
    return str(Path(value).expanduser().resolve())


def resolve_model(value: str | None, models_dir: Path, tokenizer: str = "tiny-bpe") -> str | None:
    """``tiny:student`` / ``tiny:teacher`` -> a built random tiny model folder (built if
    missing); ``pkg:<rel>`` -> a model shipped in the package (the default job's trained
    tiny pair); a local folder -> its absolute path; anything else (a hub name) unchanged."""
    if not value:
        return value
    if value.startswith("pkg:"):
        return resolve_path(value)
    if value in TINY_MODELS:
        role, seed = TINY_MODELS[value]
        path = models_dir / role
        if not (path / "config.json").exists():
            from raydc.infra.models import build_tiny_model

            tmp = models_dir / f".{role}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            build_tiny_model(tmp, role, tokenizer=tokenizer, seed=seed)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        return str(path)
    if value.startswith("tiny:"):
        raise ValueError(f"{value!r}: the built-in models are {sorted(TINY_MODELS)}")
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() or value.startswith((".", "/", "~")) else value


def writable_output_dir(cfg: RaydcConfig) -> Path:
    """``run.output_dir`` made absolute and created; ConfigError when it cannot be written."""
    root = Path(cfg.run.output_dir).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write_probe_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"run.output_dir={cfg.run.output_dir!r}: cannot write there "
            f"({e.strerror or e}{': ' + str(e.filename) if e.filename else ''})"
        ) from None
    return root


def resolve(cfg: RaydcConfig) -> RaydcConfig:
    """A copy of ``cfg`` with packaged paths, tiny models and the output dir made real."""
    out = Path(cfg.run.output_dir).expanduser().resolve()
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    rep = dataclasses.replace
    return rep(
        cfg,
        run=rep(cfg.run, output_dir=str(out)),
        data=rep(
            cfg.data,
            path=resolve_path(cfg.data.path),
            tokenizer=resolve_model(cfg.data.tokenizer, models),
            teacher_tokenizer=resolve_model(cfg.data.teacher_tokenizer, models),
            teacher_logprobs_path=resolve_path(cfg.data.teacher_logprobs_path),
        ),
        score=rep(
            cfg.score,
            student=resolve_model(cfg.score.student, models),
            teacher=resolve_model(cfg.score.teacher, models),
        ),
        train=rep(
            cfg.train,
            student=resolve_model(cfg.train.student, models),
            scored_student=resolve_model(cfg.train.scored_student, models),
        ),
        eval=rep(cfg.eval, path=resolve_path(cfg.eval.path)),
        generate=rep(
            cfg.generate,
            prompts=resolve_path(cfg.generate.prompts),
            teacher=resolve_model(cfg.generate.teacher, models),
        ),
        mixed_policy=rep(
            cfg.mixed_policy,
            traces=resolve_path(cfg.mixed_policy.traces),
            student=resolve_model(cfg.mixed_policy.student, models),
            teacher=resolve_model(cfg.mixed_policy.teacher, models),
        ),
    )


def check_inputs(cfg: RaydcConfig, stages: tuple[str, ...]) -> None:
    """What can fail late, checked before any of ``stages`` runs: input files, model
    folders (a missing folder would otherwise read as a bad hub repo id a minute in), a
    teacher whose vocabulary is smaller than its tokenizer, the Tune space and the eval
    prompts. Raises ConfigError naming the field."""
    from raydc.method.weights import needs_teacher

    generating = "generate" in stages or ("prepare" in stages and cfg.generate.enabled)
    if generating:
        _check_input("generate.prompts", cfg.generate.prompts)
        if cfg.generate.teacher:
            _check_model("generate.teacher", cfg.generate.teacher)
        elif cfg.score.teacher:
            _check_model("score.teacher", cfg.score.teacher)
        if stages == ("generate",):
            return
    elif "prepare" in stages and cfg.mixed_policy.enabled:
        _check_input("mixed_policy.traces", cfg.mixed_policy.traces or cfg.data.path)
    elif "prepare" in stages:
        _check_input("data.path", cfg.data.path)
    if "prepare" in stages and cfg.data.teacher_logprobs_path:
        _check_input("data.teacher_logprobs_path", cfg.data.teacher_logprobs_path)
    models = [("score.student", cfg.score.student)]
    if cfg.score.teacher and needs_teacher(cfg.weights):
        models.append(("score.teacher", cfg.score.teacher))
    if "model" in stages and cfg.train.student:
        models.append(("train.student", cfg.train.student))
    if cfg.data.tokenizer:
        models.append(("data.tokenizer", cfg.data.tokenizer))
    if cfg.data.teacher_tokenizer and "prepare" in stages:
        models.append(("data.teacher_tokenizer", cfg.data.teacher_tokenizer))
    for field, value in models:
        _check_model(field, value, tokenizer_only=field.startswith("data."))
    if cfg.score.teacher and Path(cfg.score.teacher).is_dir() and "score" in stages:
        _check_vocab("score.teacher", cfg.score.teacher)
    if "model" in stages and cfg.tune.enabled:
        from raydc.tune import check_space

        check_space(cfg)
    if ("eval" in stages and cfg.eval.enabled) or (
        "model" in stages and cfg.tune.enabled and cfg.tune.metric != "val_nll"
    ):
        if not cfg.eval.path:
            raise ConfigError("eval.path: not set; name the held-out prompts to evaluate on")
        _check_input("eval.path", cfg.eval.path)


def _check_input(field: str, value: str | None) -> None:
    if value and "://" not in value and not Path(value).exists():
        raise ConfigError(f"{field}={value!r}: no such file or folder")


def _check_model(field: str, value: str | None, tokenizer_only: bool = False) -> None:
    """A model (or tokenizer) named by a config field must be a local folder holding it,
    or a hub name that can be reached (or is cached when the hub is offline)."""
    from raydc.infra.models import TOKENIZERS

    if not value or (tokenizer_only and value in TOKENIZERS):
        return
    p = Path(value).expanduser()
    need = "tokenizer_config.json" if tokenizer_only else "config.json"
    if p.exists() or value.startswith((".", "/", "~")):
        if not p.is_dir():
            raise ConfigError(f"{field}={value!r}: no such model folder")
        if not (p / need).is_file() and not (p / "config.json").is_file():
            raise ConfigError(f"{field}={value!r}: not a model folder (no {need} inside)")
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(value, need), str):
            raise ConfigError(
                f"{field}={value!r}: not a local folder, and the hub is offline "
                f"(HF_HUB_OFFLINE=1) with no cached copy; give the model's folder"
            )


def _check_vocab(field: str, path: str) -> None:
    """vLLM fails on a model whose embedding is smaller than its tokenizer's ids, late and
    with the cause only in a worker log."""
    from raydc.infra.models import load_tokenizer

    try:
        vocab = json.loads((Path(path) / "config.json").read_text()).get("vocab_size")
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{field}={path!r}: unreadable config.json ({e})") from None
    if not isinstance(vocab, int):
        return
    n = len(load_tokenizer(path))
    if n > vocab:
        raise ConfigError(
            f"{field}={path!r}: its tokenizer has {n:,} tokens but the model's vocab_size is "
            f"{vocab:,}; token ids >= {vocab:,} cannot be scored (is this the right tokenizer?)"
        )
