"""The job killed as an operator's cluster kills it, on the tiny example with real Ray,
Ray Data, Ray Train and DeepSpeed: the driver SIGKILLed inside the score stage, then
inside training, and rerun each time; the final result equals an uninterrupted run's,
with exact row counts. Then the run killed after its final checkpoint but before its
stage marker: the rerun reports the trained figures, not an empty window's, and a scored
shard deleted after the job finished is re-made before anything reads it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raydc.config import load_config
from raydc.infra.artifacts import HISTORY, MARKER, count_rows, data_files, release_output_dir
from raydc.pipeline import DEFAULT_CONFIG, Pipeline

pytestmark = pytest.mark.integration

JOB = Path(__file__).resolve().parents[2] / "jobs" / "distill.py"
OVERRIDES = [
    # The transformers scorer (tested against vLLM by the scoring tests) keeps this test
    # clear of vLLM engine starts; what is under test is the stage bookkeeping.
    "score.backend=transformers",
    "score.teacher=tiny:teacher",
    "data.limit=120",
    "select.enabled=false",
    "eval.enabled=false",
    "train.max_steps=12",
    "train.log_every=3",
    "train.checkpoint_every=3",
]


def _history(root: Path) -> list[str]:
    return [json.loads(x)["stage"] for x in (root / HISTORY).read_text().splitlines()]


def _spawn(out: Path, address: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(JOB), f"run.output_dir={out}", f"run.ray_address={address}"]
        + OVERRIDES,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the job ended before the fault point"
        assert time.time() < deadline, "the fault point never came"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_released(timeout: float = 120) -> None:
    """The killed driver's actors must be gone before the next run asks for the CPUs."""
    import ray

    deadline = time.time() + timeout
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < 2:
        time.sleep(0.5)


def test_driver_killed_in_score_and_in_train_resumes_to_the_same_result(ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    ref_out = tmp_path / "ref"
    ref_pipe = Pipeline(load_config(DEFAULT_CONFIG, [f"run.output_dir={ref_out}"] + OVERRIDES))
    ref_pipe.run_all()
    ref = {k: r.summary for k, r in ref_pipe.results.items()}
    release_output_dir(ref_pipe.root)

    out = tmp_path / "run"
    log = tmp_path / "job.log"
    # 1. Killed inside scoring: its pending file is there, its marker is not.
    _kill_when(_spawn(out, address, log), lambda: (out / ".score.pending.json").exists())
    assert not (out / "score" / MARKER).exists(), "score finished before the kill"
    _wait_released()

    # 2. Rerun, killed inside training once Ray Train has recorded a checkpoint (on disk
    # is not enough: an unrecorded one is not restored).
    def recorded() -> bool:
        snaps = (out / "train").rglob("checkpoint_manager_snapshot.json")
        return any("step_00000003" in f.read_text() for f in snaps)

    _kill_when(_spawn(out, address, log), recorded)
    assert not (out / "train" / MARKER).exists(), "train finished before the kill"
    _wait_released()
    # 3. Rerun to the end.
    proc = _spawn(out, address, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == {
        k: ref["prepare"][k] for k in ("rows_in", "rows_out", "rows_rejected")
    }
    assert summary["scored_rows"] == ref["score"]["rows_out"] == ref["prepare"]["rows_out"]
    m, want = summary["train_metrics"], ref["train"]["metrics"]
    assert m["step"] == want["step"] == 12
    assert m["loss"] == pytest.approx(want["loss"], abs=1e-4)
    # prepare ran once (killed runs never marked it twice); score twice (killed once).
    assert _history(out) == ["prepare", "score", "train"]
    marker = json.loads((out / "train" / MARKER).read_text())
    assert marker["summary"]["metrics"]["resumed_from_step"] in (3, 6, 9)

    # 4. Killed after the final checkpoint, before the marker (the marker removed, the
    # pending file put back): the rerun resumes at step 12 and reports its figures.
    (out / "train" / MARKER).unlink()
    (out / ".train.pending.json").write_text(json.dumps({"fingerprint": marker["fingerprint"]}))
    pipe = Pipeline(load_config(DEFAULT_CONFIG, [f"run.output_dir={out}"] + OVERRIDES))
    res = pipe.run("train")
    assert not res.skipped
    again = res.summary["metrics"]
    assert again["step"] == 12
    assert again["loss"] == pytest.approx(m["loss"], abs=1e-6)
    for k in ("grad_norm", "tokens_per_s"):
        assert again[k] == again[k] and again[k] > 0, k  # not NaN, not 0

    # 5. A scored shard deleted after the job: score re-makes it before train is reused.
    shards = [Path(f) for f in data_files(out / "score")]
    assert count_rows(shards) == ref["score"]["rows_out"]
    shards[0].unlink()
    logs: list[str] = []
    pipe = Pipeline(
        load_config(DEFAULT_CONFIG, [f"run.output_dir={out}"] + OVERRIDES), log=logs.append
    )
    assert pipe.run("train").skipped
    assert not pipe.results["score"].skipped
    assert any(f"{shards[0].name} is missing" in x for x in logs)
    # Re-made (Ray Data names its files afresh): every scored row is back.
    assert count_rows(data_files(out / "score")) == ref["score"]["rows_out"]
    assert pipe.results["score"].summary["rows_out"] == ref["score"]["rows_out"]
    release_output_dir(pipe.root)


def test_a_killed_vllm_engine_fails_its_actor_and_the_stage_still_finishes(
    ray_local, tiny_student, tmp_path
):
    """An engine OOM on a cluster, as seen from the actor: its EngineCore process SIGKILLed
    after the first batch was scored. The actor's watchdog exits it, Ray Data restarts the
    actor and retries the batch, and the stage ends with exact counts (it used to hang)."""
    import threading

    import psutil

    from raydc.config import from_dict
    from raydc.infra.artifacts import PARTS_DIR
    from raydc.prepare.stage import run_prepare
    from raydc.score.stage import run_score

    rows = []
    with open("raydc/assets/gsm8k/train.jsonl") as fh:
        for i, line in zip(range(40), fh):
            d = json.loads(line)
            rows.append(
                {"id": f"g{i}", "prompt": d["question"][:120], "response": d["answer"][:150]}
            )
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(
        {
            "data": {"path": str(tmp_path / "traces.jsonl"), "max_length": 256},
            "score": {
                "student": tiny_student,
                "backend": "vllm",
                "engine": {"max_model_len": 256, "cpus_per_engine": 0.5, "batch_size": 1},
            },
            "weights": {"preset": "sft"},
        }
    )
    prep = run_prepare(cfg, tmp_path / "prepared")
    parts = tmp_path / "scored" / PARTS_DIR
    killed: list[int] = []

    def kill_after_first_batch() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            scored = [p for p in parts.glob("stats-engstudent-*.json") if "init" not in p.name]
            if scored:
                for p in psutil.process_iter(["name", "cmdline"]):
                    text = (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])
                    if "EngineCore" in text:
                        p.kill()
                        killed.append(p.pid)
                        return
            time.sleep(0.1)

    t = threading.Thread(target=kill_after_first_batch, daemon=True)
    t.start()
    summary = run_score(cfg, tmp_path / "prepared", tmp_path / "scored")
    t.join(timeout=5)
    assert killed, "no engine was killed: the fault never happened"
    assert summary["rows_in"] == prep["rows_out"] == 40
    assert summary["rows_out"] + summary["rows_rejected"] == summary["rows_in"]
    assert summary["rows_out"] == 40


DRIVER = """
import os, sys, time
import ray
from raydc.infra.runtime import REAP_TOKEN_VAR, connect_ray

connect_ray(None)
@ray.remote
def one():
    return 1
assert ray.get(one.remote()) == 1  # a worker process besides the head's
print(os.environ[REAP_TOKEN_VAR], flush=True)
time.sleep(600)
"""


def test_a_sigkilled_driver_leaves_no_ray_process_behind(tmp_path):
    from raydc.infra.runtime import processes_with_token

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the driver runs in tmp_path: it imports this checkout's raydc, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(JOB.parents[1]), env.get("PYTHONPATH")]))
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], env=env, stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        token = driver.stdout.readline().strip()
        assert token, f"the driver did not start Ray (exit {driver.poll()})"
        started = processes_with_token(token)
        # GCS, raylet, the agents and the task's worker all inherited the token
        assert len(started) >= 4, started
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        # The reaper polls each second and gives SIGTERM 5 s. Without it the dashboard and
        # runtime-env agents were measured alive 60 s after the SIGKILL (~7 min seen once).
        t0 = time.monotonic()
        deadline = t0 + 40
        left = processes_with_token(token)
        while left and time.monotonic() < deadline:
            time.sleep(1)
            left = processes_with_token(token)
        names = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left}
        assert not left, f"still running 40 s after the driver's SIGKILL: {names}"
        print(f"no Ray process left {time.monotonic() - t0:.1f} s after the SIGKILL")
    finally:
        if driver.poll() is None:
            driver.kill()
