"""Ray Data actors that hold one scoring engine each, and the time they spend.

Each actor of the score stage's ``map_batches`` actor pools loads its model once and then
scores batches as they stream past. ``EngineActor`` writes the engine's start-up and busy
time beside the data, so the stage summary reports start-up apart from scoring.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from raydc.engines import make_scorer
from raydc.engines.base import ScoreError
from raydc.infra.artifacts import batch_key, write_parts
from raydc.score.store import set_column

if TYPE_CHECKING:
    from raydc.config import ScoreConfig

ENGINE_PARTS = "eng"  # stats parts of engine time: eng<role>


class EngineActor:
    """Start-up and busy time of an engine actor, as ``eng<role>`` stats parts."""

    role = "engine"

    def _start(self, parts_dir: str | None) -> float:
        self.parts_dir = parts_dir
        return time.perf_counter()

    def _started(self, t0: float) -> None:
        if self.parts_dir:
            stats = {"startup_s": time.perf_counter() - t0, "engines": 1}
            key = f"{self.role}-{os.getpid()}-init"
            write_parts(self.parts_dir, key, ENGINE_PARTS + self.role, [], stats)

    def _busy(self, t0: float, rows: list[str], tokens: int) -> None:
        if self.parts_dir:
            stats = {"busy_s": time.perf_counter() - t0, "tokens": tokens, "calls": 1}
            write_parts(self.parts_dir, batch_key(rows), ENGINE_PARTS + self.role, [], stats)


class StudentScorer(EngineActor):
    """Ray Data actor: adds ``student_logprobs`` to each batch."""

    role = "student"

    def __init__(
        self,
        model: str,
        score_cfg: ScoreConfig,
        parts_dir: str | None = None,
        entropy: bool = False,
    ):
        t0 = self._start(parts_dir)
        self.entropy = entropy
        self.scorer = make_scorer(score_cfg, model, entropy=entropy)
        self._started(t0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        ids = batch.column("input_ids").to_pylist()
        f32 = pa.list_(pa.float32())
        if self.entropy:  # also the student's entropy per token (an entropy gate reads it)
            lps, hs = zip(*self.scorer.score_with_entropy(ids)) if ids else ((), ())
            batch = set_column(batch, "student_entropy", pa.array(list(hs), f32))
        else:
            lps = self.scorer.score(ids)
        col = pa.array([np.asarray(x, np.float32) for x in lps], f32)
        self._busy(t0, batch.column("row_id").to_pylist(), sum(map(len, ids)))
        return set_column(batch, "student_logprobs", col)


def vocab_size(model: str) -> int:
    """The model's vocabulary size from its ``config.json`` (ids at or above it are refused)."""
    cfg = Path(model) / "config.json"
    if not cfg.exists():
        raise ScoreError(
            f"{model}: no config.json (score.student / score.teacher must be a model folder)"
        )
    data = json.loads(cfg.read_text())
    data = data.get("text_config", data)
    return int(data["vocab_size"])
