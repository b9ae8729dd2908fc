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
) -> str:
    """Save a random-init tiny Qwen2 causal LM and its tokenizer to ``out_dir``; return it.

    ``role`` picks a size from TINY_SIZES (the teacher is larger than the student);
    ``sizes`` overrides it as (hidden, layers, heads, kv_heads, intermediate).
    """
    offline_env()
    import torch
    from transformers import Qwen2ForCausalLM

    if role not in TINY_SIZES and sizes is None:
        raise ValueError(f"role={role!r}: must be one of {sorted(TINY_SIZES)} or give sizes")
    tok = load_tokenizer(tokenizer)
    vocab = ((len(tok) + 63) // 64) * 64
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
