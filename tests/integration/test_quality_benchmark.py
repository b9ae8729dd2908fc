"""A tiny configuration of jobs/benchmark_quality.py, on its real code path: the shipped
sumtask pair, teacher traces at T = 1 and 0.6 with DASD selection, the initial measures,
two core arms and one arm chosen from them (the riskiest preset with uniform weights at
first), every measure at each eval step, the report with its plots and results.md."""

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
ARMS = ["sft", "das_token", "risky_warmup"]


@pytest.mark.integration
def test_tiny_benchmark_end_to_end(tmp_path):
    out, docs = tmp_path / "q", tmp_path / "docs"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [
        sys.executable,
        str(JOB),
        "--quick",
        "--out",
        str(out),
        "--docs",
        str(docs),
        "--seeds",
        "1",
        "--evals",
        "2,4",
        "--arms",
        ",".join(ARMS),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.json", "table.md", "learning_curves.png", "weights.png", "log.txt"):
        assert (out / name).is_file(), name
    for name in ("results.md", "results_curves.png", "results_weights.png"):
        assert (docs / name).is_file(), name
    assert (docs / "results_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads((out / "results.json").read_text())
    assert res["arms"] == ARMS
    assert {(r["arm"], r["step"]) for r in res["rows"]} == {(a, s) for a in ARMS for s in (0, 2, 4)}
    for r in res["rows"]:
        assert r["seeds"] == 1
        for k in ("greedy_acc", "sampled_acc", "prior_acc", "tf_predicted", "derailed_sampled"):
            assert 0.0 <= r[k] <= 1.0, (k, r)
        assert math.isfinite(r["exacc_16"])  # every quick eval sample reaches 16 tokens
    # The initial student is step 0 of every arm and knows its own codes.
    init = [r for r in res["rows"] if r["step"] == 0]
    assert len({r["greedy_acc"] for r in init}) == 1 and init[0]["prior_acc"] > 0.8
    # The riskiest preset was chosen from the core arms' results.
    assert res["chosen"]["risky"] == "das_token" and res["chosen"]["best"] == "das_token"
    stats = res["traces"]["stats"]
    assert stats["t10"]["rows"] == stats["t06"]["rows"] == stats["dasd"]["rows"] == 40
    assert res["verdict"]["steps"] == 4 and "sft" in res["verdict"]["vs_sft"]
    assert res["load"]["samples"] > 0 and isinstance(res["contended"], bool)
    assert len(res["weight_hists"]["das_token"]) == len(res["weight_bins"]) - 1
    md = (docs / "results.md").read_text()
    assert "ExAccErr(l) = ( R(l) - l * eps(l) ) / ( l * eps(l) ) * 100 %" in md
    assert res["command"] in md
