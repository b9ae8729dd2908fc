"""The Scorer interface and the checks every backend's results pass.

A scorer takes rows of token ids and returns, per row, ``logp_T`` (float32): the log-prob
of token t given tokens < t under the model at temperature 1 (raw log-softmax of the
logits), with position 0 set to 0.0 (nothing predicts the first token). Every result is
checked against what was sent: same length, same token ids. A mismatch raises
``ScoreMismatchError``; results are never shifted or padded to fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class ScoreError(RuntimeError):
    """A score or select stage cannot go on (bad input, lost rows); the message says why."""


class ScoreMismatchError(RuntimeError):
    """A backend returned log-probs that do not belong to the tokens sent."""


class Scorer(Protocol):
    def score(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per row, float32 log-probs [T]; position 0 is 0.0."""
        ...

    def score_with_entropy(
        self, token_ids: Sequence[Sequence[int]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row, the log-probs and the predictive entropy [T] (nats) of the distribution
        each token was drawn from; position 0: 0.0."""
        ...

    def close(self) -> None: ...


def check_result(
    i: int, sent: Sequence[int], got_ids: Sequence[int] | None, logp: np.ndarray
) -> None:
    """Raise unless a result has the length (and, when returned, the ids) of what was sent."""
    if got_ids is not None and list(got_ids) != list(sent):
        first = next(
            (k for k, (a, b) in enumerate(zip(got_ids, sent)) if a != b),
            min(len(got_ids), len(sent)),
        )
        raise ScoreMismatchError(
            f"row {i}: the engine scored other token ids than sent (first difference at "
            f"position {first}; {len(got_ids)} returned vs {len(sent)} sent)"
        )
    if len(logp) != len(sent):
        raise ScoreMismatchError(f"row {i}: {len(logp)} log-probs for {len(sent)} tokens sent")
    if len(logp) and not np.isfinite(logp[1:]).all():
        bad = int(np.nonzero(~np.isfinite(logp[1:]))[0][0]) + 1
        raise ScoreMismatchError(f"row {i}: non-finite log-prob {logp[bad]} at position {bad}")
