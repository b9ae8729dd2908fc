"""raydc.pipeline.phases.phase_config: each DASD phase's config from the job's and the previous
phase's model."""

from __future__ import annotations

from pathlib import Path

import pytest

from raydc.config import ConfigError, from_dict
from raydc.infra.artifacts import StageError, StageResult
from raydc.infra.stage import TrainedModel
from raydc.method.weights import preset


def _job(**extra):
    return from_dict(
        {
            "run": {"output_dir": "/runs/job"},
            "data": {"path": "/d/traces.jsonl"},
            "score": {"student": "/m/student", "teacher": "/m/teacher"},
            "weights": {"preset": "das_token"},
            "train": {"lr": 1e-3, "max_steps": 10},
            "phases": [
                {
                    "name": "t06",
                    "generate": {"enabled": True, "prompts": "/d/p.jsonl", "temperature": 0.6},
                },
                {
                    "name": "t10",
                    "generate": {
                        "enabled": True,
                        "prompts": "/d/p.jsonl",
                        "temperature": 1.0,
                        "engine": {"batch_size": 8},
                    },
                    "train": {"max_steps": 20},
                    "weights": {"preset": "sft"},
                },
                {
                    "name": "mixed",
                    "mixed_policy": {"enabled": True},
                    "scores_from": "initial",
                    "optimizer": "fresh",
                },
            ],
            **extra,
        }
    )


def _prev(name, model="/runs/job/phases/x/train/model", ckpt="/ckpt/step_10"):
    made = StageResult(name, Path("/x"), "fp", {"model_dir": model, "checkpoint": ckpt}, False)
    return TrainedModel.of(made)


def test_the_first_phase_is_the_job_with_its_overrides():
    from raydc.pipeline.phases import phase_config

    job = _job()
    c = phase_config(job, job.phases[0], Path("/runs/job"), None)
    assert c.run.output_dir == "/runs/job/phases/t06"
    assert c.generate.enabled and c.generate.temperature == 0.6
    assert c.eval.enabled is False and c.phases == []
    assert (c.train.student, c.score.student) == ("", "/m/student")
    assert c.train.init_checkpoint is None and c.train.lr == 1e-3
    assert c.weights == job.weights


def test_a_later_phase_starts_from_the_previous_model_and_optimizer():
    from raydc.pipeline.phases import phase_config

    job = _job()
    c = phase_config(job, job.phases[1], Path("/runs/job"), _prev("t06"))
    assert c.train.student == c.score.student == "/runs/job/phases/x/train/model"
    assert c.train.init_checkpoint == "/ckpt/step_10" and c.train.scored_student is None
    assert c.mixed_policy.student == "/runs/job/phases/x/train/model"
    assert c.train.max_steps == 20 and c.train.lr == 1e-3  # the rest from the job
    # nested sections merge key by key; a preset replaces the weighting
    assert c.generate.engine.batch_size == 8 and c.generate.engine.max_model_len == 2048
    assert c.weights == preset("sft")


def test_scores_from_initial_and_a_fresh_optimizer():
    from raydc.pipeline.phases import phase_config

    job = _job()
    c = phase_config(job, job.phases[2], Path("/runs/job"), _prev("t10"))
    assert c.score.student == "/m/student"  # the traces are scored under the initial one
    assert c.train.student == "/runs/job/phases/x/train/model"
    assert c.train.scored_student == "/m/student"
    assert c.train.init_checkpoint is None
    with pytest.raises(StageError, match="no model_dir"):
        phase_config(job, job.phases[1], Path("/r"), _prev("t06", model=None))
    with pytest.raises(StageError, match="optimizer: fresh"):
        phase_config(job, job.phases[1], Path("/r"), _prev("t06", ckpt=None))


def test_bad_phase_lists_fail_at_load_naming_the_phase():
    with pytest.raises(ConfigError, match=r"phases\[0\] \(a\): unknown config field.*train.lrr"):
        from_dict({"phases": [{"name": "a", "train": {"lrr": 1}}]})
    with pytest.raises(ConfigError, match=r"phases\[1\].name='a': used by another phase"):
        from_dict({"phases": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match=r"phases\[0\].name='a/b'"):
        from_dict({"phases": [{"name": "a/b"}]})
    with pytest.raises(ConfigError, match=r"phases\[0\].optimizer='keep'"):
        from_dict({"phases": [{"name": "a", "optimizer": "keep"}]})
    with pytest.raises(ConfigError, match=r"phases\[0\].foo"):
        from_dict({"phases": [{"name": "a", "foo": 1}]})


def test_the_old_stages_key_fails_naming_phases():
    with pytest.raises(ConfigError, match=r"stages: renamed to phases"):
        from_dict({"stages": [{"name": "a"}]})
