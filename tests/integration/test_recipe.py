"""The GPU recipe (docs/recipes/): it loads and validates as written, and its first stage
(prepare) runs on the tiny models with the model names and paths swapped by overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc.config import load_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "docs" / "recipes").glob("*.yaml"))
RECIPE = REPO / "docs" / "recipes" / "qwen2.5-1.5b-from-7b.yaml"
EXAMPLE = REPO / "raydc" / "assets" / "example" / "train.jsonl"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.train.use_gpu and cfg.train.precision in ("bf16", "fp16")
    assert cfg.score.engine.dtype == "bfloat16" and cfg.score.engine.gpus_per_engine >= 1


def test_recipe_is_the_documented_gpu_run():
    cfg = load_config(RECIPE)
    assert cfg.score.student == "Qwen/Qwen2.5-1.5B-Instruct"
    assert cfg.train.zero_stage == 3 and cfg.train.num_workers == 8
    assert cfg.generate.engine.gpus_per_engine == 1 and cfg.generate.n_samples == 4
    assert cfg.select.enabled and cfg.select.top_k == 1
    assert cfg.eval.path == "pkg:assets/gsm8k/test.jsonl" and cfg.eval.grader == "gsm8k"
    # The traces carry the teacher's log-probs: no teacher scoring pass.
    assert cfg.score.teacher is None
    assert cfg.weights.transform == "sigmoid" and cfg.weights.sign == 1
    # Its Tune space names real fields (checked by TuneConfig.validate at load time).
    on = load_config(RECIPE, ["tune.enabled=true"])
    assert on.tune.space == {"weights.preset": ["sft", "das_token_mix", "eaft", "das_token"]}
    assert on.tune.baseline == {"weights.preset": "sft"} and on.tune.seeds == 2


def _generate_style_traces(path: Path, tokenizer_dir: str, n: int = 12) -> int:
    """Rows in the schema raydc.generate writes (prompt, response, per-token teacher
    log-probs and character offsets), from the example GSM8K traces."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in EXAMPLE.read_text().splitlines()[:n]]
    table = {
        "id": [],
        "prompt_id": [],
        "prompt": [],
        "response": [],
        "teacher_logprobs": [],
        "teacher_offsets": [],
    }
    for i, r in enumerate(rows):
        enc = tok(r["response"], add_special_tokens=False, return_offsets_mapping=True)
        offsets = [list(o) for o in enc["offset_mapping"]]
        table["id"].append(f"{r['prompt_id']}:{i}")
        table["prompt_id"].append(r["prompt_id"])
        table["prompt"].append(r["prompt"])
        table["response"].append(r["response"])
        table["teacher_logprobs"].append([-0.25 - 0.01 * (j % 7) for j in range(len(offsets))])
        table["teacher_offsets"].append(offsets)
    pq.write_table(pa.table(table), path)
    return len(rows)


@pytest.mark.integration
def test_recipe_prepare_stage_runs_on_tiny_models(tiny_student, ray_local, tmp_path):
    from raydc.prepare.stage import run_prepare

    traces = tmp_path / "traces.parquet"
    n = _generate_style_traces(traces, tiny_student)
    cfg = load_config(
        RECIPE,
        [
            f"run.output_dir={tmp_path / 'run'}",
            f"data.path={traces}",
            f"score.student={tiny_student}",
            "data.max_length=512",
        ],
    )
    summary = run_prepare(cfg, tmp_path / "run" / "prepare")
    assert summary["rows_in"] == n == summary["rows_out"] + summary["rows_rejected"]
    assert summary["rows_out"] == n
    assert summary["given_teacher_rows"] == n  # the teacher log-probs were carried over
    assert summary["loss_tokens"] > 0
    from raydc.infra.artifacts import data_files

    out = [r for f in data_files(summary["paths"]["data"]) for r in pq.read_table(f).to_pylist()]
    assert len(out) == n
    row = out[0]
    # The recipe's system prompt is rendered into the prompt (chat template of the
    # student's tokenizer), and only response tokens carry loss.
    assert sum(row["loss_mask"]) > 0 and sum(row["loss_mask"]) < len(row["input_ids"])
    assert row["teacher_logprobs"] is not None
    assert len(row["teacher_logprobs"]) == len(row["input_ids"])
