"""The student as DeepSpeed trains it: token log-probs without full logits.

``StudentLogprobs`` wraps a Hugging Face causal LM. Its forward runs the transformer body
(``lm.model``: final hidden states, normed) and then the LM head *as a module call* whose
forward is ``raydc.method.loss.chunked_token_logprobs``: the [tokens x vocab] logits exist one
chunk at a time. Calling the head module (not reading ``lm_head.weight`` directly) keeps
ZeRO-3 correct: DeepSpeed gathers a module's partitioned parameters in that module's
forward and backward hooks.

``load_student`` builds it the way a long-context run needs: the attention implementation
(``train.attn_implementation``: FlashAttention-2 on GPUs runs packed rows through its varlen
kernel; elsewhere ``sdpa_packed`` runs sdpa on each packed row's segment), non-reentrant
activation checkpointing of every decoder layer (``train.gradient_checkpointing``,
transformers' own), and under ZeRO-3 construction inside ``deepspeed.zero.Init``
(transformers does it while an ``HfDeepSpeedConfig`` is alive), so no worker ever holds the
whole model before it is partitioned.

LoRA (``train.lora.r > 0``): ``apply_lora`` wraps the causal LM in PEFT's
``PeftModelForCausalLM``; its adapters live inside the decoder layers, so the body call and
the chunked head above run unchanged (the head itself is never a target: the chunked loss
reads its weight directly). Only the adapters require gradients, so DeepSpeed's optimizer
holds state for them alone. ``write_export`` turns the trained weights into the exported
model: for LoRA, PEFT's adapter (``save_pretrained``) and the merged weights
(``merge_and_unload``), a plain model for vLLM and the next phase.
"""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import torch
from torch import nn

from raydc.method.loss import chunked_token_logprobs


def _head_logprobs(self, hidden_BTH, targets_BT, chunk_size, with_entropy=False):
    return chunked_token_logprobs(
        hidden_BTH,
        self.weight,
        targets_BT,
        getattr(self, "bias", None),
        chunk_size,
        with_entropy=with_entropy,
    )


class StudentLogprobs(nn.Module):
    """forward(input_ids [B, T], position_ids [B, T] or None) -> logp [B, T - 1] of
    input_ids[:, 1:]; with ``with_entropy=True``, (logp, entropy [B, T - 1]): also the
    student's predictive entropy in nats at each of those positions, detached, from the
    same chunked head pass.

    No attention mask: right-padded rows need none under causal attention (no real token
    sees a pad), and packed rows are told apart by ``position_ids`` restarting at 0.
    """

    def __init__(self, lm: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        head = lm.get_output_embeddings()
        head.forward = types.MethodType(_head_logprobs, head)
        self._head = [head]  # not a submodule twice: it already lives under lm

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        with_entropy: bool = False,
    ):
        body = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm.model
        hidden_BTH = body(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            **segment_kwargs(position_ids),
        ).last_hidden_state
        return self._head[0](hidden_BTH[:, :-1], input_ids[:, 1:], self.chunk_size, with_entropy)


PACKED_SDPA = "sdpa_packed"


def packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of packed rows on any device, without a [T x T] mask: torch's sdpa with
    ``is_causal`` on each row's segment, the segments given by ``cu_seq_lens_q`` (what
    FlashAttention-2's varlen kernel takes). Cost and memory are those of the rows alone
    (sum of L_i^2, not T^2). Without segments it is transformers' sdpa.

    Why a function of ours: sdpa given packed rows gets a dense block-diagonal mask (T^2
    memory, T^2 compute), torch's flex attention has no backward on the CPU, and
    FlashAttention is CUDA-only."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"):
        kwargs.pop(k, None)
    if cu is None or attention_mask is not None or len(cu) <= 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        out, _ = sdpa_attention_forward(
            module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **kwargs
        )
        outs.append(out)  # [B, L_i, H, D]
    return torch.cat(outs, dim=1), None


def _register_packed_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    # No mask is built: rows are told apart by their segments.
    AttentionMaskInterface.register(PACKED_SDPA, lambda *args, **kwargs: None)


def resolve_attn_implementation(name: str, on_gpu: bool) -> str:
    """``auto`` -> flash_attention_2 on a GPU with the flash-attn package, else
    sdpa_packed (sdpa, one segment per packed row)."""
    if name != "auto":
        return name
    if on_gpu and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return PACKED_SDPA


def segment_kwargs(position_ids: torch.Tensor | None) -> dict:
    """FlashAttention's varlen arguments for packed rows ([1, T] position ids restarting at
    0), computed once per micro-batch: cumulative row starts and the longest row."""
    if position_ids is None or position_ids.shape[0] != 1:
        return {}
    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten()
    if len(starts) <= 1:
        return {}
    cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)


def load_student(path: str, tc, on_gpu: bool, ds_config: dict | None = None) -> nn.Module:
    """The student's causal LM in fp32 master weights, ready for DeepSpeed: attention
    implementation, activation checkpointing, and ZeRO-3 partitioned construction."""
    from transformers import AutoModelForCausalLM

    impl = resolve_attn_implementation(tc.attn_implementation, on_gpu)
    if impl == PACKED_SDPA:
        _register_packed_sdpa()
    keep = None
    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (alive while the model is built)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    del keep
    lm.config.use_cache = False
    if tc.gradient_checkpointing:
        # Non-reentrant: correct when no input of a layer requires grad (a LoRA run's frozen
        # embeddings), which the reentrant variant is not.
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tc.lora.enabled:
        lm = apply_lora(lm, tc.lora)
    lm.train()  # checkpointing runs in training mode only (dropout as configured: Qwen2 has none)
    return lm


def peft_lora_config(lora, base: str | None = None):
    """``train.lora`` as PEFT's ``LoraConfig`` (``all-linear``: every linear layer but the
    output head, PEFT's own shorthand)."""
    from peft import LoraConfig

    targets = list(lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )


def apply_lora(lm: nn.Module, lora, low_cpu_mem_usage: bool = False) -> nn.Module:
    """PEFT LoRA adapters on ``lm``'s target modules; every other weight frozen (no
    gradient, no optimizer state). ``low_cpu_mem_usage``: adapters built on the meta
    device (the export's empty model, filled by ``load_state_dict(assign=True)``)."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = getattr(lm, "name_or_path", None) or None
    try:
        model = get_peft_model(
            lm, peft_lora_config(lora, base), low_cpu_mem_usage=low_cpu_mem_usage
        )
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"train.lora.target_modules={list(lora.target_modules)}: {e} (this model's linear "
            f"layers: {names})"
        ) from None
    if isinstance(model.get_output_embeddings(), BaseTunerLayer):
        raise ValueError(
            f"train.lora.target_modules={list(lora.target_modules)}: names the output head, "
            "which the chunked loss reads as a plain weight; adapt the decoder layers instead"
        )
    return model


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; whole sizes under ZeRO-3 partitioning."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def write_export(
    state: dict,
    student: str,
    tc,
    dtype: torch.dtype,
    tokenizer,
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
) -> None:
    """Write the trained weights ``state`` (names as the training model's
    ``named_parameters``: the PEFT model's under LoRA) as ``save_pretrained`` + tokenizer to
    ``model_dir`` in ``dtype``. Under LoRA also PEFT's adapter to ``adapter_dir``, and the
    model is the merged one (W + (alpha / r) B A, merged in float32 then cast)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(student)
    lora = tc.lora.enabled
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if lora else dtype)
    if lora:
        fresh = apply_lora(fresh, tc.lora, low_cpu_mem_usage=True)
        fresh.peft_config["default"].base_model_name_or_path = str(student)
        state = {k: v.float() for k, v in state.items()}
    fresh.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, _ in fresh.named_parameters() if n not in state]
    if missing:
        raise RuntimeError(f"export: parameters missing from the gathered state: {missing}")
    if lora:
        if adapter_dir is None:
            raise ValueError("write_export: a LoRA run needs adapter_dir")
        fresh.save_pretrained(str(adapter_dir), safe_serialization=True)
        fresh = fresh.merge_and_unload().to(dtype)
    fresh.config.dtype = dtype
    fresh.save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))
