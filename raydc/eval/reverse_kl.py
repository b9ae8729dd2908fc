"""Reverse KL on the student's own samples: how far the student drifts from the teacher
where the student actually goes (the sweep metric ``val_reverse_kl``, ``raydc.tune``).

``reverse_kl(cfg, model_dir, out_dir)`` samples one response per prompt of ``eval.path``
from ``model_dir`` at temperature 1, recording the log-prob ``log p_S`` of each sampled
token; scores the same tokens under ``score.teacher`` (``score.backend``, ``raydc.engines``)
for ``log p_T``; and averages ``log p_S - log p_T`` over the sampled tokens: a Monte Carlo
estimate of the per-token KL(student || teacher) along the student's trajectories. The
teacher must share the student's tokenizer, since the log-probs are compared token by token.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from raydc.config import ConfigError
from raydc.engines.sampler import (
    LocalEngine,
    Sample,
    Sampling,
    fit_prompts,
    read_prompts,
    sample_requests,
)
from raydc.eval.stage import user_message
from raydc.infra.artifacts import write_json


def reverse_kl(
    cfg, model_dir: str, out_dir: str | os.PathLike, engine: LocalEngine | None = None
) -> dict:
    """KL(student || teacher) per sampled token on the student's own samples; returns the
    figures (also ``out_dir/reverse_kl.json``). ``engine``: a started LocalEngine of
    ``model_dir`` to reuse."""
    import numpy as np

    t0 = time.time()
    teacher = _check_teacher(cfg, model_dir)
    prompt_ids, samples = _student_samples(cfg, model_dir, engine, out_dir)
    logp_T = _teacher_logprobs(cfg, teacher, prompt_ids, samples)
    per_seq, n_tokens, total = [], 0, 0.0
    for smp, lt in zip(samples, logp_T):
        start = len(prompt_ids[smp.key])
        d = np.asarray(smp.logprobs, dtype=np.float64) - lt[start:].astype(np.float64)
        per_seq.append(float(d.mean()))
        total += float(d.sum())
        n_tokens += len(d)
    out = {
        "val_reverse_kl": total / n_tokens,  # per sampled token
        "reverse_kl_per_sequence_mean": float(np.mean(per_seq)),
        "samples": len(samples),
        "sampled_tokens": n_tokens,
        "teacher": str(teacher),
        "model": str(model_dir),
        "seconds": time.time() - t0,
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / "reverse_kl.json", out)
    return out


def _check_teacher(cfg, model_dir: str) -> str:
    """``score.teacher``, once it is known to share the student's tokenizer."""
    from raydc.infra.artifacts import tokenizer_fingerprint

    teacher = cfg.score.teacher
    if not teacher:
        raise ConfigError("tune.metric=val_reverse_kl: needs score.teacher")
    if tokenizer_fingerprint(teacher) != tokenizer_fingerprint(model_dir):
        raise ConfigError(
            f"tune.metric=val_reverse_kl: score.teacher={teacher} has another tokenizer than "
            "the student; token-level reverse KL needs a shared tokenizer"
        )
    return teacher


def _student_samples(
    cfg, model_dir: str, engine: LocalEngine | None, out_dir: str | os.PathLike
) -> tuple[list[list[int]], list[Sample]]:
    """The prompts' token ids and one non-empty sample per prompt (key: the prompt's index),
    drawn at temperature 1 with the sampled tokens' log-probs. The engine writes vLLM's
    errors to ``out_dir``, as eval's does, so that one that dies is reported with its own."""
    from raydc.infra.models import load_tokenizer

    ecfg = cfg.eval
    records, pkey = read_prompts(ecfg.path, ecfg)
    items = [
        {"row_id": row_id, "message": user_message(ecfg, r[pkey])}
        for row_id, r in records
        if isinstance(r.get(pkey), str) and r[pkey].strip()
    ]
    tokenizer = load_tokenizer(model_dir)
    _, prompt_ids, _ = fit_prompts(tokenizer, items, [], ecfg, "eval", pkey)
    if not prompt_ids:
        raise ValueError(f"val_reverse_kl: no usable prompt in {ecfg.path}")
    sampling = Sampling(1.0, 1.0, ecfg.max_new_tokens, logprobs=True, n=1, seed=ecfg.seed)
    _, batches = sample_requests(
        str(model_dir),
        tokenizer,
        prompt_ids,
        sampling,
        ecfg.engine,
        cfg.run.ray_address,
        engine,
        log_dir=out_dir,  # an engine that dies is reported with its own error
    )
    return prompt_ids, [smp for batch in batches for smp in batch if smp.token_ids]


def _teacher_logprobs(cfg, teacher: str, prompt_ids: list[list[int]], samples: list[Sample]):
    """The teacher's log-prob of every token of each prompt + sample (one array each)."""
    from raydc.engines import make_scorer

    scorer = make_scorer(cfg.score, teacher)
    try:
        return scorer.score([prompt_ids[smp.key] + list(smp.token_ids) for smp in samples])
    finally:
        scorer.close()
