"""The job as users submit it: a real local cluster (``ray start --head`` on free ports,
token authentication on, as Ray 2.60 defaults), ``ray job submit --working-dir <repo> --
python jobs/distill.py`` with the embedded default config, wait, check the job succeeded
and wrote every stage's output and the summary, stop the cluster.

The run is the default example (all 802 rows, vLLM scoring of the shipped student and
teacher, DASD selection, DeepSpeed training on 2 CPU workers, vLLM eval of the student
before and after) with fewer training steps and eval prompts: the expensive test of the
suite, kept as small as stays honest. What the full default reaches is measured by running
it (docs/quickstart.md), not asserted here.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from tests.integration.test_cluster import REPO, LocalHead

pytestmark = pytest.mark.integration

RULE = "=" * 72  # the run summary's first and last line (raydc.pipeline.summary)


def foreign_lines(console: str) -> list[str]:
    """The lines of a job's console that are not raydc's. raydc's own: lines that start
    with ``[raydc]`` (stage lines and progress lines), the run summary's block (its blank
    line, the rules and what lies between them) and the ``summary: <path>`` line after it."""
    lines = console.splitlines()
    ours = set()
    if "raydc run summary" in lines:
        head = lines.index("raydc run summary") - 1  # the block's first rule
        end = lines.index(RULE, head + 1)  # its last rule
        ours.update(range(head - 1 if head and not lines[head - 1] else head, end + 1))
        if end + 1 < len(lines) and lines[end + 1].startswith("summary: "):
            ours.add(end + 1)
    return [x for i, x in enumerate(lines) if i not in ours and not x.startswith("[raydc]")]


def test_foreign_lines_are_what_is_not_raydcs():
    console = "\n".join(
        [
            "[raydc] prepare  running -> /r/prepare",
            "[2026-12-06 10:32:27,488 E 1 1] core_worker.cc:2465: Actor with class name",
            "[raydc] train    step 40/120 (33%), loss 0.5, ETA 2:40",
            "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
            "",
            RULE,
            "raydc run summary",
            "-" * 72,
            "rows              in 802, out 800, rejected 2",
            RULE,
            "summary: /r/summary.json",
            "2026-12-06 10:35:39,997\tINFO logging_progress.py:225 -- Total Progress: 0/?",
        ]
    )
    assert foreign_lines(console) == [
        "[2026-12-06 10:32:27,488 E 1 1] core_worker.cc:2465: Actor with class name",
        "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
        "2026-12-06 10:35:39,997\tINFO logging_progress.py:225 -- Total Progress: 0/?",
    ]


def test_default_job_via_ray_job_submit_on_a_token_auth_cluster(tmp_path):
    out = tmp_path / "run"
    with LocalHead(num_cpus=2) as head:
        assert head.env["RAY_AUTH_MODE"] == "token"
        token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        assert len(token) >= 16
        # Without the token the cluster refuses the submission.
        no_token = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH_TOKEN")}
        no_token["RAY_AUTH_TOKEN"] = "not-the-token"
        denied = head.run(
            ["ray", "job", "list", "--address", head.dashboard_url], env_override=no_token
        )
        assert denied.returncode != 0

        job_id = f"raydc-default-{uuid.uuid4().hex[:12]}"
        r = head.submit(
            [
                "--submission-id",
                job_id,
                "--working-dir",
                str(REPO),
                "--",
                sys.executable,
                "jobs/distill.py",
                f"run.output_dir={out}",
                "train.max_steps=4",
                "train.log_every=2",
                "train.checkpoint_every=4",
                "eval.num_prompts=8",
            ],
            timeout=1200,
        )
        # The job's own console (its driver's stdout and stderr), without the client's
        # framing around it: what a user of `python jobs/distill.py` sees.
        fetch = "from ray.job_submission import JobSubmissionClient as C; import sys; "
        fetch += f"sys.stdout.write(C({head.dashboard_url!r}).get_job_logs({job_id!r}))"
        console = head.run([sys.executable, "-c", fetch], timeout=120)
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-6000:]
    assert "succeeded" in logs.lower()
    assert console.returncode == 0, console.stderr[-3000:]
    # The job's log opens with Ray Jobs' own lines, written before the driver starts
    # ("Runtime env is setting up.", "Running entrypoint for job <id>: <command>"); the
    # driver's console is what follows.
    lines = console.stdout.splitlines()
    start = [i for i, x in enumerate(lines) if x.startswith(f"Running entrypoint for job {job_id}")]
    assert start, console.stdout[:3000]
    job = "\n".join(lines[start[0] + 1 :])
    assert "raydc run summary" in job
    # A healthy run's console reads as a report: raydc's stage lines, progress and the
    # summary. Ray's, vLLM's and transformers' notices (Ray Data's plan and progress dumps,
    # "Calling ray.init() again", the C++ core worker's lines) are in the run's ray.log,
    # which the summary names.
    foreign = foreign_lines(job)
    assert not foreign, "lines that are not raydc's:\n" + "\n".join(foreign)
    assert "Starting execution of Dataset" in (out / "ray.log").read_text()
    assert f"ray logs          {out / 'ray.log'}" in job
    assert "[raydc] select " in job and "candidates 800 -> 400 selected" in job
    print(f"the default job printed {len(job.splitlines())} lines")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == {"rows_in": 802, "rows_out": 800, "rows_rejected": 2}
    assert set(summary["stages"]) == {"prepare", "score", "select", "train", "eval"}
    assert not any(st["reused"] for st in summary["stages"].values())
    assert summary["scored_rows"] == 800
    assert summary["selected_rows"] == 400  # top 1 of the 2 candidates of each problem
    assert summary["scoring_tokens_per_s"] > 0 and summary["training_tokens_per_s"] > 0
    assert summary["train_metrics"]["step"] == 4
    assert summary["train_metrics"]["weight_ess"] > 0  # the weights' ESS reaches the summary
    assert (Path(summary["model_dir"]) / "config.json").is_file()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["prompts"] == 8 and 0.0 <= metrics["pass@1"] <= 1.0
    assert 0.0 <= metrics["initial_pass@1"] <= 1.0  # the shipped student before training
    assert summary["eval_metrics"]["initial_pass@1"] == metrics["initial_pass@1"]
    for stage in summary["stages"]:
        assert (out / stage / "_raydc_stage.json").is_file(), stage
    assert (out / "score" / "manifest.json").is_file()
    # The scored store is compact (fp16 log-probs, no text or weights; the format-1 store
    # of this job took 18.8 B a token) and the selection holds ids, not a copy of the rows.
    import pyarrow.parquet as pq

    from raydc.infra.artifacts import data_files

    shards = data_files(out / "score")
    tokens = sum(
        sum(pq.read_table(f, columns=["num_tokens"]).column(0).to_pylist()) for f in shards
    )
    on_disk = sum(Path(f).stat().st_size for f in shards)
    assert on_disk / tokens <= 6.0, on_disk / tokens
    reported = summary["store_bytes_per_token"]
    assert abs(reported - on_disk / tokens) <= 0.1 * on_disk / tokens
    assert data_files(out / "select") == []
    assert (out / "prepare" / "rejects.parquet").is_file()
    # The cluster's token is in no output, marker or log of the run.
    for f in out.rglob("*"):
        if f.is_file() and f.stat().st_size < 64 << 20:
            assert token.encode() not in f.read_bytes(), f
    assert token not in logs
