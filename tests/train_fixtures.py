"""Scored Parquet for the training tests, made with a plain transformers forward.

``make_scored`` writes what the scoring stage writes (docs/contracts.md): ``part-*.parquet``
with the prepared + scored columns and ``manifest.json`` with the student's fingerprint, from
GSM8K question/answer pairs rendered with the student's chat template, so the training
tests need neither vLLM nor the scoring stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raydc.infra.models import ASSETS, offline_env
from raydc.score.store import write_store


def _logprobs(model_dir: str, ids_list: list[list[int]]) -> list[np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in ids_list:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
            lp = logp.gather(-1, x[0, 1:, None])[:, 0]
            out.append(np.concatenate([[0.0], lp.numpy()]).astype(np.float32))
    return out


def render(tok, question: str, answer: str, max_len: int) -> tuple[list[int], list[bool]]:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    full = prompt + answer + "<|im_end|>\n"
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"][:max_len]
    mask = [i >= len(p_ids) for i in range(len(ids))]
    return ids, mask


def make_scored(
    student_dir: str,
    teacher_dir: str | None,
    out_dir: str | Path,
    n_rows: int = 32,
    max_len: int = 128,
    n_files: int = 2,
    start: int = 0,
) -> str:
    """Write scored rows of GSM8K train items [start, start + n_rows) to ``out_dir``."""
    offline_env()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    items = []
    with open(ASSETS / "gsm8k" / "train.jsonl") as f:
        for i, line in enumerate(f):
            if i >= start + n_rows:
                break
            if i >= start:
                items.append(json.loads(line))
    ids_list, masks = [], []
    for it in items:
        # Cut question and answer so rows are short (CPU tests) but of varied length.
        q = it["question"][:60]
        a = it["answer"][: 40 + (len(it["question"]) * 7) % 80]
        ids, mask = render(tok, q, a, max_len)
        ids_list.append(ids)
        masks.append(mask)
    s_lp = _logprobs(student_dir, ids_list)
    t_lp = _logprobs(teacher_dir, ids_list) if teacher_dir else [None] * len(ids_list)
    n = len(ids_list)
    columns = {
        "row_id": [f"gsm8k:{start + k}" for k in range(n)],
        "prompt_id": [f"p{start + k}" for k in range(n)],
        "input_ids": ids_list,
        "loss_mask": masks,
        "teacher_logprobs": t_lp,
        "student_logprobs": s_lp,
    }
    return write_store(out_dir, columns, student_dir, teacher_dir, n_files=n_files)


@dataclass
class KillOnce:
    """An ``after_step`` hook: the last rank exits hard after ``step`` on the first attempt
    only (``marker`` records that it fired), once Ray Train has registered the newest
    checkpoint, so Ray Train restarts the worker group from it."""

    step: int
    marker: str

    def __call__(self, info) -> None:
        import os

        from raydc.train.loop import wait_for_checkpoint

        if info.step != self.step or info.rank != info.world - 1 or Path(self.marker).exists():
            return
        last = (info.step // info.checkpoint_every) * info.checkpoint_every
        if last:
            wait_for_checkpoint(info.run_dir, last)
        Path(self.marker).write_text(f"killed rank {info.rank} after step {info.step}\n")
        os._exit(1)


def write_scored_rows(
    student_dir: str, out_dir: str | Path, rows: list[tuple[list[int], list[bool]]]
) -> str:
    """Scored Parquet (student log-probs from a transformers forward) of the given
    (input_ids, loss_mask) rows, one file, with the manifest training checks."""
    offline_env()
    columns = {
        "row_id": [f"r{k}" for k in range(len(rows))],
        "prompt_id": [f"p{k}" for k in range(len(rows))],
        "input_ids": [ids for ids, _ in rows],
        "loss_mask": [m for _, m in rows],
        "student_logprobs": _logprobs(student_dir, [ids for ids, _ in rows]),
    }
    return write_store(out_dir, columns, student_dir)
