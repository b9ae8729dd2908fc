"""raydc's training step on one GPU: packed forward + chunked weighted loss + backward.

Needs only torch and transformers (no Ray, vLLM or DeepSpeed): run it from a checkout on a
GPU machine, `PYTHONPATH=. python bench/gpu_step.py --out gpu_step.json`. It builds a
random-init Qwen2-shaped model of ~0.5B parameters (Qwen2.5-0.5B's shape: hidden 896, 24
layers, 14 heads, 2 KV heads, intermediate 4,864, vocabulary 151,936) in bf16, packs
long-tailed rows (lognormal lengths) into one sequence of 8K and of 32K tokens with raydc's
own collate, and times raydc's step maths on it: ``StudentLogprobs`` (the transformer body,
then the LM head through ``raydc.method.loss.chunked_token_logprobs``), the ``discord`` weights per
row and the self-normalised weighted loss, and the backward; with and without activation
checkpointing. Attention: FlashAttention-2's varlen kernel when flash-attn is installed,
else ``sdpa_packed`` (sdpa on each row's segment). Reports tokens/s, MFU (6 x parameters x
tokens/s, and with the attention FLOPs of the packed rows) against the dense bf16 peak, and
peak memory. Fits in 10 minutes on one H200; ``--device cpu --tiny`` checks the script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(hidden=896, layers=24, heads=14, kv=2, inter=4864, vocab=151_936)
TINY = dict(hidden=128, layers=2, heads=2, kv=1, inter=256, vocab=2048)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16


def build(shape: dict, device: str, attn: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from raydc.train.model import PACKED_SDPA, StudentLogprobs, _register_packed_sdpa

    cfg = Qwen2Config(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        max_position_embeddings=65_536,
        tie_word_embeddings=False,
    )
    if attn == PACKED_SDPA:
        _register_packed_sdpa()
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        lm = Qwen2ForCausalLM(cfg).to(dtype)
    lm.config.use_cache = False
    lm.train()
    return lm, StudentLogprobs(lm, chunk_size=4096)


def packed_batch(tokens: int, vocab: int, seed: int = 0):
    """Rows of lognormal length (median ~1.6K) filling ``tokens`` exactly, packed."""
    import numpy as np
    import pyarrow as pa

    from raydc.train.batch import RowBlock, collate

    rng = np.random.default_rng(seed)
    lens, left = [], tokens
    while left > 0:
        L = int(min(left, max(16, rng.lognormal(7.4, 0.8))))
        if left - L < 16:
            L = left
        lens.append(L)
        left -= L
    cols = {
        "row_id": [],
        "input_ids": [],
        "loss_mask": [],
        "student_logprobs": [],
        "teacher_logprobs": [],
    }
    for r, L in enumerate(lens):
        cols["row_id"].append(f"r{r}")
        cols["input_ids"].append(rng.integers(3, vocab, L).tolist())
        cols["loss_mask"].append([False] * 8 + [True] * (L - 8))
        for k in ("student_logprobs", "teacher_logprobs"):
            lp = (-rng.gamma(1.0, 1.5, L)).tolist()
            lp[0] = 0.0
            cols[k].append(lp)
    block = RowBlock.from_table(pa.table(cols))
    return collate(block, list(range(len(lens))), packed=True), lens


def attention_flops(lens, shape) -> float:
    """Forward + backward FLOPs of causal attention over the packed rows (QK^T and AV:
    2 x 2 x L^2 / 2 x head_dim x heads per layer forward, x3 with the backward)."""
    d = shape["hidden"]
    return 3 * sum(2.0 * L * L * d for L in lens) * shape["layers"]


def time_cell(model, lm, mb, lens, shape, checkpointing: bool, steps: int, device: str) -> dict:
    import torch

    from raydc.method.loss import loss_denominators, weighted_token_loss
    from raydc.method.weights import preset
    from raydc.train.step import micro_batch_weights

    if checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_disable()
    mb = mb.to(device)
    wc = preset("discord")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        logp = model(mb.input_ids, mb.position_ids)
        w = micro_batch_weights(mb, wc)
        denom = loss_denominators(w, mb.loss_mask)["weight_sum"]
        loss = weighted_token_loss(-logp.float(), w, mb.loss_mask, "self_norm", denominator=denom)
        loss.backward()
        for p in lm.parameters():
            p.grad = None

    step()  # warm-up (kernels, allocator)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    n_params = sum(p.numel() for p in lm.parameters())
    tokens = int(mb.input_ids.numel())
    out = {
        "tokens": tokens,
        "rows": len(lens),
        "checkpointing": checkpointing,
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "params": n_params,
        "model_tflops_per_s": 6 * n_params * tokens / dt / 1e12,
        "with_attention_tflops_per_s": (6 * n_params * tokens + attention_flops(lens, shape))
        / dt
        / 1e12,
    }
    if device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    import importlib.util

    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (checks the script)")
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    shape = TINY if a.tiny else SHAPE
    fa2 = a.device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    attn = "flash_attention_2" if fa2 else "sdpa_packed"
    lm, model = build(shape, a.device, attn)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    report = {
        "device": name,
        "attn_implementation": attn,
        "shape": shape,
        "torch": torch.__version__,
        "cells": [],
    }
    for T in map(int, a.tokens.split(",")):
        mb, lens = packed_batch(T, shape["vocab"])
        for ck in (False, True):
            cell = time_cell(model, lm, mb, lens, shape, ck, a.steps, a.device)
            if peak:
                cell["mfu"] = cell["model_tflops_per_s"] / peak
                cell["mfu_with_attention"] = cell["with_attention_tflops_per_s"] / peak
            report["cells"].append(cell)
            print(json.dumps(cell), flush=True)
            if a.device == "cuda":
                torch.cuda.empty_cache()
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
