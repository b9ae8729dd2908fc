"""Scoring: per-token log-probs of given token ids under a model, behind one interface.

Backends: ``vllm`` (engines as a Ray Data actor pool; the default) and ``transformers``
(a padded forward; the cross-check in tests and the fallback where vLLM cannot run).
``raydc.scoring.stage`` holds the score and select stages. Importing this package imports
neither vLLM nor Ray.
"""

from __future__ import annotations


def score_rows(model: str, token_ids, backend: str = "transformers", **settings):
    """Log-probs [T] (float32, position 0 = 0.0) of each row of ``token_ids`` under
    ``model``, scored in this process. ``settings`` are ScoreConfig fields (dtype,
    max_model_len...). See ``raydc.scoring.base.make_scorer``."""
    from raydc.scoring.base import make_scorer

    scorer = make_scorer(backend, model, **settings)
    try:
        return scorer.score(token_ids)
    finally:
        scorer.close()
