"""raydc.pipeline.table: one stage table from which the job's order, each stage's needs and
the input checks derive; the roles read through raydc.config.roles."""

from __future__ import annotations

import pytest

from raydc.config import ConfigError, from_dict, roles
from raydc.pipeline.table import STAGES, closure, stage_named


def _cfg(**over):
    tree = {
        "data": {"path": "/d/t.jsonl"},
        "score": {"student": "/m/s", "teacher": "/m/t"},
        "eval": {"path": "/d/e.jsonl"},
    }
    for dotted, value in over.items():
        section, key = dotted.split("__")
        tree.setdefault(section, {})[key] = value
    return from_dict(tree)


def test_the_job_order_and_each_stages_needs_follow_the_config():
    names = [s.name for s in STAGES]
    assert names == [
        "generate", "mixed_policy", "prepare", "score", "select", "train", "tune", "on_policy",
        "eval",
    ]  # fmt: skip
    cfg = _cfg()
    assert [s.name for s in STAGES if s.enabled(cfg)] == ["prepare", "score", "train", "eval"]
    assert closure(cfg, ["eval"]) == ["prepare", "score", "train", "eval"]
    sel = _cfg(select__enabled=True, tune__enabled=True, tune__space={"weights.tau": [1, 2]})
    assert [s.name for s in STAGES if s.enabled(sel)] == [
        "prepare", "score", "select", "tune", "eval"
    ]  # fmt: skip
    assert closure(sel, ["eval"]) == ["prepare", "score", "select", "tune", "eval"]
    gen = _cfg(generate__enabled=True, generate__prompts="/d/p.jsonl")
    assert closure(gen, ["score"]) == ["generate", "prepare", "score"]
    mixed = _cfg(mixed_policy__enabled=True, generate__enabled=True, generate__prompts="/d/p.jsonl")
    assert stage_named("prepare").needs(mixed) == ("mixed_policy",)
    with pytest.raises(ValueError, match="no stage 'scorer'; the stages are"):
        stage_named("scorer")


def test_only_the_training_stages_resume_and_vouch_for_their_model_alone():
    assert {s.name for s in STAGES if s.resumes} == {"train", "tune", "on_policy"}
    assert {s.name for s in STAGES if s.vouch} == {"train", "tune", "on_policy"}
    assert {s.name for s in STAGES if not s.optional} == {"prepare", "score"}


def test_the_score_fingerprint_ignores_the_weighting_unless_inspection_stores_it():
    from raydc.infra.artifacts import StageResult

    up = {"prepare": StageResult("prepare", None, "fp-prepare", {}, False)}
    score = stage_named("score")
    tau1, tau2 = _cfg(weights__tau=1.0), _cfg(weights__tau=2.0)
    assert score.reads(tau1, up) == score.reads(tau2, up)  # a Tune trial never re-scores
    on1 = _cfg(weights__tau=1.0, score__inspection=True)
    on2 = _cfg(weights__tau=2.0, score__inspection=True)
    assert score.reads(on1, up) != score.reads(on2, up)  # the inspection table holds weights
    assert score.reads(on2, up)["weights"]["tau"] == 2.0


def test_roles_fill_each_empty_field_from_one_chain():
    r = roles(_cfg())
    assert (r.student, r.scored_student, r.tokenizer) == ("/m/s", "/m/s", "/m/s")
    assert (r.teacher, r.generate_teacher, r.mixed_teacher, r.mixed_student) == (
        "/m/t", "/m/t", "/m/t", "/m/s"
    )  # fmt: skip
    r = roles(
        _cfg(
            train__student="/m/s2",
            train__scored_student="/m/s1",
            data__tokenizer="tiny-bpe",
            generate__teacher="/m/g",
            mixed_policy__teacher="/m/mt",
        )
    )
    assert (r.student, r.scored_student, r.tokenizer) == ("/m/s2", "/m/s1", "tiny-bpe")
    assert (r.generate_teacher, r.mixed_teacher, r.mixed_student) == ("/m/g", "/m/mt", "/m/s2")


def test_the_input_checks_of_a_run_are_its_stages_checks(tmp_path):
    from raydc.pipeline.resolve import check_inputs

    cfg = _cfg()
    with pytest.raises(ConfigError, match=r"data.path='/d/t.jsonl': no such file"):
        check_inputs(cfg, ["prepare"])
    traces = tmp_path / "t.jsonl"
    traces.write_text("{}\n")
    cfg = _cfg(data__path=str(traces), score__student=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"score.student=.*: no such model folder"):
        check_inputs(cfg, ["prepare"])
    # eval alone checks eval's prompts, not its upstream's files, when they are done
    with pytest.raises(ConfigError, match=r"eval.path='/d/e.jsonl': no such file"):
        stage_named("eval").check(cfg)
    with pytest.raises(ConfigError, match=r"tune.space: empty"):
        # val_nll: no eval to run, so the check reaches the space
        stage_named("tune").check(_cfg(tune__enabled=False, tune__metric="val_nll"))


def _model(path, **config) -> str:
    """A model folder as the checks read it: a config.json and the tiny-bpe tokenizer
    (2,048 tokens), no weights."""
    import json
    import shutil

    from raydc.infra.models import tokenizer_path

    shutil.copytree(tokenizer_path("tiny-bpe"), path)
    base = {"vocab_size": 2048, "max_position_embeddings": 2048}
    (path / "config.json").write_text(json.dumps({**base, **config}))
    return str(path)


@pytest.fixture
def sampling_cfg(tmp_path):
    """Configs whose generate, mixed_policy and eval inputs exist, every model a folder."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question": "Q?", "answer": "#### 1", "response": "A. #### 1"}\n')
    student = _model(tmp_path / "student")

    def make(**over):
        tree = {
            "data": {"path": str(prompts)},
            "score": {"student": student, "teacher": None},
            "generate": {"prompts": str(prompts), "teacher": student, "max_new_tokens": 64},
            "mixed_policy": {"max_new_tokens": 64},
            "eval": {"path": str(prompts), "max_new_tokens": 64},
        }
        for dotted, value in over.items():
            section, key = dotted.split("__")
            tree.setdefault(section, {})[key] = value
        return from_dict(tree)

    return make


def test_each_sampling_engines_models_are_checked_for_vocabulary_before_any_stage(
    tmp_path, sampling_cfg
):
    """generate.teacher, mixed_policy's teacher and student and eval's student: a model whose
    vocabulary is smaller than its tokenizer fails the stage's check naming the field, as
    score.teacher does (generate.teacher used to fail 26 s in, inside a vLLM worker)."""
    small = _model(tmp_path / "small", vocab_size=100)
    want = r"=.*small': its tokenizer has 2,048 tokens but the model's vocab_size is 100"
    for stage, over, field in [
        ("generate", {"generate__teacher": small}, "generate.teacher"),
        ("mixed_policy", {"mixed_policy__teacher": small}, "mixed_policy.teacher"),
        ("mixed_policy", {"mixed_policy__student": small}, "mixed_policy.student"),
        ("eval", {"train__student": small}, "train.student"),  # the student eval.baseline runs
    ]:
        with pytest.raises(ConfigError, match="^" + field.replace(".", r"\.") + want):
            stage_named(stage).check(sampling_cfg(**over))
    # the student's vocabulary covers its tokenizer: every check passes
    for stage in ("generate", "mixed_policy", "eval"):
        stage_named(stage).check(sampling_cfg())


def test_an_engine_context_longer_than_the_models_fails_the_check_naming_the_field(
    tmp_path, sampling_cfg
):
    """A model of 256 positions under an engine of 512: vLLM refused it only once the
    engine started, in its own words; each sampling stage's check names its field."""
    short = _model(tmp_path / "short", max_position_embeddings=256)
    for stage, over, field in [
        ("generate", {"generate__teacher": short}, "generate.teacher"),
        ("mixed_policy", {"mixed_policy__teacher": short}, "mixed_policy.teacher"),
        ("mixed_policy", {"mixed_policy__student": short}, "mixed_policy.student"),
        ("eval", {"train__student": short}, "train.student"),
    ]:
        engine = f"{stage}.engine.max_model_len"
        too_long = sampling_cfg(**over, **{f"{stage}__engine": {"max_model_len": 512}})
        with pytest.raises(ConfigError) as e:
            stage_named(stage).check(too_long)
        assert str(e.value) == (
            f"{engine}=512: longer than the context of {field}={short!r} "
            f"(max_position_embeddings=256); set {engine} to at most 256 (a prompt and its "
            "max_new_tokens must fit in it)"
        )
        stage_named(stage).check(
            sampling_cfg(**over, **{f"{stage}__engine": {"max_model_len": 256}})
        )


def test_a_score_engine_context_that_cannot_hold_the_rows_or_exceeds_a_model_fails_the_check(
    tmp_path, sampling_cfg
):
    """score.engine.max_model_len below data.max_length rejected the longer prepared rows
    only once scoring reached them; above a scored model's context, vLLM refused it when
    the engine started. The score stage's check names the field either way."""
    field = "score.engine.max_model_len"
    with pytest.raises(ConfigError) as e:
        stage_named("score").check(sampling_cfg(score__engine={"max_model_len": 1024}))
    assert str(e.value) == (
        f"{field}=1024: shorter than data.max_length=2048, the longest row prepare keeps; "
        f"rows longer than 1024 tokens would be rejected as too_long only when scored; set "
        f"{field} to at least 2048 or lower data.max_length"
    )
    short = _model(tmp_path / "short", max_position_embeddings=256)
    student = sampling_cfg().score.student
    for over, model_field, model, length, limit in [
        ({}, "score.student", student, 4096, 2048),
        ({"score__teacher": short}, "score.teacher", short, 512, 256),
    ]:
        cfg = sampling_cfg(**over, score__engine={"max_model_len": length}, data__max_length=length)
        with pytest.raises(ConfigError) as e:
            stage_named("score").check(cfg)
        assert str(e.value) == (
            f"{field}={length}: longer than the context of {model_field}={model!r} "
            f"(max_position_embeddings={limit}); set {field} to at most {limit} (a prompt and "
            "its max_new_tokens must fit in it)"
        )
    # an engine as long as the rows and the models' context: every check passes
    stage_named("score").check(sampling_cfg())
    stage_named("score").check(
        sampling_cfg(
            score__teacher=short, score__engine={"max_model_len": 256}, data__max_length=256
        )
    )
