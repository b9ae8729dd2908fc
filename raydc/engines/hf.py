"""The transformers scorer: a padded forward pass, log-softmax in float32, gather.

Log-probs are of softmax(logits / temperature). The logits are formed chunk by chunk from
the final hidden states, so the [tokens x vocab] float32 tensor never exceeds
``score.engine.max_num_batched_tokens`` rows at a time. Used as the reference the vLLM
scores are checked against, and as the fallback backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from raydc.engines.base import check_result

if TYPE_CHECKING:
    from raydc.config import VLLMEngineConfig

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "auto": "float32"}


class TransformersScorer:
    """``score_with_entropy`` gives the exact entropy beside the log-probs (from the same
    logits chunk; ``entropy_top_k`` is accepted for the scorers' one signature, unused)."""

    def __init__(
        self,
        model: str,
        engine: VLLMEngineConfig,
        temperature: float = 1.0,
        entropy_top_k: int = 0,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        from raydc.infra.models import offline_env

        offline_env()
        self.torch = torch
        self.device = torch.device(
            "cuda" if engine.gpus_per_engine > 0 and torch.cuda.is_available() else "cpu"
        )
        dtype = getattr(torch, DTYPES[engine.dtype])
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.vocab = self.model.get_output_embeddings().weight.shape[0]
        self.max_tokens = int(engine.max_num_batched_tokens)
        self.temperature = float(temperature)

    def score(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        return [lp for lp, _ in self._score(token_ids, entropy=False)]

    def score_with_entropy(
        self, token_ids: Sequence[Sequence[int]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row, the log-probs and the exact entropy [T] of the distribution each token
        was drawn from (position 0: 0.0)."""
        return self._score(token_ids, entropy=True)

    def _score(self, token_ids, entropy: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
        out: list[tuple[np.ndarray, np.ndarray | None]] = []
        rows = [list(map(int, r)) for r in token_ids]
        batch: list[int] = []
        # Batches bounded by padded tokens (rows x longest) so memory stays flat.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        results: dict[int, tuple] = {}
        for i in order:
            longest = max([len(rows[j]) for j in batch] + [len(rows[i])])
            if batch and longest * (len(batch) + 1) > self.max_tokens:
                results.update(self._forward(rows, batch, entropy))
                batch = []
            batch.append(i)
        if batch:
            results.update(self._forward(rows, batch, entropy))
        for i, r in enumerate(rows):
            check_result(i, r, None, results[i][0])
            out.append(results[i])
        return out

    def _forward(self, rows, idx: list[int], entropy: bool = False) -> dict[int, tuple]:
        torch = self.torch
        T = max(len(rows[i]) for i in idx)
        ids_BT = torch.zeros(len(idx), T, dtype=torch.long)
        attn_BT = torch.zeros(len(idx), T, dtype=torch.long)
        for b, i in enumerate(idx):
            ids_BT[b, : len(rows[i])] = torch.tensor(rows[i])
            attn_BT[b, : len(rows[i])] = 1
        ids_BT, attn_BT = ids_BT.to(self.device), attn_BT.to(self.device)
        with torch.no_grad():
            hidden_BTH = self.model.get_decoder()(
                input_ids=ids_BT, attention_mask=attn_BT
            ).last_hidden_state
            head = self.model.get_output_embeddings()
            logp_BT = torch.zeros(len(idx), T, dtype=torch.float32, device=self.device)
            ent_BT = torch.zeros(len(idx), T, dtype=torch.float32, device=self.device)
            step = max(1, self.max_tokens // max(1, len(idx)))
            for s in range(0, T - 1, step):
                e = min(T - 1, s + step)
                logits = head(hidden_BTH[:, s:e]).float()  # [B, chunk, V] predicts s+1..e
                if self.temperature != 1.0:
                    logits = logits / self.temperature
                lse = torch.logsumexp(logits, dim=-1)
                tgt = ids_BT[:, s + 1 : e + 1]
                logp_BT[:, s + 1 : e + 1] = logits.gather(-1, tgt[..., None])[..., 0] - lse
                if entropy:  # H = lse - sum_v p_v z_v, from the same chunk of logits
                    probs = torch.softmax(logits, dim=-1)
                    ent_BT[:, s + 1 : e + 1] = lse - (probs * logits).sum(-1)
        logp = logp_BT.cpu().numpy()
        ent = ent_BT.cpu().numpy() if entropy else None
        return {
            i: (logp[b, : len(rows[i])].copy(), None if ent is None else ent[b, : len(rows[i])])
            for b, i in enumerate(idx)
        }

    def close(self) -> None:
        self.model = None
