"""Training on real Ray Train + DeepSpeed (CPU, gloo), 2 workers, tiny Qwen2 models.

Each TorchTrainer run costs tens of seconds on 2 cores, so runs are module fixtures shared
by the tests that read them:

- ``z2``: discord, ZeRO-2, packed rows (the default), grad_accum 2, a cosine schedule with
  warmup, several micro-batches an epoch, val slice; each worker reads its own file.
- ``killed``: ``z2`` with the last worker killed (os._exit, an ``after_step`` hook) after
  step 4 on the first attempt: Ray Train restarts from the step-3 checkpoint (mid-epoch);
  the rows, losses and learning rates of every step must match ``z2``.
- ``z1``: ZeRO-1 with student_ref=current; ``z3``: ZeRO-3 with activation checkpointing,
  re-scoring every 2 steps and CPU offload. Their first steps must equal ``z2``'s.
- full-batch runs (every step sees every row, so the split over workers cannot matter):
  ``sft`` (2 workers, length bucketing: right-padded rows) against a plain PyTorch loop,
  ``discord`` (packed) on 1 and 2 workers.
- a 16K-token row, packed beside short rows, trains on one CPU worker.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from ray import cloudpickle

from raydc.config import from_dict
from raydc.train.batch import RowBlock, collate
from raydc.train.data import scored_files
from tests import train_fixtures
from tests.train_fixtures import KillOnce, make_scored, write_scored_rows

# Ray workers unpickle the after_step hook: send its class by value, not by module path.
cloudpickle.register_pickle_by_value(train_fixtures)

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture(scope="module")
def scored(tiny_student, tiny_teacher, tmp_path_factory) -> str:
    return make_scored(tiny_student, tiny_teacher, tmp_path_factory.mktemp("scored"), n_rows=32)


def _cfg(student: str, preset: str = "discord", **train):
    base = dict(
        student=student,
        num_workers=2,
        zero_stage=2,
        max_steps=STEPS,
        lr=2e-3,
        lr_schedule="cosine",
        warmup_steps=2,
        min_lr_ratio=0.2,
        micro_batch_tokens=200,
        grad_accum=2,
        log_every=1,
        checkpoint_every=2,
        val_share=0.2,
        seed=0,
    )
    base.update(train)
    return from_dict({"train": base, "weights": {"preset": preset}})


def _train(cfg, scored: str, out: Path, after_step=None) -> tuple[dict, dict[int, dict]]:
    from raydc.train import run_train

    summary = run_train(cfg, scored, out, after_step=after_step)
    by_step = {}
    for line in Path(summary["metrics_path"]).read_text().splitlines():
        m = json.loads(line)
        by_step[m["step"]] = m  # a re-run step after a restart replaces the first attempt
    return summary, by_step


def _losses(by_step: dict) -> list[float]:
    return [by_step[s]["loss"] for s in sorted(by_step)]


@pytest.fixture(scope="module")
def z2(ray_local, tiny_student, scored, tmp_path_factory):
    return _train(_cfg(tiny_student), scored, tmp_path_factory.mktemp("z2"))


@pytest.fixture(scope="module")
def full_batch_sft(ray_local, tiny_student, scored, tmp_path_factory):
    cfg = _cfg(
        tiny_student,
        "sft",
        micro_batch_tokens=100_000,
        grad_accum=1,
        max_steps=3,
        val_share=0.0,
        lr=1e-3,
        lr_schedule="constant",
        warmup_steps=0,
        checkpoint_every=3,
        packing=False,  # length bucketing: the right-padded path
    )
    return _train(cfg, scored, tmp_path_factory.mktemp("sft"))


def _full_batch_discord(student, scored, out, workers):
    cfg = _cfg(
        student,
        "discord",
        micro_batch_tokens=100_000,
        grad_accum=1,
        max_steps=1,
        val_share=0.0,
        lr=1e-3,
        lr_schedule="constant",
        warmup_steps=0,
        num_workers=workers,
        checkpoint_every=1,
    )
    return _train(cfg, scored, out)


def _falls(losses: list[float]) -> bool:
    return sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5


def test_zero2_trains_reports_and_exports(z2):
    summary, by_step = z2
    assert sorted(by_step) == list(range(1, STEPS + 1))
    losses = _losses(by_step)
    assert _falls(losses), losses
    last = by_step[STEPS]
    for key in (
        "loss",
        "lr",
        "tokens_per_s",
        "grad_norm",
        "padding_share",
        "budget_fill",
        "val_nll",
        "weight_ess",
        "weight_clip_near_high",
        "weight_corr_weight_length",
        "data_bytes_read_max",
    ):
        assert key in last, key
    assert last["tokens_per_s"] > 0
    # Packed rows: one sequence per micro-batch, no pad slots; bins filled toward the budget.
    assert last["packing"] is True and last["padding_share"] == 0.0
    assert 0.3 < last["budget_fill"] <= 1.0
    assert any(k.startswith("weight_pos_") for k in last)
    assert by_step[STEPS]["val_nll"] < by_step[1]["val_nll"] - 0.3
    assert last["epoch"] >= 1  # the run went through more than one epoch of its shard
    assert last["resumed_from_step"] == 0
    assert Path(summary["model_dir"], "model.safetensors").exists()
    assert list(Path(summary["tensorboard_dir"]).glob("events.*"))
    assert summary["metrics"]["padding_share"] == 0.0


def test_each_worker_reads_its_own_rows(z2, scored):
    summary, by_step = z2
    # Two files of one row group each: one per rank, all rows between them, none twice
    # (tests/unit/test_train_shard.py checks disjointness row by row).
    rows = summary["shards"]["rows_per_rank"]
    n_rows = pq.ParquetFile(scored_files(scored)[0]).metadata.num_rows * 2
    val_rows = n_rows - sum(rows)
    assert len(rows) == 2 and min(rows) > 0 and 0 < val_rows < n_rows / 2
    tokens = summary["shards"]["tokens_per_rank"]
    assert min(tokens) > 0
    # Each epoch, each worker read its half of the store (plus, once, its held-out rows
    # and the length index), not all of it.
    from raydc.train.shard import build_index

    store = sum(g.bytes for g in build_index(scored_files(scored)))
    passes = by_step[STEPS]["epoch"] + 1
    assert 0 < by_step[STEPS]["data_bytes_read_max"] < 0.75 * store * passes


def test_killed_worker_resumes_from_checkpoint(ray_local, tiny_student, scored, z2, tmp_path):
    marker = tmp_path / "killed.txt"
    # Checkpoints every 3 steps (the schedule is the same, so are the losses): the step-3
    # checkpoint lies inside an epoch.
    summary, by_step = _train(
        _cfg(tiny_student, checkpoint_every=3),
        scored,
        tmp_path / "run",
        after_step=KillOnce(4, str(marker)),
    )
    assert marker.exists(), "the fault hook never fired"
    _, ref = z2
    assert sorted(by_step) == list(range(1, STEPS + 1))
    # The second attempt started from the step-3 checkpoint, in the middle of an epoch.
    assert by_step[STEPS]["resumed_from_step"] == 3
    assert by_step[3]["epoch"] == by_step[4]["epoch"]
    for s in range(1, STEPS + 1):
        assert by_step[s]["rows_fingerprint"] == ref[s]["rows_fingerprint"], s
        assert by_step[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-4), s
        # The decaying schedule resumed where it was, not from its start.
        assert by_step[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-9), s
    assert len({round(by_step[s]["lr"], 12) for s in range(3, STEPS + 1)}) == STEPS - 2
    assert summary["metrics"]["loss"] == pytest.approx(ref[STEPS]["loss"], abs=1e-4)


@pytest.mark.parametrize("stage", [1, 3])
def test_other_zero_stages(ray_local, tiny_student, scored, z2, tmp_path, stage):
    # ZeRO-1 with live student log-probs (student_ref=current, extra no-grad forward since
    # grad_accum=2); ZeRO-3 with activation checkpointing, re-scoring rounds every 2 steps
    # and the optimizer and the parameters offloaded to CPU memory (the same arithmetic as
    # the ZeRO-2 reference).
    extra = (
        {"student_ref": "current"}
        if stage == 1
        else {
            "rescore_every": 2,
            "offload_optimizer": True,
            "offload_params": True,
            "gradient_checkpointing": True,
        }
    )
    _, by_step = _train(
        _cfg(tiny_student, zero_stage=stage, max_steps=4, **extra), scored, tmp_path / "run"
    )
    _, ref = z2
    losses = _losses(by_step)
    assert _falls(losses), losses
    # Same parameters, data and (at step 1, live == stored) weights as the ZeRO-2 run; the
    # warmup makes the first steps' learning rates equal although max_steps differs.
    same = [1] if stage == 1 else [1, 2]
    for s in same:
        assert by_step[s]["rows_fingerprint"] == ref[s]["rows_fingerprint"], s
        assert by_step[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-4), s
    # After the first update (stage 1) / the first re-scoring round (stage 3) they differ.
    first_diff = 2 if stage == 1 else 3
    assert abs(by_step[first_diff]["loss"] - ref[first_diff]["loss"]) > 1e-4


def _plain_sft_losses(student: str, scored: str, steps: int, lr: float) -> list[float]:
    """Full-batch SFT with torch only: AdamW, clip 1.0, mean NLL over loss tokens."""
    from transformers import AutoModelForCausalLM

    block = RowBlock.from_table(pq.read_table(scored_files(scored)))
    mb = collate(block, list(range(len(block))), packed=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        logits = model(input_ids=mb.input_ids).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, mb.input_ids[:, 1:, None])
        m = mb.loss_mask.float()
        loss = -(lp[..., 0] * m).sum() / m.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def test_sft_preset_reproduces_plain_sft(full_batch_sft, tiny_student, scored):
    _, by_step = full_batch_sft
    ref = _plain_sft_losses(tiny_student, scored, 3, 1e-3)
    assert _losses(by_step) == pytest.approx(ref, abs=1e-4)
    assert ref[2] < ref[0]
    assert by_step[3]["packing"] is False and by_step[3]["padding_share"] > 0


def test_self_norm_one_vs_two_workers_and_discord_differs(
    ray_local, tiny_student, scored, full_batch_sft, tmp_path
):
    from safetensors.torch import load_file

    s1, one = _full_batch_discord(tiny_student, scored, tmp_path / "w1", 1)
    s2, two = _full_batch_discord(tiny_student, scored, tmp_path / "w2", 2)
    assert s1["shards"]["rows_per_rank"] == [32] and sum(s2["shards"]["rows_per_rank"]) == 32
    # The global loss and the gradient norm before clipping (the scale check) are sums over
    # the same tokens in another order: equal up to float rounding.
    assert one[1]["loss"] == pytest.approx(two[1]["loss"], abs=1e-5)
    assert one[1]["grad_norm"] == pytest.approx(two[1]["grad_norm"], rel=1e-4)
    w1 = load_file(Path(s1["model_dir"], "model.safetensors"))
    w2 = load_file(Path(s2["model_dir"], "model.safetensors"))
    w0 = load_file(Path(tiny_student, "model.safetensors"))
    lr = 1e-3
    for name in w0:
        d1, d2 = w1[name] - w0[name], w2[name] - w0[name]
        # Adam's first step moves each weight by lr * g / (|g| + eps): the direction of each
        # gradient entry. Where an entry is within rounding of 0 its update is not defined
        # by the maths, so a few such entries may differ; every other one must agree.
        off = ((d1 - d2).abs() > lr / 100).double().mean().item()
        assert off < 1e-3, (name, off)
        assert d1.abs().max() > lr / 2, name  # the step did update
    # discord weights tokens unevenly: its loss is not SFT's on the same batch.
    _, sft = full_batch_sft
    assert abs(two[1]["loss"] - sft[1]["loss"]) > 1e-3


def test_a_16k_token_row_trains_on_cpu(ray_local, tiny_student, tmp_path):
    # One 16,384-token row packed beside two short ones, activation checkpointing on,
    # one worker: no [T x vocab] tensor (chunked head) and sdpa attention.
    rng = torch.Generator().manual_seed(0)
    long_ids = torch.randint(3, 500, (16_384,), generator=rng).tolist()
    rows = [(long_ids, [False] * 64 + [True] * (16_384 - 64))]
    rows += [([5, 6, 7, 8, 9, 10], [False, False, True, True, True, True])] * 2
    scored = write_scored_rows(tiny_student, tmp_path / "scored", rows)
    cfg = _cfg(
        tiny_student,
        "discord",
        num_workers=1,
        micro_batch_tokens=16_400,
        grad_accum=1,
        max_steps=1,
        val_share=0.0,
        checkpoint_every=1,
        gradient_checkpointing=True,
    )
    summary, by_step = _train(cfg, scored, tmp_path / "run")
    m = by_step[1]
    assert m["budget_fill"] == pytest.approx((16_384 + 12) / 16_400)
    assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0
    assert Path(summary["model_dir"], "model.safetensors").exists()


def _files(folder: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


@pytest.mark.parametrize("keep, reruns", [(None, 3), (1, 1)])
def test_a_finished_run_rerun_at_its_final_step_re_exports_the_same_model(
    ray_local, tiny_student, scored, tmp_path, keep, reruns
):
    # The exported model deleted after the run and the run repeated (a stage whose model
    # went missing reruns): each rerun resumes at the final step, takes no step and copies
    # the model out of the final checkpoint. Reporting that checkpoint again under its own
    # name made Ray Train keep two entries for one folder and delete the folder with the
    # older entry (the second rerun with the default keep_checkpoints=2, the first with 1).
    extra = {} if keep is None else {"keep_checkpoints": keep}
    cfg = _cfg(
        tiny_student,
        num_workers=1,
        max_steps=2,
        grad_accum=1,
        val_share=0.0,
        checkpoint_every=1,
        **extra,
    )
    out = tmp_path / "run"
    first, _ = _train(cfg, scored, out)
    want = _files(first["model_dir"])
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(want)
    for _ in range(reruns):
        shutil.rmtree(first["model_dir"])
        again, by_step = _train(cfg, scored, out)
        assert again["checkpoint"] == first["checkpoint"]
        assert _files(again["model_dir"]) == want  # weights, config, tokenizer: same bytes
        assert again["metrics"]["step"] == 2
        assert again["metrics"]["loss"] == first["metrics"]["loss"]
        assert by_step[2]["resumed_from_step"] == 2 and by_step[2]["final"] is True
        assert by_step[2]["checkpoint_path"] == first["checkpoint"]  # what Tune reads
        assert Path(first["checkpoint"], "model", "model.safetensors").exists()


def test_export_loads_in_transformers_and_vllm(z2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = z2[0]["model_dir"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok("Natalia sold clips", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    # vLLM's CPU build, in its own process (its engine spawns workers).
    script = textwrap.dedent(f"""
        import json
        if __name__ == "__main__":
            from vllm import LLM, SamplingParams
            llm = LLM(model={model_dir!r}, dtype="float32", max_model_len=256,
                      gpu_memory_utilization=0.1, enforce_eager=True)
            outs = llm.generate(["Natalia sold clips"], SamplingParams(max_tokens=5, temperature=0))
            print("RESULT " + json.dumps(list(outs[0].outputs[0].token_ids)))
    """)
    path = tmp_path / "vllm_load.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=400)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert len(json.loads(lines[0][7:])) == 5
