"""The stage table's entry, and the typed things stages hand each other.

Each stage module declares one ``Stage`` (``raydc/score/stage.py``: ``SCORE = Stage(...)``);
``raydc.pipeline.table`` lists them in job order, and the CLI's commands and helps,
``run_all``'s order, ``run_until`` and the input checks all derive from that list. A new
stage is one module with its entry and one config section.

A stage's functions take the config and ``up``, the results of the stages it needs (by
name), so a stage never imports another stage's module: it reads their outputs through
``StageResult.out_dir`` and, for a model, ``TrainedModel.of``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raydc.infra.artifacts import StageError, StageResult

if TYPE_CHECKING:
    from raydc.config import RaydcConfig

Upstream = Mapping[str, StageResult]


def _no_needs(cfg: RaydcConfig) -> tuple[str, ...]:
    return ()


def _always(cfg: RaydcConfig) -> bool:
    return True


def _no_check(cfg: RaydcConfig) -> None:
    return None


@dataclass(frozen=True)
class Stage:
    """One stage of the job: its command name and help, what it needs and reads, how it runs.

    - ``needs(cfg)``: the stages whose results it reads (the pipeline runs or reuses them
      first and passes them as ``up``); may depend on the config (prepare reads generated
      traces when ``generate.enabled``).
    - ``reads(cfg, up)``: its fingerprint parts (config sections, upstream fingerprints,
      input file and model hashes); a finished stage with the same parts is reused.
    - ``run(cfg, up, out_dir) -> summary``: the stage itself.
    - ``enabled(cfg)``: whether ``run_all`` runs it.
    - ``check(cfg)``: what would fail late (missing files and models), checked before any
      stage of a run starts; raises ``ConfigError`` naming the field.
    - ``resumes``: a partial folder of the same fingerprint holds checkpoints to resume from.
    - ``vouch(out, summary)``: the outputs its marker vouches for (default: the folder).
    """

    name: str
    help: str
    run: Callable[[RaydcConfig, Upstream, Path], dict]
    reads: Callable[[RaydcConfig, Upstream], dict]
    needs: Callable[[RaydcConfig], tuple[str, ...]] = _no_needs
    enabled: Callable[[RaydcConfig], bool] = _always
    check: Callable[[RaydcConfig], None] = _no_check
    resumes: bool = False
    vouch: Callable[[Path, dict], list[Path]] | None = None

    @property
    def optional(self) -> bool:
        """Whether a job may leave it out (its ``enabled`` depends on the config)."""
        return self.enabled is not _always


@dataclass(frozen=True)
class TrainedModel:
    """What a train or tune stage (or the last DASD phase) hands on: the exported model
    (what eval and the next phase load) and the DeepSpeed checkpoint it came from (whose
    optimizer state the next phase may carry)."""

    model_dir: str
    checkpoint: str | None

    @classmethod
    def of(cls, result: StageResult) -> TrainedModel:
        model = result.summary.get("model_dir")
        if not model:
            raise StageError(f"stage {result.name!r} reported no model_dir")
        return cls(str(model), result.summary.get("checkpoint"))


def model_outputs(out: Path, summary: dict) -> list[Path]:
    """What train and tune vouch for: the exported model (eval and users read it), not the
    checkpoints, which a user may prune once the run is done."""
    model = summary.get("model_dir")
    return [Path(model)] if model and Path(model).exists() else []
