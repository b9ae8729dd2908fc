"""A tiny configuration of jobs/benchmark_quality.py, on its real code path, in each of the
three regimes (the shipped sumtask pair; bench/quality/assets' student and its terse and
long teachers): teacher traces at T = 1 and 0.6 with DASD selection, the initial
measures, two core arms (one with EAFT's entropy gate, fed by the training forward's
entropy), on-policy distillation (a round of the student's own samples scored by the
teacher) and one arm chosen from them (the riskiest preset with uniform weights at first),
every measure and the FLOPs so far at each eval step, each regime's report with its plots,
and the overview (docs/results.md and docs/results.json over the regimes, the arms' FLOPs
and the on-policy arm at sft's FLOPs); a second invocation reuses the regimes already
run."""

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
ARMS = ["sft", "eaft", "opd", "risky_warmup"]
REGIMES = ("knowledge", "capacity", "long")


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
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for regime in REGIMES:
        _check_regime(out / regime, docs, regime)
    overview = json.loads((docs / "results.json").read_text())["regimes"]
    assert set(overview) == set(REGIMES)
    for r in overview.values():
        assert set(r["arms"]) == set(ARMS) and r["entropy_arms"] == ["eaft"]
        for arm in r["arms"].values():
            assert arm["seeds"] == 1 and 0.0 <= arm["mean"] <= 1.0 and arm["sd"] == 0.0
            assert arm["flops"] > 0
        assert r["opd_arms"] == ["opd"] and r["matched_flops"]["opd"]["step"] in (0, 2, 4)
    md = (docs / "results.md").read_text()
    assert all(f"[{r}](results/{r}.md)" in md for r in REGIMES)
    # Run again: every regime is reused, nothing retrained.
    before = {r: (out / r / "results.json").stat().st_mtime_ns for r in REGIMES}
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing") == 3
    assert {r: (out / r / "results.json").stat().st_mtime_ns for r in REGIMES} == before


def _check_regime(out, docs, regime):
    for name in ("results.json", "table.md", "learning_curves.png", "weights.png", "log.txt"):
        assert (out / name).is_file(), name
    for name in (f"{regime}.md", f"{regime}_curves.png", f"{regime}_weights.png"):
        assert (docs / "results" / name).is_file(), name
    assert (docs / "results" / f"{regime}_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads((out / "results.json").read_text())
    assert res["regime"]["name"] == regime
    assert res["arms"] == ARMS
    assert {(r["arm"], r["step"]) for r in res["rows"]} == {(a, s) for a in ARMS for s in (0, 2, 4)}
    for r in res["rows"]:
        assert r["seeds"] == 1
        for k in ("greedy_acc", "sampled_acc", "prior_acc", "tf_predicted", "derailed_sampled"):
            assert 0.0 <= r[k] <= 1.0, (k, r)
        assert math.isfinite(r["exacc_16"])  # every quick eval sample reaches 16 tokens
    # The initial student is step 0 of every arm and knows what it was taught.
    init = [r for r in res["rows"] if r["step"] == 0]
    assert len({r["greedy_acc"] for r in init}) == 1 and init[0]["prior_acc"] > 0.8
    # The riskiest preset was chosen from the core arms' results.
    assert res["chosen"]["risky"] == "eaft" and res["chosen"]["best"] == "eaft"
    stats = res["traces"]["stats"]
    assert stats["t10"]["rows"] == stats["t06"]["rows"] == stats["dasd"]["rows"] == 40
    assert res["verdict"]["steps"] == 4 and "sft" in res["verdict"]["vs_sft"]
    assert res["load"]["samples"] > 0 and isinstance(res["contended"], bool)
    assert len(res["weight_hists"]["eaft"]) == len(res["weight_bins"]) - 1
    # FLOPs grow with the steps; opd's one round: 4 steps' prompts, truncated ones dropped.
    for arm in ARMS:
        flops = [
            r["flops"] for r in sorted(res["rows"], key=lambda r: r["step"]) if r["arm"] == arm
        ]
        assert flops[0] == 0 and flops[1] < flops[2], (arm, flops)
    op = res["on_policy"]["opd"]
    assert op["rounds"] == 1 and op["samples"] == 4 * res["plan"]["sizes"]["batch_size"]
    assert op["trained_samples"] + op["truncated"] == op["samples"] and op["trained_samples"] > 0
    assert res["flops_parts"]["opd"]["student_scoring"] == 0
    assert (out / "flops_curves.png").is_file()
    md = (docs / "results" / f"{regime}.md").read_text()
    assert "ExAccErr(l) = ( R(l) - l * eps(l) ) / ( l * eps(l) ) * 100 %" in md
    assert res["command"] in md
