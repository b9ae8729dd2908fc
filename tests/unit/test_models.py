"""The tiny-model fixture, the shipped tokenizers, and a light `import raydc`."""

import subprocess
import sys

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
