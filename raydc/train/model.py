"""The student as DeepSpeed trains it: token log-probs without full logits.

``StudentLogprobs`` wraps a Hugging Face causal LM. Its forward runs the transformer body
(``lm.model``: final hidden states, normed) and then the LM head *as a module call* whose
forward is ``raydc.loss.chunked_token_logprobs``: the [tokens x vocab] logits exist one
chunk at a time. Calling the head module (not reading ``lm_head.weight`` directly) keeps
ZeRO-3 correct: DeepSpeed gathers a module's partitioned parameters in that module's
forward and backward hooks.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from raydc.loss import chunked_token_logprobs


def _head_logprobs(self, hidden_BTH, targets_BT, chunk_size):
    return chunked_token_logprobs(
        hidden_BTH, self.weight, targets_BT, getattr(self, "bias", None), chunk_size
    )


class StudentLogprobs(nn.Module):
    """forward(input_ids [B, T], attention_mask [B, T] or None) -> logp [B, T - 1] of
    input_ids[:, 1:]. None suits right-padded rows (see ``_Worker._forward``)."""

    def __init__(self, lm: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        head = lm.get_output_embeddings()
        head.forward = types.MethodType(_head_logprobs, head)
        self._head = [head]  # not a submodule twice: it already lives under lm

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        body = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm.model
        hidden_BTH = body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return self._head[0](hidden_BTH[:, :-1], input_ids[:, 1:], self.chunk_size)
