"""A real vocabulary end to end: a Qwen2-architecture student with the real 151,936-id
Qwen2 tokenizer and chat template (tests/assets/qwen2-tokenizer; random weights, hidden
128, 2 layers, head_dim 64) through prepare, score (vLLM, cross-checked by transformers),
train (packing, checkpoints, the chunked loss) and eval, on one model build and a few
GSM8K rows. Peak RSS per stage and process kind, and each stage's time, are printed (the
figures in docs/benchmarks.md, "A real vocabulary end to end")."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc.config import from_dict
from raydc.infra.artifacts import data_files
from raydc.infra.models import build_tiny_model
from raydc.pipeline import Pipeline

from ..conftest import QWEN2_TOKENIZER

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "raydc" / "assets" / "example" / "train.jsonl"
GSM8K = REPO / "raydc" / "assets" / "gsm8k" / "test.jsonl"
VOCAB = 151936
ROWS, STEPS, EVAL_PROMPTS, NEW_TOKENS = 8, 4, 4, 8
# A random model's log-prob of any token: its logits are z = W h with h RMS-normalised
# (|h|^2 = 128) and W ~ N(0, 0.08^2) (build_tiny_model), so z ~ N(0, s2), s2 = 128 * 0.0064;
# the log-sum-exp of 151,936 of them is log(151936) + s2 / 2 and a token's z has mean 0.
RANDOM_LOGPROB = -(math.log(VOCAB) + 128 * 0.08**2 / 2)  # -12.341


class PeakRSS(threading.Thread):
    """Peak RSS (MiB) of this process and every process under it (Ray's workers, vLLM's
    engine cores), by stage and kind, polled every 0.25 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stage, self.peaks, self.done = "start", {}, threading.Event()

    @staticmethod
    def kind(p, me) -> str:
        cmd = " ".join(p.cmdline())
        if p.pid == me.pid:
            return "driver"
        for key, name in (
            ("EngineCore", "vllm engine core"),
            ("Scorer", "score actor"),
            ("Train", "train worker"),
        ):
            if key in cmd:
                return name
        return "other ray"

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.done.wait(0.25):
            total = 0
            try:
                procs = [me, *me.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    rss, kind = p.memory_info().rss / 2**20, self.kind(p, me)
                except psutil.Error:
                    continue
                total += rss
                key = (self.stage, kind)
                self.peaks[key] = max(self.peaks.get(key, 0.0), rss)
            key = (self.stage, "all processes")
            self.peaks[key] = max(self.peaks.get(key, 0.0), total)


def _traces(path: Path, tok) -> list[dict]:
    """GSM8K rows with given teacher log-probs on the Qwen2 tokenizer's tokens of the
    response (character offsets), so scoring runs the student only."""
    rows = [json.loads(x) for x in EXAMPLE.read_text().splitlines()[:ROWS]]
    table = {k: [] for k in ("id", "prompt_id", "prompt", "response")}
    table["teacher_logprobs"], table["teacher_offsets"] = [], []
    for r in rows:
        enc = tok(r["response"], add_special_tokens=False, return_offsets_mapping=True)
        for k in ("id", "prompt_id", "prompt", "response"):
            table[k].append(r[k])
        table["teacher_logprobs"].append([-0.5 - 0.1 * (j % 5) for j in range(len(enc.input_ids))])
        table["teacher_offsets"].append([list(o) for o in enc["offset_mapping"]])
    pq.write_table(pa.table(table), path)
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("real_vocab")
    t0 = time.time()
    student = build_tiny_model(
        root / "student", "student", tokenizer=QWEN2_TOKENIZER, vocab_size=VOCAB, seed=3
    )
    build_s = time.time() - t0
    tok = AutoTokenizer.from_pretrained(student)
    rows = _traces(root / "traces.parquet", tok)
    evals = root / "eval.jsonl"
    evals.write_text("".join(GSM8K.read_text().splitlines(True)[:EVAL_PROMPTS]))
    engine = {
        "max_model_len": 256,
        "max_num_batched_tokens": 256,
        "batch_size": 4,
        "gpu_memory_utilization": 0.05,  # on CPU: 5% of RAM for the KV cache
    }
    cfg = from_dict(
        {
            "run": {"output_dir": str(root / "run")},
            "data": {"path": str(root / "traces.parquet"), "max_length": 255},
            "score": {
                "backend": "vllm",
                "student": student,
                "teacher": None,  # the traces carry the teacher's log-probs
                "logprobs": "float32",
                "engine": {**engine, "cpus_per_engine": 1.0},
            },
            "select": {"enabled": False},
            "weights": {"preset": "das_token"},
            "train": {
                "num_workers": 1,
                "cpus_per_worker": 1.0,
                "zero_stage": 2,
                "lr": 1e-3,
                "max_steps": STEPS,
                "packing": True,
                "micro_batch_tokens": 512,
                "loss_chunk_size": 64,  # several chunks of [64 x 151,936] logits a row
                "log_every": 1,
                "checkpoint_every": 2,
                "keep_checkpoints": 2,
            },
            "eval": {
                "path": str(evals),
                "num_prompts": EVAL_PROMPTS,
                "max_new_tokens": NEW_TOKENS,
                "baseline": False,
                "engine": {**engine, "backend": "local"},
            },
        }
    )
    pipe = Pipeline(cfg, log=print)
    rss, seconds = PeakRSS(), {"build model": build_s}
    rss.start()
    try:
        for stage in ("prepare", "score", "train", "eval"):
            rss.stage, t0 = stage, time.time()
            pipe.run(stage)
            seconds[stage] = time.time() - t0
    finally:
        rss.done.set()
        rss.join()
    figures = {
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "peak_rss_mib": {f"{s} / {k}": round(v) for (s, k), v in sorted(rss.peaks.items())},
        "train_worker_peak_rss_mib": pipe.results["train"]
        .summary["metrics"]
        .get("worker_peak_rss_mib"),
    }
    print("real-vocab figures:", json.dumps(figures, indent=1))
    (root / "figures.json").write_text(json.dumps(figures, indent=1))
    return pipe, student, tok, rows


def _read(stage_dir) -> list[dict]:
    return [r for f in data_files(stage_dir) for r in pq.read_table(f).to_pylist()]


def test_prepare_renders_with_the_real_template_and_vocabulary(run):
    pipe, _, tok, rows = run
    s = pipe.results["prepare"].summary
    assert s["rows_in"] == ROWS == s["rows_out"] + s["rows_rejected"] and s["rows_out"] == ROWS
    assert s["given_teacher_rows"] == ROWS
    got = {r["row_id"]: r for r in _read(s["paths"]["data"])}
    im_start, im_end = 151644, 151645  # the real Qwen2 ids
    for r in rows:
        p = got[r["id"]]
        masked = [i for i, m in zip(p["input_ids"], p["loss_mask"]) if m]
        assert tok.decode(masked) == r["response"] + "<|im_end|>"
        assert p["input_ids"][0] == im_start and masked[-1] == im_end
        # The template's default system prompt, then the user turn (Qwen2's format).
        assert tok.decode(p["input_ids"]).startswith(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        )


def test_score_vllm_log_probs_are_a_151936_way_softmax_and_match_transformers(run):
    from raydc.engines import score_rows

    pipe, student, _, _ = run
    s = pipe.results["score"].summary
    assert s["rows_in"] == ROWS == s["rows_out"]
    scored = _read(pipe.results["score"].out_dir)
    ids = [r["input_ids"] for r in scored]
    hf = score_rows(student, ids, backend="transformers", max_num_batched_tokens=256)
    on_loss = []
    for r, want in zip(scored, hf):
        got = np.asarray(r["student_logprobs"], dtype=np.float64)
        assert got[0] == 0.0 and np.all(got[1:] < 0)
        np.testing.assert_allclose(got, want, atol=2e-3)  # vLLM vs transformers, float32
        on_loss += [v for v, m in zip(got, r["loss_mask"]) if m]
    # Over ~1,000 loss tokens the mean's spread is 0.9 / sqrt(1000) = 0.03.
    assert abs(np.mean(on_loss) - RANDOM_LOGPROB) < 0.15, (np.mean(on_loss), RANDOM_LOGPROB)


def test_train_packs_checkpoints_and_exports_the_full_vocabulary(run):
    from transformers import AutoConfig

    pipe, _, _, _ = run
    s = pipe.results["train"].summary
    m = s["metrics"]
    assert m["step"] == STEPS and m["packing"] is True
    assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    # Checkpoints at steps 2 and 4 (keep_checkpoints 2); the final one is the export's.
    assert Path(s["checkpoint"]).name.endswith(f"{STEPS:08d}"), s["checkpoint"]
    steps = sorted(p.name for p in Path(s["checkpoint"]).parent.iterdir() if "step_" in p.name)
    assert [x[-8:] for x in steps] == ["00000002", "00000004"]
    assert AutoConfig.from_pretrained(s["model_dir"]).vocab_size == VOCAB


def test_eval_generates_with_the_trained_real_vocab_student(run):
    pipe, _, _, _ = run
    m = pipe.results["eval"].summary
    assert m["rows_in"] == EVAL_PROMPTS == m["rows_out"] and m["samples"] == EVAL_PROMPTS
    assert 0 < m["max_response_tokens"] <= NEW_TOKENS
    assert 0.0 <= m["pass@1"] <= 1.0
