"""The ``raydc`` command line: parsing, config errors, and the stage commands' wiring."""

from __future__ import annotations

import subprocess
import sys

import yaml

from raydc.cli import build_parser, load, main
from raydc.config import from_dict, load_config
from raydc.pipeline import DEFAULT_CONFIG
from raydc.pipeline.table import STAGES


def test_help_lists_every_stage_and_run():
    out = subprocess.run(
        [sys.executable, "-m", "raydc.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in (*(s.name for s in STAGES), "run", "config"):
        assert name in out


def test_config_prints_the_validated_embedded_default(capsys):
    assert main(["config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert from_dict(printed) == load_config(DEFAULT_CONFIG)


def test_overrides_and_address_reach_the_config():
    args = build_parser().parse_args(
        ["train", "--address", "auto", "train.max_steps=3", "weights.preset=sft"]
    )
    cfg = load(args)
    assert cfg.run.ray_address == "auto"
    assert cfg.train.max_steps == 3 and cfg.weights.transform == "none"


def test_a_bad_override_exits_2_naming_the_field(capsys):
    assert main(["train", "train.lr=-1"]) == 2
    assert "train.lr=-1" in capsys.readouterr().err
    assert main(["score", "score.backnd=vllm"]) == 2
    assert "score.backnd" in capsys.readouterr().err


def test_a_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["prepare", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_select_when_disabled_exits_1_before_running_anything(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "select",
            "select.enabled=false",
            f"run.output_dir={out}",
            "score.student=",
            "score.teacher=null",
        ]
    )
    assert rc == 1
    assert "select.enabled" in capsys.readouterr().err
    assert not (out / "prepare").exists()


def test_generate_without_prompts_or_teacher_exits_2_naming_the_field(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", f"run.output_dir={out}", "generate.enabled=true"]) == 2
    assert "generate.prompts: not set" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "2+2?"}\n')
    rc = main(
        [
            "generate",
            f"run.output_dir={out}",
            f"generate.prompts={prompts}",
            "score.student=",
            "score.teacher=",
        ]
    )
    assert rc == 2
    assert "generate.teacher: not set and score.teacher is empty" in capsys.readouterr().err
    no_models = ["score.student=", "score.teacher=null"]
    rc = main(
        ["run", f"run.output_dir={out}", "generate.enabled=true", "generate.prompts=/no"]
        + no_models
    )
    assert rc == 2
    assert "generate.prompts='/no': no such file" in capsys.readouterr().err
    assert not (out / "generate").exists() and not (out / "prepare").exists()


def test_tune_with_an_empty_space_exits_2_before_any_stage_runs(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["tune", f"run.output_dir={out}", "score.student=", "score.teacher=null"])
    assert rc == 2
    assert "tune.space: empty" in capsys.readouterr().err
    assert not (out / "prepare").exists()


def test_the_run_summary_reports_rows_throughput_metrics_and_paths(tmp_path):
    from pathlib import Path

    from raydc.infra.artifacts import StageResult
    from raydc.pipeline.summary import format_summary, stage_line, summarize_run

    def res(name, summary, skipped=False):
        return StageResult(name, Path(tmp_path / name), "fp", summary, skipped)

    results = {
        "prepare": res(
            "prepare",
            {
                "rows_in": 242,
                "rows_out": 240,
                "rows_rejected": 2,
                "paths": {"rejects": "/r/rejects.parquet"},
                "seconds": 3.0,
            },
        ),
        "score": res(
            "score",
            {
                "rows_in": 240,
                "rows_out": 240,
                "rows_rejected": 0,
                "tokens": 48000,
                "store_bytes_per_token": {"input_ids": 0.7, "total": 2.91},
                "seconds": 12.0,
                "engines": {"student": {"tokens_per_s_busy": 8000.0, "startup_s": 40.0}},
            },
            skipped=True,
        ),
        "tune": res(
            "tune",
            {
                "metric": "val_nll",
                "mode": "min",
                "best_metric": 5.5,
                "best_config": {"weights.tau": 0.5},
                "num_trials": 2,
                "results_csv": "/t/results.csv",
                "model_dir": "/t/model",
                "metrics": {
                    "step": 16,
                    "loss": 5.1,
                    "tokens_per_s": 6000.0,
                    "val_nll": 5.5,
                    "padding_share": 0.0,
                    "budget_fill": 0.97,
                    "weight_ess": 812.5,
                    "grad_norm": 0.3,
                },
                "seconds": 60.0,
            },
        ),
        "eval": res(
            "eval",
            {
                "initial_pass@1": 0.0625,
                "pass@1": 0.25,
                "pass@1_stderr": 0.1,
                "prompts": 16,
                "rows_in": 16,
                "rows_out": 16,
                "rows_rejected": 0,
            },
        ),
    }
    from raydc.config import from_dict

    s = summarize_run(results, from_dict({"run": {"output_dir": str(tmp_path)}}))
    assert s["rows"] == {"rows_in": 242, "rows_out": 240, "rows_rejected": 2}
    assert s["scoring_tokens_per_s"] == 4000.0 and s["training_tokens_per_s"] == 6000.0
    assert s["tune"]["best_config"] == {"weights.tau": 0.5}
    # Packing's figures reach the run summary; the rest stays in the stage's metrics.
    assert s["train_metrics"]["padding_share"] == 0.0 and s["train_metrics"]["budget_fill"] == 0.97
    assert "grad_norm" not in s["train_metrics"]
    # The weights' effective sample size, as the training loop names it, reaches it too.
    assert s["train_metrics"]["weight_ess"] == 812.5
    assert s["store_bytes_per_token"] == 2.91
    # initial_pass@1 (the student before training) sits beside pass@1: a public contract.
    assert s["eval_metrics"] == {
        "initial_pass@1": 0.0625,
        "pass@1": 0.25,
        "pass@1_stderr": 0.1,
        "prompts": 16,
    }
    text = format_summary(s)
    assert "student pass@1: 0.062 -> 0.250" in text
    assert "busy: student 8,000 tokens/s (start-up 40 s)" in text
    for piece in (
        "in 242, out 240, rejected 2",
        "4,000 tokens/s",
        "6,000 tokens/s",
        '"weights.tau": 0.5',
        "pass@1 0.25",
        "[reused]",
        "/t/model",
        "weight_ess 812.5",
        "scored store      2.91 bytes/token",
    ):
        assert piece in text, piece
    assert stage_line("prepare", results["prepare"].summary) == "rows 242 -> 240 (2 rejected)"
    assert "4,000 tokens/s" in stage_line("score", results["score"].summary)
    # Candidates outside the top k were not selected, not rejected; bad rows still are.
    select = {"rows_in": 800, "rows_out": 400, "rows_rejected": 400, "not_selected": 400}
    assert stage_line("select", select) == "candidates 800 -> 400 selected"
    select = {"rows_in": 802, "rows_out": 400, "rows_rejected": 402, "not_selected": 400}
    assert stage_line("select", select) == "candidates 802 -> 400 selected (2 rejected)"
