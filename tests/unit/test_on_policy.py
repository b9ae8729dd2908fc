"""raydc.on_policy's pure parts and wiring (the rounds themselves: the integration test)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc.config import ConfigError, from_dict
from raydc.engines.sampler import prompt_items
from raydc.infra.artifacts import StageResult
from raydc.on_policy import (
    round_prompts,
    round_record,
    round_seed,
    round_tree,
    safetensors_params,
    store_reverse_kl,
    summarize_rounds,
    trained_tokens,
)
from raydc.pipeline.table import stage_named


def _cfg(**on_policy):
    return from_dict(
        {
            "score": {"student": "/m/s", "teacher": "/m/t"},
            "train": {"lr": 3e-4, "max_steps": 100, "grad_accum": 2},
            "on_policy": {"prompts": "/d/p.jsonl", **on_policy},
        }
    )


def test_round_prompts_and_seeds():
    assert round_prompts(5, None, 3) == [0, 1, 2, 3, 4]
    assert round_prompts(5, 9, 1) == [0, 1, 2, 3, 4]
    assert round_prompts(5, 2, 0) == [0, 1]
    assert round_prompts(5, 2, 2) == [4, 0]  # wraps around
    assert round_prompts(5, 3, 1) == [3, 4, 0]
    assert round_seed(7, 0) == 7 and round_seed(7, 2) == 7 + 2 * 1_000_003


def test_trained_tokens_sums_each_reports_window_once():
    lines = [
        {"step": 2, "tokens_per_s": 100.0, "step_time_s": 0.5},  # 2 steps x 50 tokens
        {"step": 4, "tokens_per_s": 40.0, "step_time_s": 1.0},  # 2 x 40
        # a resume from step 2's checkpoint reports its figures, then steps 3-4 again
        {"step": 2, "tokens_per_s": 100.0, "step_time_s": 0.5, "resumed_from_step": 2},
        {"step": 4, "tokens_per_s": 30.0, "step_time_s": 1.0},  # 2 x 30, replaces the above
        {"step": 5, "tokens_per_s": float("nan"), "step_time_s": 1.0},  # nothing measured
    ]
    assert trained_tokens(lines) == 100 + 60
    # The trainer's records hold each window's tokens, and every record its resume step.
    exact = [
        {"step": 1, "tokens": 836, "tokens_per_s": 1.0, "step_time_s": 1.0, "resumed_from_step": 0},
        {"step": 2, "tokens": 800, "tokens_per_s": 1.0, "step_time_s": 1.0, "resumed_from_step": 0},
        {"step": 2, "tokens": 800, "tokens_per_s": 1.0, "step_time_s": 1.0, "resumed_from_step": 2},
        {"step": 3, "tokens": 790, "tokens_per_s": 1.0, "step_time_s": 1.0, "resumed_from_step": 2},
    ]
    assert trained_tokens(exact) == 836 + 800 + 790
    assert trained_tokens([]) == 0


def test_safetensors_params_count_the_models_parameters(tiny_student):
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_student, torch_dtype=torch.float32)
    n = sum(p.numel() for p in lm.parameters())  # tied weights counted once, as stored
    assert safetensors_params(tiny_student) == n
    assert safetensors_params(Path(tiny_student) / "nowhere") is None


def test_round_tree_is_the_jobs_config_for_one_round(tmp_path):
    cfg = _cfg(steps_per_round=3, advantage_coef=0.5, ratio_max=4.0, train={"lr": 1e-5})
    rc = from_dict(round_tree(cfg, tmp_path / "r1", "/m/round0", "/m/t", "/ck/round0"))
    assert rc.run.output_dir == str(tmp_path / "r1")
    assert rc.data.path == str(tmp_path / "r1" / "sample" / "samples.parquet")
    assert (rc.data.schema, rc.data.format) == ("prompt_response", "parquet")
    assert (rc.score.student, rc.score.teacher, rc.score.teacher_temperature) == (
        "/m/round0",
        "/m/t",
        1.0,
    )
    t = rc.train
    assert (t.student, t.student_ref, t.max_steps, t.init_checkpoint) == (
        "/m/round0",
        "current",
        3,
        "/ck/round0",
    )
    assert t.lr == 1e-5 and t.grad_accum == 2  # on_policy.train over the job's train
    w = rc.weights
    assert (w.transform, w.c, w.w_max, w.normalization) == ("advantage", 0.5, 4.0, "none")
    assert not (rc.eval.enabled or rc.tune.enabled or rc.on_policy.enabled or rc.phases)
    lora = _cfg(train={"lora": {"r": 4}})
    assert (
        from_dict(round_tree(lora, tmp_path, "/m/a", "/m/t", "/ck")).train.init_checkpoint is None
    )


def test_the_stage_needs_the_trained_model_only_when_it_starts_from_it():
    stage = stage_named("on_policy")
    assert stage.needs(_cfg()) == ()
    assert stage.needs(_cfg(start="trained")) == ("train",)
    assert stage.resumes and stage.vouch is not None and stage.optional
    assert not stage.enabled(_cfg()) and stage.enabled(_cfg(enabled=True))
    # eval grades the rounds' model when they are on
    assert stage_named("eval").needs(_cfg(enabled=True)) == ("on_policy",)
    assert stage_named("eval").needs(_cfg()) == ("train",)


def test_the_fingerprint_follows_the_section_and_the_start():
    stage = stage_named("on_policy")
    a, b = _cfg(), _cfg(rounds=3)
    assert stage.reads(a, {}) != stage.reads(b, {})
    up1 = {"train": StageResult("train", None, "fp1", {}, False)}
    up2 = {"train": StageResult("train", None, "fp2", {}, False)}
    t = _cfg(start="trained")
    assert stage.reads(t, up1) != stage.reads(t, up2)


def test_check_names_the_missing_fields(tmp_path, tiny_teacher):
    stage = stage_named("on_policy")
    with pytest.raises(ConfigError, match=r"on_policy\.prompts: not set"):
        stage.check(from_dict({"score": {"teacher": "/m/t"}}))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    with pytest.raises(ConfigError, match=r"on_policy\.teacher: not set"):
        stage.check(from_dict({"on_policy": {"prompts": str(prompts)}}))
    with pytest.raises(ConfigError, match=r"on_policy\.student"):
        stage.check(from_dict({"on_policy": {"prompts": str(prompts), "teacher": tiny_teacher}}))


def test_prompt_items_reject_empty_and_repeated_prompts():
    records = [("f:0", {"id": "a", "q": "x"}), ("f:1", {"id": "a", "q": "y"}), ("f:2", {"q": ""})]
    items, rejects = prompt_items(records, "q", "id", "on_policy")
    assert items == [{"row_id": "a", "message": "x"}]
    assert [r["reason"].split(":")[0] for r in rejects] == ["duplicate_id", "missing_prompt"]
    assert [(r["stage"], r["field"]) for r in rejects] == [("on_policy", "id"), ("on_policy", "q")]
    # generate's form: the extra columns' strings ride along (None where not a string)
    records = [("f:0", {"id": "a", "q": "x", "answer": "7", "n": 3})]
    items, _ = prompt_items(records, "q", "id", "generate", ["answer", "n"])
    assert items == [{"row_id": "a", "message": "x", "extra": {"answer": "7", "n": None}}]


def _store(folder: Path) -> None:
    folder.mkdir(parents=True)
    t = pa.table(
        {
            "student_logprobs": [[0.0, -1.0, -2.0], [0.0, -0.5]],
            "teacher_logprobs": [[0.0, -1.5, -2.0], [0.0, -0.5]],
            "loss_mask": [[False, True, True], [False, True]],
            "teacher_mask": [[True, True, False], [True, True]],
        }
    )
    pq.write_table(t, folder / "part-0.parquet")


def test_round_record_hand_computed(tmp_path):
    _store(tmp_path / "score")
    kl = store_reverse_kl(tmp_path / "score")
    # known loss tokens: (-1 + 1.5) and (-0.5 + 0.5): mean 0.25; one gap
    assert kl["mean_reverse_kl"] == pytest.approx(0.25) and kl["teacher_gap_tokens"] == 1
    (tmp_path / "train").mkdir()
    lines = [{"step": 2, "tokens_per_s": 50.0, "step_time_s": 1.0}]
    (tmp_path / "train" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    sampled = {
        "samples": 4,
        "mean_length": 3.0,
        "eos_rate": 0.5,
        "truncation_share": 0.5,
        "stopped": 2,
        "truncated": 2,
        "rows_out": 2,
        "generated_tokens": 12,
        "prompt_tokens": 8,
        "student": "/m/s",
    }
    scored = {
        "out_dir": tmp_path / "score",
        "summary": {"engines": {"student": {"tokens": 9}, "teacher": {"tokens": 11}}},
    }
    trained = {
        "out_dir": tmp_path / "train",
        "steps": 2,
        "metrics": {"loss": 0.1},
        "model_dir": "/o/model",
        "checkpoint": "/o/ck",
        "grad_accum": 2,
    }
    rec = round_record(0, sampled, scored, trained, {"student": 10, "teacher": 100})
    assert rec["tokens"] == {
        "generated": 12,
        "prompt_prefill": 8,
        "student_scored": 9,
        "teacher_scored": 11,
        "trained": 100,
        "live_forward": 100,  # grad_accum 2: a no-grad forward per micro-batch
    }
    assert rec["flops"]["generation"] == 2 * 10 * 20
    assert rec["flops"]["teacher_scoring"] == 2 * 100 * 11
    assert rec["flops"]["training"] == 6 * 10 * 100 + 2 * 10 * 100
    assert rec["flops"]["total"] == 400 + 180 + 2200 + 8000
    assert rec["mean_reverse_kl"] == pytest.approx(0.25) and rec["teacher_gap_tokens"] == 1
    both = summarize_rounds([rec, dict(rec, round=1, model_dir="/o/m1", eos_rate=0.75)])
    assert both["rounds"] == 2 and both["steps"] == 4 and both["model_dir"] == "/o/m1"
    assert both["flops"]["total"] == 2 * rec["flops"]["total"]
    assert both["tokens"]["trained"] == 200 and both["eos_rate"] == 0.75
    assert summarize_rounds([dict(rec, flops=None)])["flops"] is None
