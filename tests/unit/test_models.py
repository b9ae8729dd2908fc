"""The tiny-model fixture, the shipped tokenizers, and a light `import raydc`."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raydc.infra.artifacts import fingerprint_paths
from raydc.infra.models import build_tiny_model, load_tokenizer

from ..conftest import QWEN2_TOKENIZER


def test_import_raydc_is_light():
    code = (
        "import sys, raydc, raydc.method.weights, raydc.method.loss, raydc.method.selection, raydc.method.spans, raydc.config\n"
        "bad = [m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_tiny_models_load_and_differ(tiny_student, tiny_teacher):
    s = AutoModelForCausalLM.from_pretrained(tiny_student)
    t = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert s.config.head_dim == 64 and t.config.head_dim == 64
    n_s = sum(p.numel() for p in s.parameters())
    n_t = sum(p.numel() for p in t.parameters())
    assert n_t > n_s
    tok = AutoTokenizer.from_pretrained(tiny_student)
    ids = tok("Natalia sold 48 clips.", return_tensors="pt").input_ids
    with torch.no_grad():
        ls = torch.log_softmax(s(ids).logits, -1)
        lt = torch.log_softmax(t(ids).logits, -1)
    assert torch.isfinite(ls).all() and not torch.allclose(ls, lt, atol=0.1)
    # generation works (greedy, a few tokens)
    out = s.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_fingerprint_tracks_weights(tmp_path, tiny_student):
    a = build_tiny_model(tmp_path / "a", "student", seed=0)
    b = build_tiny_model(tmp_path / "b", "student", seed=1)
    assert fingerprint_paths(a) == fingerprint_paths(tiny_student)
    assert fingerprint_paths(a) != fingerprint_paths(b)


def test_shipped_tokenizers_and_chat_template():
    bpe, wp = load_tokenizer("tiny-bpe"), load_tokenizer("tiny-wordpiece")
    text = "Natalia sold 48/2 = 24 clips in May."
    assert bpe(text).input_ids != wp(text).input_ids
    assert bpe.decode(bpe(text).input_ids) == text
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]
    rendered = bpe.apply_chat_template(msgs, tokenize=False)
    assert rendered == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
    assert bpe.eos_token == "<|im_end|>" and bpe.pad_token == "<|endoftext|>"


def test_real_qwen2_tokenizer_ships():
    tok = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    assert tok("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert len(tok) == 151646


def test_tiny_model_with_the_real_qwen2_tokenizer_folder(tmp_path):
    out = build_tiny_model(
        tmp_path / "q", tokenizer=QWEN2_TOKENIZER, vocab_size=151936, sizes=(64, 1, 1, 1, 64)
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 151936 and model.config.head_dim == 64
    assert model.config.eos_token_id == 151645 and model.config.pad_token_id == 151643
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Hello, world!").input_ids == [9707, 11, 1879, 0] and len(tok) == 151646
    with torch.no_grad():
        assert model(torch.tensor([[9707, 11]])).logits.shape == (1, 2, 151936)
    with pytest.raises(ValueError, match="151646"):
        build_tiny_model(tmp_path / "small", tokenizer=QWEN2_TOKENIZER, vocab_size=1024)


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def test_fingerprint_reads_a_bounded_amount_and_sees_header_and_blocks(tmp_path):
    import json
    import os

    model = tmp_path / "big"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 8}))
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [64 << 20], "data_offsets": [0, 256 << 20]}}
    )
    weights = model / "model.safetensors"
    with open(weights, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header.encode())
        f.truncate(8 + len(header) + (256 << 20))  # a sparse 256 MiB file
    before = _rchar()
    fp = fingerprint_paths(model)
    read = _rchar() - before
    # ten 1 MiB blocks, the header and the config: not the 256 MiB of weights
    assert read < 16 << 20, read
    # a change in the first MiB of the data, or in the header, changes the identity
    with open(weights, "r+b") as f:
        f.seek(8 + len(header) + 100)
        f.write(b"\x01")
    fp2 = fingerprint_paths(model)
    assert fp2 != fp
    other = header.replace("F32", "F16")
    with open(weights, "r+b") as f:
        f.write(len(other).to_bytes(8, "little") + other.encode())
    assert fingerprint_paths(model) not in (fp, fp2)
    # the size is part of the identity
    os.truncate(weights, (256 << 20) + 1024)
    assert len({fp, fp2, fingerprint_paths(model)}) == 3


def _model_folder(path, tokenizer_max=None, **config) -> str:
    """A model folder as the checks read it: config.json and tokenizer_config.json only."""
    import json

    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if tokenizer_max is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": tokenizer_max}))
    return str(path)


def test_model_context_is_the_limit_vllm_derives(tmp_path, monkeypatch):
    """vLLM 0.32 refuses an engine whose max_model_len exceeds what it derives from the
    model's files (``_get_and_verify_max_len``); each case hand-computed from those rules."""
    from raydc.config import ConfigError
    from raydc.infra.models import check_context, model_context

    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    plain = _model_folder(tmp_path / "a", tokenizer_max=4096, max_position_embeddings=256)
    assert model_context(plain) == (256, "max_position_embeddings=256")
    # the smallest key wins, and a smaller tokenizer model_max_length caps it
    two = _model_folder(tmp_path / "b", max_position_embeddings=1024, n_positions=512)
    assert model_context(two) == (512, "n_positions=512")
    capped = _model_folder(tmp_path / "c", tokenizer_max=300, max_position_embeddings=1024)
    assert model_context(capped) == (300, "its tokenizer's model_max_length=300")
    # linear RoPE scaling multiplies; yarn's max_position_embeddings is already scaled
    linear = _model_folder(
        tmp_path / "d", max_position_embeddings=1024, rope_scaling={"type": "linear", "factor": 4}
    )
    assert model_context(linear)[0] == 4096
    yarn = _model_folder(
        tmp_path / "e",
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
    )
    assert model_context(yarn)[0] == 1024
    assert model_context(_model_folder(tmp_path / "f", hidden_size=8)) is None  # no key
    assert model_context(tmp_path / "missing") is None

    check_context("eval.engine.max_model_len", 256, "score.student", plain)  # fits exactly
    with pytest.raises(ConfigError) as e:
        check_context("eval.engine.max_model_len", 257, "score.student", plain)
    assert str(e.value) == (
        f"eval.engine.max_model_len=257: longer than the context of score.student={plain!r} "
        "(max_position_embeddings=256); set eval.engine.max_model_len to at most 256 (a prompt "
        "and its max_new_tokens must fit in it)"
    )
    check_context("eval.engine.max_model_len", 4096, "score.student", "Qwen/hub-name")  # no folder
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # vLLM's own override
    check_context("eval.engine.max_model_len", 4096, "score.student", plain)
