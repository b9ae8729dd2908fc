"""The DASD recipe from one config, on the shipped sumtask pair (real Ray, vLLM CPU,
DeepSpeed): generate at T=0.6 -> phase 1, generate at T=1.0 -> phase 2 resumed from phase
1 (weights and optimizer state, its traces scored under phase 1's student), a mixed-policy
phase whose traces are the phase-2 student's prefixes continued by the teacher, then eval."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from raydc.config import from_dict
from raydc.infra.artifacts import fingerprint_paths
from raydc.pipeline import Pipeline
from raydc.pipeline.resolve import PACKAGE_DIR

pytestmark = pytest.mark.integration

SUMTASK = PACKAGE_DIR / "assets" / "sumtask"
T1_STEPS, T2_STEPS = 4, 2
LOCAL = {"backend": "local", "max_model_len": 256, "cpus_per_engine": 0.5}


@pytest.fixture(scope="module")
def phased(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("phased")
    cfg = from_dict(
        {
            "run": {"output_dir": str(out)},
            "data": {"max_length": 256},
            "score": {
                "backend": "transformers",  # vLLM scoring has its own tests
                "student": str(SUMTASK / "models" / "student"),
                "teacher": None,  # generated traces carry the teacher's log-probs
                "engine": {"max_model_len": 256, "batch_size": 32},
            },
            "generate": {
                "prompts": str(SUMTASK / "eval.jsonl"),
                "teacher": str(SUMTASK / "models" / "teacher"),
                "num_prompts": 16,
                "max_new_tokens": 64,
                "engine": LOCAL,
            },
            "weights": {"preset": "das_token"},
            "train": {
                "num_workers": 1,
                "cpus_per_worker": 1.0,
                "zero_stage": 2,
                "lr": 1e-3,
                "warmup_steps": 0,
                "lr_schedule": "constant",
                "micro_batch_tokens": 1024,
                "log_every": 1,
                "checkpoint_every": 100,
            },
            "eval": {
                "path": str(SUMTASK / "eval.jsonl"),
                "num_prompts": 8,
                "max_new_tokens": 64,
                "baseline": False,
                "engine": LOCAL,
            },
            "phases": [
                {
                    "name": "t06",
                    "generate": {"enabled": True, "temperature": 0.6},
                    "train": {"max_steps": T1_STEPS},
                },
                {
                    # lr ~0: its model must be phase 1's to within the update's size
                    "name": "t10",
                    "generate": {"enabled": True, "temperature": 1.0, "seed": 1},
                    "train": {"max_steps": T2_STEPS, "lr": 1e-12},
                },
                {
                    "name": "mixed",
                    "mixed_policy": {
                        "enabled": True,
                        "traces": str(SUMTASK / "train.jsonl"),
                        "teacher": str(SUMTASK / "models" / "teacher"),
                        "num_prompts": 12,
                        "max_new_tokens": 64,
                        "require_correct": False,
                        "engine": LOCAL,
                    },
                    "train": {"max_steps": 1},
                },
            ],
        }
    )
    pipe = Pipeline(cfg, log=print)
    pipe.run_all()
    return pipe, out


def _weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def _adam_steps(ckpt: str) -> set[int]:
    """The optimizer's step counters in a DeepSpeed checkpoint (ZeRO-2, one rank)."""
    (f,) = Path(ckpt).rglob("*optim_states.pt")
    state = torch.load(f, map_location="cpu", weights_only=False)
    opt = state["optimizer_state_dict"]["base_optimizer_state"]
    return {int(s["step"]) for s in opt["state"].values()}


def test_the_temperature_phases_generate_at_their_temperature(phased):
    pipe, out = phased
    for name, t in (("t06", 0.6), ("t10", 1.0)):
        traces = pq.read_table(out / "phases" / name / "generate" / "traces.parquet")
        temps = traces.column("temperature").to_pylist()
        assert len(temps) > 0 and all(x == pytest.approx(t) for x in temps)
    assert pipe.results["phases/t06"].summary["steps"] == T1_STEPS


def test_phase_two_starts_where_phase_one_ended(phased):
    pipe, out = phased
    s1, s2 = pipe.results["phases/t06"].summary, pipe.results["phases/t10"].summary
    # its traces were scored under the phase-1 student
    import json

    manifest = json.loads((out / "phases" / "t10" / "score" / "manifest.json").read_text())
    assert manifest["student"]["fingerprint"] == fingerprint_paths(s1["model_dir"])
    # its first step started from phase 1's last weights (lr ~0 since), not the initial
    w0, w1, w2 = (
        _weights(d) for d in (SUMTASK / "models" / "student", s1["model_dir"], s2["model_dir"])
    )
    moved = max(float((w1[k].float() - w0[k].float()).abs().max()) for k in w1)
    kept = max(float((w2[k] - w1[k]).abs().max()) for k in w1)
    assert moved > 1e-4 and kept < 1e-6
    # and from its optimizer state: Adam's step counter went on from phase 1's
    assert s2["metrics"]["init_checkpoint_step"] == T1_STEPS
    assert _adam_steps(s1["checkpoint"]) == {T1_STEPS}
    assert _adam_steps(s2["checkpoint"]) == {T1_STEPS + T2_STEPS}


def test_the_mixed_policy_phase_continues_the_students_prefixes(phased):
    pipe, out = phased
    mp = out / "phases" / "mixed" / "mixed_policy"
    import json

    summary = json.loads((mp / "summary.json").read_text())
    assert summary["rows_in"] == 12
    assert summary["rows_in"] == summary["rows_out"] + summary["rows_rejected"]
    # the prefixes were written by the phase-2 student
    assert summary["student"] == pipe.results["phases/t10"].summary["model_dir"]
    rows = pq.read_table(mp / "traces.parquet").to_pylist()
    assert len(rows) == summary["rows_out"] > 0
    for r in rows:
        cut = r["student_prefix_chars"]
        assert 0 < cut < len(r["response"]) and r["student_prefix_tokens"] >= 1
        # every teacher log-prob belongs to the continuation, after the prefix
        assert len(r["teacher_logprobs"]) == len(r["teacher_token_ids"]) == r["num_tokens"] > 0
        assert all(s >= cut for s, _ in r["teacher_offsets"])
        assert all(v <= 0 and math.isfinite(v) for v in r["teacher_logprobs"])
    # they trained like any traces: the prepare stage read them, training ran
    prep = json.loads((out / "phases" / "mixed" / "prepare" / "summary.json").read_text())
    assert prep["rows_out"] == len(rows) and prep["given_teacher_rows"] == len(rows)
    assert pipe.results["phases/mixed"].summary["steps"] == 1


def test_eval_runs_once_after_the_last_phase(phased):
    pipe, out = phased
    ev = pipe.results["eval"].summary
    assert "pass@1" in ev and ev["model"] == pipe.results["phases/mixed"].summary["model_dir"]
    assert not (out / "phases" / "t06" / "eval").exists()


def test_a_phase_opens_on_its_own_for_tune_reusing_the_phases_before(phased):
    """``raydc tune --phase t10``: the phases before it are reused (nothing reruns), and
    the phase's own Pipeline starts from phase 1's model and checkpoint."""
    pipe, out = phased
    history = (out / "phases" / "t06" / "stages.jsonl").read_text()
    child = pipe.phase_pipeline("t10")
    try:
        s1 = pipe.results["phases/t06"].summary
        assert child.cfg.train.student == s1["model_dir"] == child.cfg.score.student
        assert child.cfg.train.init_checkpoint == str(s1["checkpoint"])
        assert child.run_until("train").skipped  # done before, same fingerprint
    finally:
        child.close()
    assert (out / "phases" / "t06" / "stages.jsonl").read_text() == history


def test_the_run_summary_reports_each_phases_rows_steps_and_loss(phased):
    from raydc.pipeline.summary import format_summary, summarize_run

    pipe, out = phased
    s = summarize_run(pipe.results, pipe.cfg)
    for name, steps in (("t06", T1_STEPS), ("t10", T2_STEPS), ("mixed", 1)):
        ph = s["phases"][name]
        prep = pipe.results[f"phases/{name}/prepare"].summary
        assert (ph["rows_in"], ph["rows_out"]) == (prep["rows_in"], prep["rows_out"])
        assert ph["steps"] == steps and math.isfinite(ph["loss"])
    text = format_summary(s)
    assert "phase t06" in text and "loss" in text
    assert s["train_metrics"]["loss"] == pipe.results["phases/mixed"].summary["metrics"]["loss"]
    assert "phases/t06" not in s["stages"] and "phases/t06/train" in s["stages"]
