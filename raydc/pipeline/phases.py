"""DASD training phases (temperature-scheduled learning) from one config.

``phases:`` lists the phases; each overrides some of the job's sections (its traces: a
``data.path``, ``generate`` settings or ``mixed_policy`` settings; its step budget, learning
rate, weighting, selection) and runs as a job of its own under
``<run.output_dir>/phases/<name>/`` (generate / mixed_policy -> prepare -> score -> select ->
train or tune), each stage fingerprinted and resumable like any stage. Phase k+1 starts from
phase k: its student is phase k's exported model, its optimizer state is phase k's last
(``optimizer: carry``; the step count, data position and learning-rate schedule start
anew), its traces are scored under phase k's student (``scores_from: previous``) or the
initial one (``initial``), and a mixed-policy phase has phase k's student write the
prefixes. The eval stage runs once, after the last phase, against the initial student.

("Stage" is a step of the pipeline: prepare, score, train...; a phase runs those stages.)

``phase_config`` is the pure part: the config of one phase from the job's and the previous
phase's model.
"""

from __future__ import annotations

from pathlib import Path

from raydc.config import PhaseConfig, RaydcConfig, from_dict, phase_tree, roles
from raydc.infra.artifacts import StageError, StageResult
from raydc.infra.stage import TrainedModel

PHASES_DIR = "phases"


def phase_config(
    base: RaydcConfig, spec: PhaseConfig, root: Path, previous: TrainedModel | None
) -> RaydcConfig:
    """The config phase ``spec`` runs with: the job's sections with the phase's overrides,
    its own output folder, no eval (the job evaluates after the last phase), and, after a
    first phase, the previous phase's model and checkpoint."""
    tree = phase_tree(base, spec)
    tree["run"]["output_dir"] = str(Path(root) / PHASES_DIR / spec.name)
    tree["eval"]["enabled"] = False
    if previous is not None:
        initial = roles(from_dict(tree)).student
        tree["train"]["student"] = previous.model_dir
        if spec.scores_from == "previous":
            tree["score"]["student"] = previous.model_dir
        else:  # scored under the initial student; training starts from the previous model
            tree["train"]["scored_student"] = initial
        if spec.optimizer == "carry":
            if not previous.checkpoint:
                raise StageError(
                    f"the phase before {spec.name!r} reported no checkpoint to carry the "
                    "optimizer state from (set this phase's optimizer: fresh)"
                )
            tree["train"]["init_checkpoint"] = str(previous.checkpoint)
        if not tree["mixed_policy"]["student"]:
            tree["mixed_policy"]["student"] = previous.model_dir
    return from_dict(tree)


def _open(pipeline_cls, cfg, spec, root, previous, log, connect):
    prefix = f"[raydc] {spec.name}/"

    def phase_log(msg: str) -> None:
        log(msg.replace("[raydc] ", prefix, 1))

    return pipeline_cls(phase_config(cfg, spec, root, previous), log=phase_log, connect_ray=connect)


def run_phases(
    pipeline_cls, cfg: RaydcConfig, root: Path, log, connect: bool, until: str | None = None
):
    """Run the phases in order, each as a Pipeline of its own. Returns each phase's stage
    results (name -> StageResult; its model stage's model is the next phase's start, the
    last one's the job's); with ``until``, stops before that phase and returns its Pipeline
    instead, ready to run (``raydc tune --phase NAME``)."""
    names = [s.name for s in cfg.phases]
    if until is not None and until not in names:
        raise StageError(f"--phase {until!r}: no such phase (phases: {names})")
    previous: TrainedModel | None = None
    results: list[dict[str, StageResult]] = []
    for spec in cfg.phases:
        child = _open(pipeline_cls, cfg, spec, root, previous, log, connect)
        if spec.name == until:
            return child
        try:
            child.run_all()
            previous = TrainedModel.of(child.model_stage())
        finally:
            child.close()
        results.append(dict(child.results))
    return results
