"""From a config to real paths, checked before any stage runs.

Configs may name packaged files as ``pkg:assets/example/train.jsonl`` and the built-in
tiny models as ``tiny:student`` / ``tiny:teacher`` (built under ``<output_dir>/models/``
on first use, from ``raydc.infra.models``); ``resolve`` turns both into real paths before any
stage sees the config. ``check_inputs`` then runs the checks each stage of the run declares
(``Stage.check``: a missing input file or model folder, a teacher whose vocabulary is
smaller than its tokenizer, a bad Tune space, no eval prompts), before any stage starts.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable
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
        tune=rep(cfg.tune, val_path=resolve_path(cfg.tune.val_path)),
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
        on_policy=rep(
            cfg.on_policy,
            prompts=resolve_path(cfg.on_policy.prompts),
            student=resolve_model(cfg.on_policy.student, models),
            teacher=resolve_model(cfg.on_policy.teacher, models),
        ),
    )


def check_inputs(cfg: RaydcConfig, names: Iterable[str]) -> None:
    """Before any of the stages ``names`` (and those they need) run: each one's own
    ``check`` (docs/failure-modes.md). Raises ConfigError naming the field."""
    from raydc.pipeline.table import closure, stage_named

    for name in closure(cfg, names):
        stage_named(name).check(cfg)
