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
from pathlib import Path

import pytest

from tests.integration.test_cluster import REPO, LocalHead

pytestmark = pytest.mark.integration


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

        r = head.submit(
            [
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
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-6000:]
    assert "succeeded" in logs.lower()
    assert "raydc run summary" in logs
    # Ray Data's INFO logs (its plan, a progress dump every 10 s off a terminal) go to the
    # run's ray.log, named in the summary; the console keeps raydc's lines and warnings.
    assert "Starting execution of Dataset" not in logs
    dumps = [x for x in logs.splitlines() if "logging_progress" in x]
    assert all("Total Progress" in x for x in dumps), dumps[:5]  # the heartbeat only
    assert "Starting execution of Dataset" in (out / "ray.log").read_text()
    assert f"ray logs          {out / 'ray.log'}" in logs
    print(f"the default job printed {len(logs.splitlines())} lines")

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
