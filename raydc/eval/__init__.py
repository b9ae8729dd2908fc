"""Evaluation: vLLM generation on held-out prompts, final-answer graders, metrics.

``run_eval(cfg, model_dir, out_dir)`` is the stage (docs/contracts.md). Importing this
package is light: vLLM and Ray load only when generation starts.
"""

from __future__ import annotations


def run_eval(cfg, model_dir, out_dir, engine=None) -> dict:
    """See :func:`raydc.eval.stage.run_eval`."""
    from raydc.eval.stage import run_eval as _run_eval

    return _run_eval(cfg, model_dir, out_dir, engine=engine)


def run_eval_stage(cfg, model_dir, out_dir, initial_dir=None) -> dict:
    """See :func:`raydc.eval.stage.run_eval_stage`."""
    from raydc.eval.stage import run_eval_stage as _run_eval_stage

    return _run_eval_stage(cfg, model_dir, out_dir, initial_dir)


__all__ = ["run_eval", "run_eval_stage"]
