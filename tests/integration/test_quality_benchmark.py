"""Smoke run of jobs/benchmark_quality.py (--quick): every stage runs for real (teacher
and student training on raydc's loss, vLLM CPU sampling with log-probs, scoring, DASD
selection, the tune search, every arm), and the outputs are well-formed. A second call
with --resume and one more seed reuses the finished stages and runs only the new seed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "benchmark_quality.py"
ARMS = ["sft", "dft", "discord", "das_token", "iw_seq", "tis", "dasd_sft", "tune"]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(JOB), "--quick", "--out", str(out), "--budgets", "2,4", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.integration
def test_quick_benchmark_end_to_end_and_resume(tmp_path):
    out = tmp_path / "q"
    _run(out, "--seeds", "1")
    for name in ("results.json", "table.md", "results.png", "load.json", "log.txt", "state.json"):
        assert (out / name).is_file(), name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "models" / "teacher" / "config.json").is_file()
    assert (out / "models" / "student_init" / "model.safetensors").is_file()

    res = json.loads((out / "results.json").read_text())
    assert res["arms"] == ARMS and res["budgets"] == [2, 4] and res["student_ref"] == "current"
    rows = res["rows"]
    keys = {(r["traces"], r["arm"], r["budget"]) for r in rows}
    assert keys == {(t, a, b) for t in ("clean", "noisy") for a in ARMS for b in (2, 4)}
    for r in rows:
        assert r["seeds"] == 1
        for k in (
            "greedy_acc",
            "sampled_acc",
            "derailed_greedy",
            "forward_share",
            "side_acc",
            "tf_predicted",
        ):
            assert 0.0 <= r[k] <= 1.0, (k, r)
        assert -1.0 <= r["exposure_gap"] <= 1.0
    # The teacher's log-probs came back from vLLM and match transformers.
    check = res["traces"]["vllm_logprob_check_max_abs"]
    assert set(check) == {"1.0", "1.5"} and all(v < 1e-3 for v in check.values())
    stats = res["traces"]["stats"]
    assert stats["clean_first"]["rows"] == stats["clean_dasd"]["rows"] == 24
    assert stats["noisy_first"]["temperature"] == 1.5
    assert math.isfinite(stats["clean_first"]["student_logprob_mean"])
    # The tune arm's choice is one point of the documented space.
    chosen = res["tune"]["chosen"]["clean"]
    assert chosen["sign"] in (1, -1) and chosen["tau"] in (0.5, 1.0, 2.0, 4.0)
    assert len(res["tune"]["trials"]["clean"]) == 2
    # The load was recorded, and the run says whether it was contended.
    assert res["sessions"][0]["load"]["samples"] > 0
    assert isinstance(res["contended"], bool)

    table = (out / "table.md").read_text().strip().splitlines()
    assert table[0].startswith("| traces | steps | arm | seeds | greedy acc.")
    assert len(table) == 2 + 2 * len(ARMS) * 2

    # Resume with one more seed: no stage reruns, only seed 1's runs.
    proc = _run(out, "--seeds", "2", "--resume")
    log = proc.stdout
    assert "running 16 fine-tuning runs on 2 workers (16 done)" in log
    res2 = json.loads((out / "results.json").read_text())
    assert all(r["seeds"] == 2 for r in res2["rows"])
    assert len(res2["sessions"]) == 2
    assert res2["traces"]["sampling_s"] == res["traces"]["sampling_s"]  # not resampled
