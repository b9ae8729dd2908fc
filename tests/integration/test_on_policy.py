"""On-policy distillation rounds on the shipped sumtask pair (real Ray, vLLM CPU, DeepSpeed):
two rounds end to end, each round's student sampling from the last round's model and its
training resuming from the last round's checkpoint; the driver SIGKILLed inside round 1's
training and rerun to the same result; the EOS guard stopping a student that never ends
its answers; a teacher with another tokenizer."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from raydc.config import from_dict
from raydc.infra.artifacts import HISTORY, MARKER, StageError, release_output_dir
from raydc.pipeline import Pipeline
from raydc.pipeline.resolve import PACKAGE_DIR
from raydc.pipeline.summary import stage_line

pytestmark = pytest.mark.integration

SUMTASK = PACKAGE_DIR / "assets" / "sumtask"
LOCAL = {"backend": "local", "max_model_len": 256, "cpus_per_engine": 0.5}  # vLLM in the driver
STEPS = 4


def _tree(out: Path, teacher: str | None = None, **on_policy) -> dict:
    return {
        "run": {"output_dir": str(out)},
        "data": {"max_length": 256},
        "score": {
            "backend": "transformers",  # vLLM scoring has its own tests
            "student": str(SUMTASK / "models" / "student"),
            "teacher": teacher or str(SUMTASK / "models" / "teacher"),
            # two scoring actors of 0.5 CPU leave a CPU to Ray Data's file listing task
            "engine": {"max_model_len": 256, "batch_size": 32, "cpus_per_engine": 0.5},
        },
        "train": {
            "num_workers": 1,
            "cpus_per_worker": 1.0,
            "zero_stage": 2,
            "lr": 1e-4,
            "warmup_steps": 0,
            "lr_schedule": "constant",
            "micro_batch_tokens": 1024,
            "log_every": 1,
            "checkpoint_every": 1,
        },
        "eval": {"enabled": False},
        "on_policy": {
            "enabled": True,
            "prompts": str(SUMTASK / "eval.jsonl"),
            "num_prompts": 8,
            "rounds": 2,
            "n_samples": 2,
            "steps_per_round": STEPS,
            "max_new_tokens": 64,
            "engine": LOCAL,
            **on_policy,
        },
    }


def _history(root: Path) -> list[str]:
    return [json.loads(x)["stage"] for x in (root / HISTORY).read_text().splitlines()]


def _run(tree: dict) -> dict:
    pipe = Pipeline(from_dict(tree))
    try:
        return pipe.run_until("on_policy").summary
    finally:
        release_output_dir(pipe.root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("opd_ref")
    return out, _run(_tree(out))


def test_two_rounds_end_to_end(reference):
    out, summary = reference
    rounds = out / "on_policy" / "rounds"
    assert summary["rounds"] == 2 and summary["steps"] == 2 * STEPS
    r0, r1 = summary["per_round"]
    # round 1 samples from round 0's model and trains on from round 0's checkpoint
    assert r0["student"] == str(SUMTASK / "models" / "student")
    assert r1["student"] == r0["model_dir"]
    marker = json.loads((rounds / "1" / "train" / MARKER).read_text())
    assert marker["inputs"]["train"]["init_checkpoint"] == r0["checkpoint"]
    assert marker["inputs"]["train"]["student_ref"] == "current"
    assert marker["inputs"]["weights"]["transform"] == "advantage"
    assert marker["inputs"]["weights"]["baseline"] == "none"  # the default: tinker's form
    for r, rec in enumerate((r0, r1)):
        assert _history(rounds / str(r)) == ["sample", "prepare", "score", "train"]
        assert rec["samples"] == 8 * 2
        assert 0.0 <= rec["eos_rate"] <= 1.0 and rec["mean_length"] > 0
        assert rec["eos_rate"] + rec["truncation_share"] == pytest.approx(1.0)
        kept = pq.read_table(rounds / str(r) / "sample" / "samples.parquet")
        assert kept.num_rows == rec["stopped"] == rec["trained_samples"]
        assert rec["mean_reverse_kl"] is not None and rec["teacher_gap_tokens"] == 0
        assert rec["tokens"]["generated"] > 0 and rec["tokens"]["trained"] > 0
        parts = ("generation", "student_scoring", "teacher_scoring", "training")
        assert rec["flops"]["total"] == sum(rec["flops"][k] for k in parts) > 0
        assert rec["flops"]["training"] >= 6 * rec["params"]["student"] * rec["tokens"]["trained"]
        assert json.loads((rounds / str(r) / "round.json").read_text()) == rec
    assert summary["flops"]["total"] == r0["flops"]["total"] + r1["flops"]["total"]
    assert summary["model_dir"] == r1["model_dir"] and Path(r1["model_dir"]).is_dir()
    assert "FLOPs" in stage_line("on_policy", summary)
    # a rerun reuses the finished stage
    pipe = Pipeline(from_dict(_tree(out)))
    try:
        assert pipe.run_until("on_policy").skipped
    finally:
        release_output_dir(pipe.root)


DRIVER = """
import sys
from raydc.config import load_config
from raydc.pipeline import Pipeline
Pipeline(load_config(sys.argv[1], sys.argv[2:])).run_until("on_policy")
"""


def _spawn(config: Path, address: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(config), f"run.ray_address={address}"],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_a_driver_killed_mid_round_resumes_to_the_same_result(reference, ray_local, tmp_path):
    _, ref = reference
    address = ray_local.get_runtime_context().gcs_address
    out = tmp_path / "run"
    config = tmp_path / "opd.yaml"
    config.write_text(yaml.safe_dump(_tree(out)))
    log = tmp_path / "driver.log"
    train1 = out / "on_policy" / "rounds" / "1" / "train"

    def recorded() -> bool:  # round 1 has trained and recorded a checkpoint mid-round
        snaps = train1.rglob("checkpoint_manager_snapshot.json") if train1.exists() else []
        return any("step_00000002" in f.read_text() for f in snaps)

    proc = _spawn(config, address, log)
    deadline = time.time() + 1200
    while not recorded():
        assert proc.poll() is None, (
            f"the driver ended before the fault point: {log.read_text()[-3000:]}"
        )
        assert time.time() < deadline, "the fault point never came"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (train1 / MARKER).exists(), "round 1 finished before the kill"
    deadline = time.time() + 120  # the killed driver's actors release their CPUs
    while time.time() < deadline and ray_local.available_resources().get("CPU", 0) < 2:
        time.sleep(0.5)

    proc = _spawn(config, address, log)
    assert proc.wait(timeout=1200) == 0, log.read_text()[-3000:]
    marker = json.loads((out / "on_policy" / MARKER).read_text())
    got = marker["summary"]
    # round 1's finished stages were reused, its training resumed from its checkpoint
    assert _history(out / "on_policy" / "rounds" / "1") == ["sample", "prepare", "score", "train"]
    resumed = json.loads((train1 / MARKER).read_text())["summary"]["metrics"]
    assert resumed["resumed_from_step"] >= 2
    for a, b in zip(got["per_round"], ref["per_round"]):
        for k in ("samples", "stopped", "truncated", "steps"):
            assert a[k] == b[k], k
        assert a["mean_reverse_kl"] == pytest.approx(b["mean_reverse_kl"], abs=1e-3)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)
        assert a["tokens"]["trained"] == b["tokens"]["trained"]


def test_the_eos_guard_stops_a_student_that_never_ends(tmp_path, ray_local):
    # 4 tokens cannot hold a sumtask answer: nearly every sample is cut at the budget (at
    # T = 1 the untrained student may still end one early: 1 of 16 did on this machine)
    tree = _tree(tmp_path, max_new_tokens=4, eos_rate_min=0.5)
    with pytest.raises(StageError, match=r"on_policy\.eos_rate_min=0\.5: round 0's samples"):
        _run(tree)
    round0 = tmp_path / "on_policy" / "rounds" / "0"
    assert (round0 / "sample" / MARKER).exists()  # the samples are kept, counted
    assert not (round0 / "score").exists()  # stopped before the teacher scored anything
    sampled = json.loads((round0 / "sample" / MARKER).read_text())["summary"]
    assert sampled["samples"] == sampled["truncated"] + sampled["stopped"] == 16
    assert sampled["eos_rate"] == sampled["stopped"] / 16 < 0.5 and sampled["truncated"] > 8


def test_a_teacher_with_another_tokenizer(tmp_path, ray_local, tiny_teacher_other_tokenizer):
    # with the advantage's baseline: the step's mean over the teacher-known tokens, in the
    # DeepSpeed worker, where another tokenizer leaves gaps
    tree = _tree(tmp_path, teacher=tiny_teacher_other_tokenizer, rounds=1, baseline="batch_mean")
    summary = _run(tree)
    (rec,) = summary["per_round"]
    assert rec["steps"] == STEPS and rec["mean_reverse_kl"] is not None
    assert rec["teacher_gap_tokens"] >= 0 and rec["loss_tokens"] > rec["teacher_gap_tokens"]
    assert rec["tokens"]["teacher_scored"] > 0
    train = tmp_path / "on_policy" / "rounds" / "0" / "train"
    marker = json.loads((train / MARKER).read_text())
    assert marker["inputs"]["weights"]["baseline"] == "batch_mean"
    steps = [json.loads(x) for x in (train / "metrics.jsonl").read_text().splitlines()]
    baselines = {m["step"]: m["advantage_baseline"] for m in steps if "advantage_baseline" in m}
    assert sorted(baselines) == list(range(1, STEPS + 1))
    assert all(math.isfinite(b) for b in baselines.values())
    assert rec["advantage_baseline"] == baselines[STEPS]
