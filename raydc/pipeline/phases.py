"""Staged training (DASD's temperature-scheduled learning) from one config.

``stages:`` lists the stages; each overrides some of the job's sections (its traces: a
``data.path``, ``generate`` settings or ``mixed_policy`` settings; its step budget, learning
rate, weighting, selection) and is run as a job of its own under
``<run.output_dir>/stages/<name>/`` (generate / mixed_policy -> prepare -> score -> select ->
train or tune), each step fingerprinted and resumable like any stage. Stage k+1 starts from
stage k: its student is stage k's exported model, its optimizer state is stage k's last
(``optimizer: carry``; the step count, data position and learning-rate schedule start
anew), its traces are scored under stage k's student (``scores_from: previous``) or the
initial one (``initial``), and a mixed-policy stage has stage k's student write the
prefixes. The eval stage runs once, after the last stage, against the initial student.

``stage_config`` is the pure part: the config of one stage from the job's and the previous
stage's result.
"""

from __future__ import annotations

from pathlib import Path

from raydc.config import RaydcConfig, StageConfig, from_dict, stage_tree
from raydc.infra.artifacts import StageError, StageResult

STAGES_DIR = "stages"


def stage_config(
    base: RaydcConfig, spec: StageConfig, root: Path, previous: StageResult | None
) -> RaydcConfig:
    """The config stage ``spec`` runs with: the job's sections with the stage's overrides,
    its own output folder, no eval (the job evaluates after the last stage), and, after a
    first stage, the previous stage's model and checkpoint."""
    tree = stage_tree(base, spec)
    tree["run"]["output_dir"] = str(Path(root) / STAGES_DIR / spec.name)
    tree["eval"]["enabled"] = False
    if previous is not None:
        model = previous.summary.get("model_dir")
        if not model:
            raise StageError(f"stage before {spec.name!r} reported no model_dir to start from")
        initial = tree["train"]["student"] or tree["score"]["student"]
        tree["train"]["student"] = model
        if spec.scores_from == "previous":
            tree["score"]["student"] = model
        else:  # scored under the initial student; training starts from the previous model
            tree["train"]["scored_student"] = initial
        if spec.optimizer == "carry":
            ckpt = previous.summary.get("checkpoint") or previous.summary.get("best_checkpoint")
            if not ckpt:
                raise StageError(
                    f"stage before {spec.name!r} reported no checkpoint to carry the "
                    "optimizer state from (set this stage's optimizer: fresh)"
                )
            tree["train"]["init_checkpoint"] = str(ckpt)
        if not tree["mixed_policy"]["student"]:
            tree["mixed_policy"]["student"] = model
    return from_dict(tree)


def _open(pipeline_cls, cfg, spec, root, previous, log, connect):
    prefix = f"[raydc] {spec.name}/"

    def stage_log(msg: str) -> None:
        log(msg.replace("[raydc] ", prefix, 1))

    return pipeline_cls(stage_config(cfg, spec, root, previous), log=stage_log, connect_ray=connect)


def run_stages(
    pipeline_cls, cfg: RaydcConfig, root: Path, log, connect: bool, until: str | None = None
):
    """Run the stages in order, each as a Pipeline of its own. Returns their model stages'
    results (the last one's model is the job's); with ``until``, stops before that stage
    and returns its Pipeline instead, ready to run (``raydc tune --stage NAME``)."""
    names = [s.name for s in cfg.stages]
    if until is not None and until not in names:
        raise StageError(f"--stage {until!r}: no such stage (stages: {names})")
    previous, results = None, []
    for spec in cfg.stages:
        child = _open(pipeline_cls, cfg, spec, root, previous, log, connect)
        if spec.name == until:
            return child
        try:
            child.run_all()
            previous = child.model_stage()
        finally:
            child.close()
        results.append(previous)
    return results
