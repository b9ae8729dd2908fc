"""Loading students, teachers and tokenizers; the tiny models tests and examples use.

The tiny models are real Qwen2-architecture causal LMs (the Qwen2.5 student family) built
from a config with random weights and one of the tokenizers shipped in
raydc/assets/tokenizers/, saved with ``save_pretrained``: transformers and vLLM's CPU build
load them like any Hugging Face checkpoint (head_dim 64: vLLM CPU rejects 16).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
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
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if role not in TINY_SIZES and sizes is None:
        raise ValueError(f"role={role!r}: must be one of {sorted(TINY_SIZES)} or give sizes")
    hidden, layers, heads, kv, inter = sizes or TINY_SIZES[role]
    tok = load_tokenizer(tokenizer)
    vocab = ((len(tok) + 63) // 64) * 64
    config = Qwen2Config(
        vocab_size=vocab,
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
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
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


# The identity check reads O(1) bytes of a weight file, whatever its size: its name, size,
# header (safetensors: the JSON of tensor names, dtypes, shapes and offsets) and a few
# sampled blocks of its data (the first and last MiB and 8 blocks between them). Training
# changes every tensor, so two checkpoints of one architecture differ in every sampled
# block; a 15 GB student is fingerprinted in milliseconds (bench/fingerprint.py).
SAMPLE_BLOCK = 1 << 20
SAMPLE_INNER = 8
SMALL_FILE = 4 << 20  # files up to this size are hashed whole
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".jinja", ".pt")


def _safetensors_header(fh) -> bytes:
    head = fh.read(8)
    if len(head) < 8:
        return head
    n = int.from_bytes(head, "little")
    return head + fh.read(min(n, 100 << 20))


def file_digest(path: str | os.PathLike) -> str:
    """A short digest of one file: its whole content when small, else its size, header
    and sampled blocks (O(1) reads)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(f"{p.name}:{size}".encode())
    with open(p, "rb") as fh:
        if size <= SMALL_FILE:
            h.update(fh.read())
            return h.hexdigest()[:16]
        if p.suffix == ".safetensors":
            h.update(_safetensors_header(fh))
        step = (size - SAMPLE_BLOCK) / (SAMPLE_INNER + 1)
        for k in range(SAMPLE_INNER + 2):
            fh.seek(int(k * step) if k <= SAMPLE_INNER else size - SAMPLE_BLOCK)
            h.update(fh.read(SAMPLE_BLOCK))
    return h.hexdigest()[:16]


def fingerprint(path: str | os.PathLike) -> str:
    """A short identity hash of a model or tokenizer folder (config, tokenizer files, and
    each weight file's name, size, header and sampled blocks: ``file_digest``), used in
    score manifests so training can refuse another student's scores. Cheap: it reads a few
    MiB per weight file, not every byte. A hub name (no local folder) hashes the name."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        names = sorted(f for f in os.listdir(p) if f.endswith(MODEL_FILE_SUFFIXES))
        for name in names:
            if (p / name).is_file():
                h.update(f"{name}:{file_digest(p / name)}".encode())
    else:
        h.update(json.dumps(str(path)).encode())  # a hub name: no local files to hash
    return h.hexdigest()[:16]
