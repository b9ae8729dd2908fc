"""docs/recipes/offline-then-on-policy.md agrees with its config and with raydc's own
accounting: the GPUs each step takes, the round's size, and the FLOPs its table states
(computed by hand on the page) are what ``raydc.method.opd.round_flops`` gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raydc.config import load_config
from raydc.method.opd import round_flops

RECIPES = Path(__file__).resolve().parents[2] / "docs" / "recipes"
PAGE = RECIPES / "offline-then-on-policy.md"
CONFIG = RECIPES / "qwen3-4b-from-32b-then-opd.yaml"

# The page's assumptions ("What a round costs at DASD scale, on paper").
STUDENT, TEACHER = 4_000_000_000, 32_800_000_000
SAMPLED, PROMPT = 8_000, 200  # mean tokens per sample, and its prompt's


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG)


def _gpus(engine) -> int:
    return int(engine.num_engines * engine.gpus_per_engine)


def _table_gpus(page: str) -> dict[str, int]:
    """The GPU column of the page's "Which GPUs do what" table, by step."""
    rows = re.findall(r"^\| ([^|]+) \| [^|]+ \| (\d+) \|$", page, re.M)
    return {step.strip(): int(n) for step, n in rows}


def test_the_recipe_runs_offline_then_on_policy_rounds(cfg):
    op = cfg.on_policy
    assert cfg.generate.enabled and cfg.select.enabled and not cfg.tune.enabled
    assert op.enabled and op.start == "trained" and op.teacher and cfg.score.teacher is None
    # on-policy exactly: the scored student log-probs are the sampling policy's
    assert (op.temperature, op.top_p) == (1.0, 1.0)
    assert op.weights().transform == "advantage"
    # round 0 loads the offline run's per-rank ZeRO state: the worker count stays
    assert "num_workers" not in op.train
    # no SFT steps on the student's own samples, no held-out samples, one checkpoint a round
    assert op.train["weight_warmup_steps"] == 0 and op.train["val_share"] == 0.0
    assert op.train["checkpoint_every"] == op.steps_per_round
    assert op.train["lr_schedule"] == "constant" and op.train["warmup_steps"] == 0
    # a rendered sample fits prepare and the scoring engines
    assert op.max_new_tokens < op.engine.max_model_len <= cfg.data.max_length
    assert cfg.score.engine.max_model_len >= cfg.data.max_length


def test_the_gpu_table_is_the_config(cfg):
    table = _table_gpus(PAGE.read_text())
    assert table == {
        "sample": _gpus(cfg.on_policy.engine),
        "prepare": 0,
        "score": 2 * _gpus(cfg.score.engine),  # a student pool and a teacher pool
        "train": cfg.train.num_workers,
        "(offline) generate": _gpus(cfg.generate.engine),
        "(offline) score": _gpus(cfg.score.engine),
        "eval": _gpus(cfg.eval.engine),
    }
    assert set(table.values()) <= {0, 4, 8}  # one 8-GPU node at a time


def _e(x: float) -> str:
    """1.343e17 -> '1.34e17', as the page writes it."""
    return f"{x:.2e}".replace("e+", "e")


def test_the_round_cost_on_the_page_is_round_flops(cfg):
    page = PAGE.read_text()
    op, tc = cfg.on_policy, cfg.train
    rows = op.prompts_per_round * op.n_samples
    seq = rows * (SAMPLED + PROMPT)
    assert f"{rows:,} samples" in page and f"{seq:,}" in page
    # the round's steps train each sample about once
    per_step = tc.num_workers * tc.micro_batch_tokens * tc.grad_accum
    assert f"{per_step:,} tokens" in page
    assert abs(op.steps_per_round * per_step / seq - 1) < 0.01
    live = seq if tc.grad_accum > 1 else 0  # the no-grad forward of grad_accum > 1
    f = round_flops(STUDENT, TEACHER, seq, seq, seq, seq, live)
    row = {
        "generation": f["generation"],
        "student scoring": f["student_scoring"],
        "teacher scoring": f["teacher_scoring"],
        "training": f["training"],
    }
    for part, flops in row.items():
        line = next(ln for ln in page.splitlines() if ln.startswith(f"| {part} |"))
        assert f"= {_e(flops)} |" in line, (part, _e(flops), line)
    assert f"**{_e(f['total'])}**" in page
