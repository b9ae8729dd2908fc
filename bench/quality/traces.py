"""Trace sets (teacher samples with their log-probs) and scoring them under a model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.quality.task import PAD
from raydc.method.loss import chunked_token_logprobs
from raydc.train.batch import RowBlock


@dataclass
class TraceSet:
    """Padded token rows and per-target arrays (position t scores token t + 1).

    ids_BL: prompt + response (ending with EOS if it finished), right-padded with PAD. Target arrays are [B, L - 1]:
    loss_mask (response tokens and EOS), teacher_lp (teacher log-probs, 0 where unknown),
    student_lp (the initial student's log-probs, filled by ``score_traces``), sentence_ids
    (one sentence per step line). prompt_id groups candidates of one problem.
    """

    ids_BL: torch.Tensor
    loss_mask: torch.Tensor
    teacher_lp: torch.Tensor
    student_lp: torch.Tensor
    sentence_ids: torch.Tensor
    prompt_id: torch.Tensor
    lengths: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids_BL.shape[0])

    def subset(self, idx: Sequence[int]) -> TraceSet:
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        meta = dict(self.meta)
        if "row_flops" in meta:  # per row (bench.quality.flops.trace_row_flops)
            meta["row_flops"] = {
                k: [v[i] for i in ix.tolist()] for k, v in meta["row_flops"].items()
            }
        return TraceSet(
            self.ids_BL[ix],
            self.loss_mask[ix],
            self.teacher_lp[ix],
            self.student_lp[ix],
            self.sentence_ids[ix],
            self.prompt_id[ix],
            self.lengths[ix],
            meta,
        )

    def row_block(self) -> RowBlock:
        """The rows as the trainer's flat ``RowBlock`` (what ``collate`` batches): per-token
        columns unshifted, so position t holds token t and its log-probs, position 0 none.
        Every row counts as having teacher log-probs (0 where unknown)."""
        n, L = self.ids_BL.shape
        keep_BL = torch.arange(L)[None, :] < self.lengths[:, None]

        def per_token(x_BT: torch.Tensor) -> np.ndarray:
            """[B, L - 1] targets -> [N] per token, row after row."""
            return torch.cat([torch.zeros_like(x_BT[:, :1]), x_BT], dim=1)[keep_BL].numpy()

        return RowBlock(
            row_ids=[str(i) for i in range(n)],
            offsets=np.concatenate([[0], np.cumsum(self.lengths.numpy())]).astype(np.int64),
            input_ids=self.ids_BL[keep_BL].numpy().astype(np.int32),
            loss_mask=per_token(self.loss_mask),
            sentence_ids=per_token(self.sentence_ids).astype(np.int32),
            student_logprobs=per_token(self.student_lp).astype(np.float32),
            teacher_logprobs=per_token(self.teacher_lp).astype(np.float32),
            has_teacher=np.ones(n, dtype=bool),
        )

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TraceSet:
        return cls(**torch.load(path, weights_only=False))


def build_trace_set(
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    teacher_lps: Sequence[Sequence[float]] | None = None,
    prompt_ids: Sequence[int] | None = None,
    newlines: set[int] = frozenset(),
    student_lps: Sequence[Sequence[float]] | None = None,
) -> TraceSet:
    """Rows from prompt ids and response ids (each response already ends with EOS if it
    finished). teacher_lps[i][j] is the teacher's log-prob of responses[i][j] (student_lps
    the student's: on-policy samples' sampling log-probs); a token in ``newlines`` closes
    its sentence (one sentence per scratchpad line)."""
    n = len(prompts)
    if len(responses) != n:
        raise ValueError(f"{n} prompts but {len(responses)} responses")
    lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    L = max(lens)
    ids = torch.full((n, L), PAD, dtype=torch.long)
    mask = torch.zeros(n, L - 1, dtype=torch.bool)
    tlp = torch.zeros(n, L - 1, dtype=torch.float32)
    slp = torch.zeros(n, L - 1, dtype=torch.float32)
    sid = torch.zeros(n, L - 1, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p or not r:
            raise ValueError(f"row {i}: empty prompt or response")
        row = list(p) + list(r)
        ids[i, : len(row)] = torch.tensor(row)
        a, b = len(p) - 1, len(row) - 1  # targets of the response tokens
        mask[i, a:b] = True
        for who, lps, out in (("teacher", teacher_lps, tlp), ("student", student_lps, slp)):
            if lps is not None:
                if len(lps[i]) != len(r):
                    raise ValueError(f"row {i}: {len(lps[i])} {who} log-probs for {len(r)} tokens")
                out[i, a:b] = torch.tensor(lps[i], dtype=torch.float32)
        # Sentence = step line: a token belongs to the line it is on (the newline closes it).
        s = 0
        for j, tok in enumerate(r):
            sid[i, a + j] = s
            if tok in newlines:
                s += 1
    pid = torch.tensor(list(prompt_ids) if prompt_ids is not None else range(n))
    return TraceSet(ids, mask, tlp, slp, sid, pid, torch.tensor(lens))


def model_token_logprobs(
    model, ids_BL: torch.Tensor, chunk_size: int = 4096, with_entropy: bool = False
):
    """log p(ids[:, t + 1] | ids[:, :t + 1]) [B, L - 1] via the library's chunked CE (with
    ``with_entropy``, ``(logp, entropy)``: each position's predictive entropy too).

    Rows are right-padded, so no attention mask is needed: causal attention never lets a
    real token see the padding after it, and padded targets are off the loss mask.
    """
    hidden = model.model(input_ids=ids_BL).last_hidden_state  # [B, L, H]
    return chunked_token_logprobs(
        hidden[:, :-1],
        model.lm_head.weight,
        ids_BL[:, 1:],
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )


@torch.no_grad()
def score_traces(model, ts: TraceSet, batch: int = 256) -> torch.Tensor:
    """The model's log-probs of every target [B, L - 1] (0 off the loss mask)."""
    model.eval()
    out = torch.zeros_like(ts.teacher_lp)
    for i in range(0, len(ts), batch):
        ids = ts.ids_BL[i : i + batch]
        L = int(ts.lengths[i : i + batch].max())
        lp = model_token_logprobs(model, ids[:, :L])
        m = ts.loss_mask[i : i + batch, : L - 1]
        out[i : i + batch, : L - 1] = torch.where(m, lp, torch.zeros_like(lp))
    return out
