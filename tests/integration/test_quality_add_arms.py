"""jobs/benchmark_quality.py --add-arms on a folder of the format written before FLOPs were
counted: a quick run of the current code (its records carry FLOPs, its trace sets their
per-row costs, its data.pt the trace prompts) is copied and stripped of all three; adding
the on-policy arms to the copy first restores each exactly (the FLOPs replayed from the
jobs' seeds, the costs recomputed, the dasd candidates sampled again, the prompts drawn
again), then runs the added arms and rewrites the report, the run's own figures kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "benchmark_quality.py"
ARMS = ["sft", "das_token", "dasd_sft", "stages_sft", "stages_best"]  # das_token: the best
ADDED = ["opd", "offline_opd"]


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(JOB), "--regime", "knowledge", "--workers", "1", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _strip_to_the_old_format(folder: Path) -> None:
    data = torch.load(folder / "data.pt", weights_only=False)
    del data["trace_prompts"]
    torch.save(data, folder / "data.pt")
    for path in (folder / "traces").glob("*.pt"):
        ts = torch.load(path, weights_only=False)
        ts["meta"] = {k: v for k, v in ts["meta"].items() if k != "row_flops"}
        torch.save(ts, path)
    lines = (folder / "records.jsonl").read_text().splitlines()
    old = [json.loads(x) for x in lines]
    old = [{k: v for k, v in r.items() if k not in ("flops", "flops_parts")} for r in old]
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    res = json.loads((folder / "results.json").read_text())
    del res["params"]
    (folder / "results.json").write_text(json.dumps(res))


@pytest.mark.integration
def test_arms_added_to_an_old_format_folder(tmp_path):
    new, old, docs = tmp_path / "new", tmp_path / "old", tmp_path / "docs"
    _run(["--quick", "--out", str(new), "--seeds", "1", "--arms", ",".join(ARMS)], 600)
    folder = new / "knowledge"
    shutil.copytree(folder, old / "knowledge")
    _strip_to_the_old_format(old / "knowledge")

    args = ["--out", str(old), "--docs", str(docs), "--add-arms", ",".join(ADDED)]
    _run(args, 600)
    got = old / "knowledge"
    # The old format restored exactly as the current code writes it.
    before = [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines()]
    after = [json.loads(x) for x in (got / "records.jsonl").read_text().splitlines()]
    assert after[: len(before)] == before
    assert all(r["flops"] > 0 for r in before if r["arm"] != "initial")
    for name in ("t10", "t06", "dasd"):
        want = torch.load(folder / "traces" / f"{name}.pt", weights_only=False)["meta"]
        have = torch.load(got / "traces" / f"{name}.pt", weights_only=False)["meta"]
        assert have["row_flops"] == want["row_flops"], name
    prompts = torch.load(folder / "data.pt", weights_only=False)["trace_prompts"]
    assert torch.load(got / "data.pt", weights_only=False)["trace_prompts"] == prompts
    # The added arms: the plan's seeds, FLOPs and on-policy rounds.
    added = after[len(before) :]
    assert {(r["arm"], r["seed"], r["step"]) for r in added} == {
        (a, 0, s) for a in ADDED for s in (1, 2, 4)
    }
    assert all(r["flops"] > 0 and r["train"]["on_policy"]["rounds"] for r in added)
    # The report: the run's figures kept, the addition listed, its arms in the rows.
    res0 = json.loads((folder / "results.json").read_text())
    res = json.loads((got / "results.json").read_text())
    for key in ("command", "finished", "plan", "timings", "wall_s", "load", "chosen", "params"):
        assert res[key] == res0[key], key
    assert res["arms"] == [*ARMS[:4], "opd", "stages_best", "offline_opd"]
    (entry,) = res["added"]
    assert entry["arms"] == ADDED and "--add-arms" in entry["command"]
    assert set(entry["backfill"]) >= {"trace_prompts", "trace_costs", "records", "when"}
    assert entry["load"]["samples"] > 0
    rows = {(r["arm"], r["step"]) for r in res["rows"]}
    assert {(a, 4) for a in ADDED} <= rows
    assert res["flops_parts"].keys() == {*ARMS, *ADDED}
    assert "Added later: `opd`, `offline_opd`" in (docs / "results" / "knowledge.md").read_text()
    assert (docs / "results.md").is_file()
    # The run's log kept, the addition's appended.
    log = (got / "log.txt").read_text()
    assert log.startswith((folder / "log.txt").read_text()) and "adding arms" in log
