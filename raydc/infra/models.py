"""Loading students, teachers and tokenizers; the tiny models tests and examples use.

The tiny models are real Qwen2-architecture causal LMs (the Qwen2.5 student family) built
from a config with random weights and one of the tokenizers shipped in
raydc/assets/tokenizers/, saved with ``save_pretrained``: transformers and vLLM's CPU build
load them like any Hugging Face checkpoint (head_dim 64: vLLM CPU rejects 16). A model's
identity (name, sizes, headers; never every byte of big weights) is
``raydc.infra.artifacts.fingerprint_paths``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from raydc.config.tree import ConfigError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOKENIZERS = ("tiny-bpe", "tiny-wordpiece")

# role -> (hidden, layers, heads, kv heads, intermediate). head_dim = hidden / heads = 64.
TINY_SIZES = {
    "student": (128, 2, 2, 1, 256),
    "teacher": (192, 3, 3, 1, 384),
}


def offline_env() -> None:
    """No hub at run time: fail fast instead of waiting on a network that isn't there."""
    for k, v in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(k, v)


def tokenizer_path(name_or_path: str | os.PathLike) -> str:
    """A shipped tokenizer's folder by name (``tiny-bpe``), or the path as given."""
    if str(name_or_path) in TOKENIZERS:
        return str(ASSETS / "tokenizers" / str(name_or_path))
    return str(name_or_path)


def load_tokenizer(name_or_path: str | os.PathLike):
    offline_env()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path(name_or_path))


def qwen2_config(
    sizes: tuple[int, int, int, int, int],
    vocab_size: int,
    eos_token_id: int | None,
    pad_token_id: int | None,
    max_position_embeddings: int,
):
    """A small Qwen2 config from sizes (hidden, layers, heads, kv_heads, intermediate);
    head_dim = hidden / heads, untied embeddings, no BOS."""
    from transformers import Qwen2Config

    hidden, layers, heads, kv, inter = sizes
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        torch_dtype="float32",
    )


def build_tiny_model(
    out_dir: str | os.PathLike,
    role: str = "student",
    tokenizer: str = "tiny-bpe",
    seed: int = 0,
    max_position_embeddings: int = 2048,
    sizes: tuple[int, int, int, int, int] | None = None,
    vocab_size: int | None = None,
) -> str:
    """Save a random-init tiny Qwen2 causal LM and its tokenizer to ``out_dir``; return it.

    ``role`` picks a size from TINY_SIZES (the teacher is larger than the student);
    ``sizes`` overrides it as (hidden, layers, heads, kv_heads, intermediate).
    ``tokenizer``: a shipped name (TOKENIZERS) or a tokenizer folder (the real Qwen2 one:
    tests/assets/qwen2-tokenizer). ``vocab_size``: the embedding rows (Qwen's 151,936 pad
    its 151,646 tokens); None: the tokenizer's size rounded up to a multiple of 64.
    """
    offline_env()
    import torch
    from transformers import Qwen2ForCausalLM

    if role not in TINY_SIZES and sizes is None:
        raise ValueError(f"role={role!r}: must be one of {sorted(TINY_SIZES)} or give sizes")
    tok = load_tokenizer(tokenizer)
    vocab = ((len(tok) + 63) // 64) * 64 if vocab_size is None else int(vocab_size)
    if vocab < len(tok):
        raise ValueError(f"vocab_size={vocab_size}: below the tokenizer's {len(tok)} tokens")
    config = qwen2_config(
        sizes or TINY_SIZES[role],
        vocab,
        tok.eos_token_id,
        tok.pad_token_id,
        max_position_embeddings,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # A wider init than the default 0.02 so random models have non-trivial, distinct
    # distributions (log-probs far from uniform), which the tests need.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    out = Path(out_dir)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard tiny model needs no progress bar
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


# ----------------------------------------------------------------------------- input checks


def check_input(field: str, value: str | None) -> None:
    """An input file or folder named by a config field exists (URLs are not checked)."""
    if value and "://" not in value and not Path(value).exists():
        raise ConfigError(f"{field}={value!r}: no such file or folder")


def check_model(field: str, value: str | None, tokenizer_only: bool = False) -> None:
    """A model (or tokenizer) named by a config field must be a local folder holding it,
    or a hub name that can be reached (or is cached when the hub is offline)."""
    if not value or (tokenizer_only and value in TOKENIZERS):
        return
    p = Path(value).expanduser()
    need = "tokenizer_config.json" if tokenizer_only else "config.json"
    if p.exists() or value.startswith((".", "/", "~")):
        if not p.is_dir():
            raise ConfigError(f"{field}={value!r}: no such model folder")
        if not (p / need).is_file() and not (p / "config.json").is_file():
            raise ConfigError(f"{field}={value!r}: not a model folder (no {need} inside)")
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(value, need), str):
            raise ConfigError(
                f"{field}={value!r}: not a local folder, and the hub is offline "
                f"(HF_HUB_OFFLINE=1) with no cached copy; give the model's folder"
            )


# The config.json keys vLLM 0.32 reads a model's context from (the smallest present wins;
# ``vllm/transformers_utils/model_arch_config_convertor.py``), and the RoPE types whose
# ``max_position_embeddings`` is already scaled (vLLM multiplies the others by their factor).
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
_SCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def model_context(path: str | os.PathLike) -> tuple[int, str] | None:
    """The longest ``max_model_len`` vLLM accepts for the model folder ``path`` and where it
    comes from (``"max_position_embeddings=2048"``), derived as vLLM 0.32 does
    (``vllm.config.model._get_and_verify_max_len``): the smallest context key of its
    config.json, capped by the tokenizer's ``model_max_length``, times a RoPE scaling factor;
    a config.json ``model_max_length`` may allow more. None when unknown (no config.json,
    no key) or when ``VLLM_ALLOW_LONG_MAX_MODEL_LEN`` lifts vLLM's limit."""
    if os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").strip().lower() in ("1", "true"):
        return None
    p = Path(path).expanduser()
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    limit, source = math.inf, ""
    for key in CONTEXT_KEYS:
        v = text.get(key)
        if _number(v) and v < limit:
            limit, source = v, f"{key}={v}"
    if limit == math.inf:
        return None
    try:
        tok_max = json.loads((p / "tokenizer_config.json").read_text()).get("model_max_length")
    except (OSError, json.JSONDecodeError, AttributeError):
        tok_max = None
    if _number(tok_max) and tok_max < limit:
        limit, source = tok_max, f"its tokenizer's model_max_length={tok_max}"
    rope = text.get("rope_parameters") or text.get("rope_scaling")
    if isinstance(rope, dict):
        nested = rope and all(isinstance(r, dict) for r in rope.values())
        factor = 1.0
        for r in rope.values() if nested else [rope]:
            kind = r.get("rope_type", r.get("type"))
            if kind not in _SCALED_ROPE and _number(r.get("factor")):
                factor = r["factor"]
        if factor != 1.0:
            limit, source = limit * factor, f"{source} x RoPE factor {factor}"
    allowed = text.get("model_max_length")
    if _number(allowed) and allowed > limit:
        limit, source = allowed, f"model_max_length={allowed}"
    return int(limit), source


def check_context(field: str, max_model_len: int, model_field: str, path: str | None) -> None:
    """An engine's context (``field``, a ``*.engine.max_model_len``) longer than the model
    ``model_field`` can serve fails here, naming both; vLLM refused it only when the
    engine started (``User-specified max_model_len ... is greater than the derived
    max_model_len``), after the stage had read and rendered its prompts. Models that are not
    local folders are not checked."""
    if not path or not Path(path).expanduser().is_dir():
        return
    context = model_context(path)
    if context is None or max_model_len <= context[0]:
        return
    limit, source = context
    raise ConfigError(
        f"{field}={max_model_len}: longer than the context of {model_field}={path!r} "
        f"({source}); set {field} to at most {limit} (a prompt and its max_new_tokens must "
        f"fit in it)"
    )


def check_vocab(field: str, path: str) -> None:
    """vLLM fails on a model whose embedding is smaller than its tokenizer's ids, late and
    with the cause only in a worker log."""
    try:
        vocab = json.loads((Path(path) / "config.json").read_text()).get("vocab_size")
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{field}={path!r}: unreadable config.json ({e})") from None
    if not isinstance(vocab, int):
        return
    n = len(load_tokenizer(path))
    if n > vocab:
        raise ConfigError(
            f"{field}={path!r}: its tokenizer has {n:,} tokens but the model's vocab_size is "
            f"{vocab:,}; token ids >= {vocab:,} cannot be scored (is this the right tokenizer?)"
        )
