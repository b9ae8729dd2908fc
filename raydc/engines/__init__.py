"""The engines: per-token log-probs of given token ids under a model behind one interface
(``make_scorer``), and the vLLM sampler (``sampler``) that generate, mixed_policy and eval
share.

Scorer backends: ``vllm`` (the default; run as engine actors by the score stage) and
``transformers`` (a padded forward; the cross-check in tests and the fallback where vLLM
cannot run). Importing this package imports neither vLLM nor Ray.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raydc.config import ScoreConfig
    from raydc.engines.base import Scorer


def make_scorer(
    cfg: ScoreConfig, model: str, temperature: float = 1.0, entropy: bool = False
) -> Scorer:
    """A scorer of ``model`` with the engine settings of ``cfg.engine`` (``cfg.backend``
    decides which), returning log-probs of softmax(logits / temperature); with
    ``entropy``, ready for ``score_with_entropy`` (vLLM: ``cfg.entropy_top_k`` prompt
    log-probs per position)."""
    top_k = int(cfg.entropy_top_k) if entropy else 0
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: must be > 0")
    if cfg.backend == "transformers":
        from raydc.engines.hf import TransformersScorer

        return TransformersScorer(model, cfg.engine, temperature, top_k)
    if cfg.backend == "vllm":
        from raydc.engines.vllm import VLLMScorer

        return VLLMScorer(model, cfg.engine, temperature, top_k)
    raise ValueError(f"score.backend={cfg.backend!r}: must be 'vllm' or 'transformers'")


def score_rows(
    model: str, token_ids, backend: str = "transformers", temperature: float = 1.0, **settings
):
    """Log-probs [T] (float32, position 0 = 0.0) of each row of ``token_ids`` under
    ``model`` at ``temperature``, scored in this process. ``settings`` are engine fields
    (``score.engine``: dtype, max_model_len...); unknown ones are refused."""
    from raydc.config import ScoreConfig

    cfg = ScoreConfig(backend=backend)
    known = {f.name for f in dataclasses.fields(cfg.engine)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown scorer settings {unknown}; known: {sorted(known)}")
    cfg.engine = dataclasses.replace(cfg.engine, **settings)
    cfg.validate("score")
    scorer = make_scorer(cfg, model, temperature)
    try:
        return scorer.score(token_ids)
    finally:
        scorer.close()
