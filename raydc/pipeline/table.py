"""The stage table: every stage of the job, in job order, each declared in its own module.

The CLI's commands and helps, ``Pipeline.run_all``'s order, ``run_until`` and the input
checks derive from ``STAGES``; nothing else lists stages.
"""

from __future__ import annotations

from collections.abc import Iterable

from raydc.config import RaydcConfig
from raydc.eval.stage import EVAL
from raydc.generate import GENERATE
from raydc.infra.stage import Stage
from raydc.mixed_policy import MIXED_POLICY
from raydc.on_policy import ON_POLICY
from raydc.prepare.stage import PREPARE
from raydc.score.stage import SCORE
from raydc.select import SELECT
from raydc.train import TRAIN
from raydc.tune import TUNE

STAGES: tuple[Stage, ...] = (
    GENERATE, MIXED_POLICY, PREPARE, SCORE, SELECT, TRAIN, TUNE, ON_POLICY, EVAL
)  # fmt: skip
# The stages that produce the job's model; in a run with DASD phases, the last phase's.
MODEL_STAGES = ("train", "tune")

_BY_NAME = {s.name: s for s in STAGES}


def stage_named(name: str) -> Stage:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"no stage {name!r}; the stages are {list(_BY_NAME)}") from None


def closure(cfg: RaydcConfig, names: Iterable[str]) -> list[str]:
    """``names`` and every stage they need under ``cfg``, in job order."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(stage_named(name).needs(cfg))
    return [s.name for s in STAGES if s.name in seen]
