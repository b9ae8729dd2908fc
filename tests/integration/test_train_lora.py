"""LoRA training on real Ray Train + DeepSpeed (CPU, gloo), 2 workers, the tiny Qwen2 pair.

One LoRA setting throughout (r 4, alpha 8, dropout 0.05 on every linear layer, packed rows,
activation checkpointing, grad_accum 2, student_ref current, the chunked weighted loss):

- ``z2``: ZeRO-2, 4 steps, checkpoints every 2: exports the merged model and the adapter;
  the adapter on the untouched base is the merged model (the base never moved), the
  optimizer holds the adapters' state alone, and checkpoints hold no base weights;
- the same run with the last worker killed after step 3: Ray Train restarts from the
  step-2 checkpoint and every step's rows, loss and learning rate, and the exported
  model, are those of ``z2``;
- ZeRO-3: the same steps as ``z2`` (same losses), and the same export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ray import cloudpickle
from safetensors.torch import load_file

from raydc.config import from_dict
from tests import train_fixtures
from tests.train_fixtures import KillOnce, make_scored

cloudpickle.register_pickle_by_value(train_fixtures)

pytestmark = pytest.mark.integration

STEPS = 4
R, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def scored(tiny_student, tiny_teacher, tmp_path_factory) -> str:
    return make_scored(tiny_student, tiny_teacher, tmp_path_factory.mktemp("scored"), n_rows=32)


def _cfg(student: str, **train):
    base = dict(
        student=student,
        num_workers=2,
        zero_stage=2,
        max_steps=STEPS,
        lr=1e-2,
        lr_schedule="cosine",
        warmup_steps=1,
        min_lr_ratio=0.2,
        micro_batch_tokens=200,
        grad_accum=2,
        log_every=1,
        checkpoint_every=2,
        val_share=0.2,
        seed=0,
        student_ref="current",
        gradient_checkpointing=True,
        lora={"r": R, "alpha": ALPHA, "dropout": 0.05},
    )
    base.update(train)
    return from_dict({"train": base, "weights": {"preset": "discord"}})


def _train(cfg, scored: str, out: Path, after_step=None) -> tuple[dict, dict[int, dict]]:
    from raydc.train import run_train

    summary = run_train(cfg, scored, out, after_step=after_step)
    by_step = {}
    for line in Path(summary["metrics_path"]).read_text().splitlines():
        m = json.loads(line)
        by_step[m["step"]] = m  # a re-run step after a restart replaces the first attempt
    return summary, by_step


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def z2(ray_local, tiny_student, scored, tmp_path_factory):
    return _train(_cfg(tiny_student), scored, tmp_path_factory.mktemp("lora_z2"))


def _lora_params(student: str) -> int:
    """r (in + out) of each linear layer of every decoder layer, from the model's config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(student)
    h, inter, d = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    return c.num_hidden_layers * sum(R * (i + o) for i, o in shapes)


def test_a_lora_run_exports_the_merged_model_and_the_adapter(z2, tiny_student):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary, by_step = z2
    assert sorted(by_step) == list(range(1, STEPS + 1))
    last = by_step[STEPS]
    assert last["val_nll"] < by_step[1]["val_nll"]  # the adapters learned something
    trainable = _lora_params(tiny_student)
    assert last["trainable_params"] == trainable
    assert last["params"] == trainable + sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_student).parameters()
    )
    # ZeRO-2 over 2 ranks: each holds half of the adapters' fp32 master copy and of Adam's
    # two moments (12 bytes a parameter over 2), plus a step counter
    assert last["optimizer_state_mib"] * 2**20 == pytest.approx(12 * trainable / 2, abs=64)
    model_dir, adapter_dir = Path(summary["model_dir"]), Path(summary["adapter_dir"])
    assert adapter_dir == model_dir.parent / "adapter"
    merged = _weights(model_dir)
    assert not any("lora" in k for k in merged)
    # The adapter on the untouched base student is the merged model: DeepSpeed never moved
    # a base weight, and export merged W + (alpha / r) B A.
    base = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    again = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    moved = 0
    for name, w in merged.items():
        torch.testing.assert_close(w, again[name], atol=1e-6, rtol=1e-6)
        moved += not torch.equal(w, initial.state_dict()[name])
    assert moved == 2 * 7  # the 7 adapted linear layers of each of the 2 decoder layers
    # Checkpoints hold the adapters, not the base (which is the student folder's).
    ckpt = Path(summary["checkpoint"])
    states = sum(f.stat().st_size for f in ckpt.rglob("*.pt"))
    assert states < 0.25 * (model_dir / "model.safetensors").stat().st_size
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()


def test_a_killed_lora_run_resumes_to_the_same_model(ray_local, tiny_student, scored, z2, tmp_path):
    marker = tmp_path / "killed.txt"
    summary, by_step = _train(
        _cfg(tiny_student), scored, tmp_path / "run", after_step=KillOnce(3, str(marker))
    )
    assert marker.exists(), "the fault hook never fired"
    ref_summary, ref = z2
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert by_step[STEPS]["resumed_from_step"] == 2
    for s in range(1, STEPS + 1):
        assert by_step[s]["rows_fingerprint"] == ref[s]["rows_fingerprint"], s
        assert by_step[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-5), s
        assert by_step[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-9), s
    got, want = _weights(summary["model_dir"]), _weights(ref_summary["model_dir"])
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


def test_zero3_lora_takes_the_zero2_steps(ray_local, tiny_student, scored, z2, tmp_path):
    summary, by_step = _train(_cfg(tiny_student, zero_stage=3), scored, tmp_path / "run")
    ref_summary, ref = z2
    for s in range(1, STEPS + 1):
        assert by_step[s]["rows_fingerprint"] == ref[s]["rows_fingerprint"], s
        assert by_step[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-4), s
    got, want = _weights(summary["model_dir"]), _weights(ref_summary["model_dir"])
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)
    assert Path(summary["adapter_dir"], "adapter_config.json").exists()
