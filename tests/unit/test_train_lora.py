"""LoRA (``train.lora``) on the tiny student, no Ray, no DeepSpeed: a step of the adapted
model is the low-rank update worked out by hand from the base model's gradient, only the
adapters ever change, the exported merged model and adapter give the adapted model's
logits, and the config refuses what would not work.

The stand-in engine does what DeepSpeed does with one rank and one micro-batch: the
backward of the step's loss and an optimizer step over the parameters it was given.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from raydc.config import ConfigError, LoraConfig, TrainConfig, from_dict
from raydc.method.loss import loss_denominators, weighted_token_loss
from raydc.method.weights import preset
from raydc.train.batch import collate
from raydc.train.metrics import optimizer_state_bytes
from raydc.train.model import StudentLogprobs, load_student, trainable_counts, write_export
from raydc.train.step import Learner, micro_batch_weights, no_reduce
from tests.unit.test_train_model import _block

R, ALPHA = 4, 8.0
S = ALPHA / R  # PEFT's scaling of B A
TARGETS = ["q_proj", "down_proj"]


class _Engine:
    """backward, then an optimizer step of ``opt`` (None: gradients are kept)."""

    def __init__(self, model, opt=None):
        self.module, self.opt = model, opt

    def __call__(self, input_ids, position_ids, **kwargs):
        return self.module(input_ids, position_ids, **kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return None


class _Sched:
    def get_last_lr(self):
        return [1e-3]


def _tc(**lora) -> TrainConfig:
    spec = dict(r=R, alpha=ALPHA, target_modules=TARGETS)
    spec.update(lora)
    return TrainConfig(lora=LoraConfig(**spec))


def _lora_model(student, tc=None, seed=0):
    torch.manual_seed(seed)
    lm = load_student(student, tc or _tc(), on_gpu=False)
    return lm, StudentLogprobs(lm, chunk_size=4)


def _sgd_step(model, mb, wc, lr):
    """One Learner step with plain SGD over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    Learner(_Engine(model, opt), _Sched(), TrainConfig(), wc, 1, no_reduce).step([mb])


def _base_grads(student, mb, wc, names):
    """dL/dW of the base model (no adapters) for the weights ``names`` (HF names)."""
    torch.manual_seed(0)
    lm = load_student(student, TrainConfig(), on_gpu=False)
    model = StudentLogprobs(lm, chunk_size=4)
    logp = model(mb.input_ids, mb.position_ids)
    w = micro_batch_weights(mb, wc)
    d = loss_denominators(w, mb.loss_mask)
    denom = d["weight_sum"] if wc.normalization == "self_norm" else d["tokens"]
    loss = weighted_token_loss(-logp, w, mb.loss_mask, wc.normalization, denominator=denom)
    loss.backward()
    params = dict(lm.named_parameters())
    return {n: params[n].grad.detach().clone() for n in names}


def _adapter_tensors(lm) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """HF weight name -> (W base, A, B) of every adapted linear layer."""
    params = dict(lm.named_parameters())
    out = {}
    for name in params:
        if name.endswith("lora_A.default.weight"):
            stem = name[: -len(".lora_A.default.weight")]
            hf = stem.removeprefix("base_model.model.") + ".weight"
            out[hf] = (
                params[f"{stem}.base_layer.weight"].detach().clone(),
                params[name].detach().clone(),
                params[f"{stem}.lora_B.default.weight"].detach().clone(),
            )
    return out


def _export(lm, student, tc, tmp_path):
    state = {n: p.detach().clone() for n, p in lm.named_parameters()}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    write_export(state, student, tc, torch.float32, tok, tmp_path / "model", tmp_path / "adapter")
    return tmp_path / "model", tmp_path / "adapter"


def test_a_lora_step_is_the_low_rank_update_worked_out_by_hand(tiny_student, tmp_path):
    """With B = 0 at the start, the adapted model is the base model, so the step's
    gradients follow from the base weight's gradient G by the chain rule:
    dL/dB = s G A^T and dL/dA = s B^T G = 0. One SGD step of rate lr then gives
    B1 = -lr s G A0^T, A1 = A0, and the merged weight W0 + s B1 A1."""
    wc = preset("discord")
    block = _block(seed=3, lengths=(9, 5, 14, 3))
    mb = collate(block, list(range(len(block))), packed=True)
    lm, model = _lora_model(tiny_student)
    before = _adapter_tensors(lm)
    assert sorted(before) == sorted(
        f"model.layers.{i}.{part}.weight"
        for i in range(2)
        for part in ("self_attn.q_proj", "mlp.down_proj")
    )
    for _, _, B0 in before.values():
        assert torch.count_nonzero(B0) == 0  # PEFT's init: the adapted model starts as the base
    G = _base_grads(tiny_student, mb, wc, list(before))
    lr = 0.5
    _sgd_step(model, mb, wc, lr)
    after = _adapter_tensors(lm)
    model_dir, _ = _export(lm, tiny_student, _tc(), tmp_path)
    merged = load_file(str(model_dir / "model.safetensors"))
    for name, (W0, A0, _) in before.items():
        W1, A1, B1 = after[name]
        assert torch.equal(W1, W0)  # the base weight itself never moves
        assert torch.equal(A1, A0)  # dL/dA = s B0^T G = 0
        torch.testing.assert_close(B1, -lr * S * G[name] @ A0.T, atol=1e-6, rtol=1e-5)
        assert torch.count_nonzero(B1) > 0
        # The exported weight is W + (alpha / r) B A of the adapter's tensors ...
        torch.testing.assert_close(merged[name], W0 + S * B1 @ A1, atol=1e-6, rtol=1e-6)
        # ... which is the base weight moved by -lr s^2 G A0^T A0.
        hand = W0 - lr * S * S * G[name] @ A0.T @ A0
        torch.testing.assert_close(merged[name], hand, atol=1e-5, rtol=1e-4)
    # The layers without adapters are exported as they were.
    base = load_file(str(model_dir / "model.safetensors"))
    params = dict(lm.named_parameters())
    k_proj = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(base[k_proj], params["base_model.model." + k_proj])


def test_only_the_adapters_change_and_the_optimizer_holds_their_state_alone(tiny_student):
    """AdamW with weight decay over every parameter of the model: after three steps every
    base weight is bit-identical (none ever had a gradient), every adapter moved; the
    optimizer's state covers the adapters alone."""
    wc = preset("discord")
    block = _block(seed=4)
    mbs = [collate(block, rows, packed=True) for rows in ([0, 1], [2, 3], [4, 0])]
    lm, model = _lora_model(tiny_student, _tc(target_modules=["all-linear"], dropout=0.1))
    start = {n: p.detach().clone() for n, p in lm.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    learner = Learner(_Engine(model, opt), _Sched(), TrainConfig(), wc, 1, no_reduce)
    for mb in mbs:
        learner.step([mb])
    lora = [n for n in start if ".lora_" in n]
    # all-linear: q k v o gate up down in each of the 2 layers, never the output head
    assert len(lora) == 2 * 7 * 2
    assert not any("lm_head" in n or "embed_tokens" in n for n in lora)
    for n, p in lm.named_parameters():
        if n in lora:
            assert not torch.equal(p, start[n]), n
        else:
            assert torch.equal(p, start[n]), n
    trainable, total = trainable_counts(lm)
    assert trainable == sum(start[n].numel() for n in lora)
    assert total == sum(t.numel() for t in start.values())
    # Adam's two moments (float32) and a step counter per adapter tensor, nothing else
    # (torch's AdamW on the model's own parameters keeps no master copy)
    moments = 2 * 4 * trainable
    steps = sum(s["step"].untyped_storage().nbytes() for s in opt.state.values())
    assert len(opt.state) == len(lora)
    assert optimizer_state_bytes(opt, model) == moments + steps


def test_the_exported_merged_model_and_adapter_give_the_adapted_models_logits(
    tiny_student, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    wc = preset("discord")
    block = _block(seed=5)
    mb = collate(block, list(range(len(block))), packed=False)
    tc = _tc(target_modules=["all-linear"])
    lm, model = _lora_model(tiny_student, tc)
    _sgd_step(model, mb, wc, lr=0.5)
    model_dir, adapter_dir = _export(lm, tiny_student, tc, tmp_path)
    lm.eval()
    x = mb.input_ids
    with torch.no_grad():
        # StudentLogprobs replaced the head's forward by the chunked log-probs: the adapted
        # model's logits are its body's hidden states times the head's weight
        hidden = lm.get_decoder()(input_ids=x).last_hidden_state
        adapted = hidden @ lm.get_output_embeddings().weight.T
        base = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32).eval()
        plain = base(input_ids=x).logits
        merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        got = merged(input_ids=x).logits
        reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
        via_adapter = reloaded(input_ids=x).logits
    assert (adapted - plain).abs().max() > 1e-3  # the adapters did change the model
    torch.testing.assert_close(got, adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(via_adapter, adapted, atol=1e-5, rtol=1e-5)
    # model/ is a plain checkpoint (no PEFT keys); adapter/ is PEFT's, pointing at the base
    assert not any("lora" in k for k in load_file(str(model_dir / "model.safetensors")))
    assert (model_dir / "tokenizer_config.json").exists()
    assert {p.name for p in adapter_dir.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    import json

    spec = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert spec["r"] == R and spec["lora_alpha"] == ALPHA
    assert spec["base_model_name_or_path"] == tiny_student


def test_activation_checkpointing_keeps_the_lora_gradients_with_dropout(tiny_student):
    """Dropout on the adapters' inputs, packed rows: the recomputed forward (non-reentrant
    checkpointing restores the RNG state) gives the gradients of the plain forward."""
    wc = preset("discord")
    block = _block(seed=6)
    mb = collate(block, list(range(len(block))), packed=True)

    def grads(checkpointing):
        tc = _tc(dropout=0.2)
        tc.gradient_checkpointing = checkpointing
        lm, model = _lora_model(tiny_student, tc)
        torch.manual_seed(11)
        Learner(_Engine(model), _Sched(), TrainConfig(), wc, 1, no_reduce).step([mb])
        return {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert sorted(plain) == sorted(ckpt)
    assert plain and all(".lora_" in n for n in plain)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lora.r=-1", r"train\.lora\.r=-1: must be >= 0"),
        ("train.lora.alpha=0", r"train\.lora\.alpha=0\.0: must be > 0"),
        ("train.lora.dropout=1.0", r"train\.lora\.dropout=1\.0: must be in \[0, 1\)"),
        ("train.lora.dropout=-0.1", r"train\.lora\.dropout=-0\.1: must be in \[0, 1\)"),
        ("train.lora.target_modules=[]", r"train\.lora\.target_modules=\[\]: name at least"),
        ("train.lora.target_modules=['']", r"train\.lora\.target_modules\[0\]=''"),
        ("train.lora.target_modules=[q_proj, ' ']", r"train\.lora\.target_modules\[1\]"),
        ("train.lora.target_modules=[all-linear, q_proj]", "all-linear stands alone"),
        ("train.lora.target_modules=[lm_head]", "lm_head is the output head"),
        ("train.lora.rank=8", r"unknown config field\(s\) \['train\.lora\.rank'\]"),
        ("train.lora.r=two", r"train\.lora\.r='two': must be an integer"),
    ],
)
def test_bad_lora_settings_fail_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({}, [override])


def test_lora_settings_load_and_off_is_the_default():
    assert from_dict({}).train.lora.enabled is False  # r: 0
    cfg = from_dict(
        {"train": {"lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]}}},
        ["train.lora.dropout=0.05"],
    )
    lora = cfg.train.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (
        16,
        32.0,
        0.05,
        ["q_proj", "v_proj"],
    )
    assert lora.enabled


def test_a_target_module_the_model_lacks_fails_naming_its_linear_layers(tiny_student):
    with pytest.raises(ValueError, match=r"train\.lora\.target_modules=\['qkv'\].*q_proj"):
        load_student(tiny_student, _tc(target_modules=["qkv"]), on_gpu=False)


def test_a_tune_space_over_lora_fields_makes_lora_trials():
    from raydc.tune import check_space, trial_config

    base = {
        "train": {"val_share": 0.1},
        "tune": {
            "enabled": True,
            "metric": "val_nll",  # judged on train.val_share: no eval problems needed
            "space": {"train.lora.r": [0, 8], "train.lora.alpha": [16]},
        },
    }
    cfg = from_dict(base)
    check_space(cfg)
    trial = trial_config(cfg, {"train.lora.r": 8, "train.lora.alpha": 16})
    assert trial.train.lora.r == 8 and trial.train.lora.enabled
    bad = from_dict(base, {"tune.space": {"train.lora.r": [-2]}})
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.lora\.r.*must be >= 0"):
        check_space(bad)


def test_phases_with_lora_start_a_fresh_adapter_on_the_previous_merged_model():
    phases = [{"name": "a"}, {"name": "b"}]
    tree = {"train": {"lora": {"r": 8}}, "phases": phases}
    with pytest.raises(ConfigError, match=r"phases\[1\]\.optimizer='carry' \(b\).*fresh"):
        from_dict(tree)
    fresh = [{"name": "a"}, {"name": "b", "optimizer": "fresh"}]
    assert from_dict(dict(tree, phases=fresh)).train.lora.r == 8
    # a LoRA phase after a full one cannot carry the full run's optimizer state either
    mixed = [{"name": "a"}, {"name": "b", "train": {"lora": {"r": 8}}}]
    with pytest.raises(ConfigError, match=r"phases\[1\]\.optimizer='carry'"):
        from_dict({"phases": mixed})


def test_a_full_run_exports_its_own_weights_and_no_adapter(tiny_student, tmp_path):
    """r: 0 (the default): ``write_export`` saves the model's weights as they are, and
    ``export_model`` copies model/ and removes an earlier LoRA run's adapter beside it."""
    from transformers import AutoTokenizer

    from raydc.train.trainer import export_model

    torch.manual_seed(0)
    lm = load_student(tiny_student, TrainConfig(), on_gpu=False)
    with torch.no_grad():
        lm.get_output_embeddings().weight.add_(0.5)  # a weight the student folder lacks
    state = {n: p.detach().clone() for n, p in lm.named_parameters()}
    ckpt = tmp_path / "ckpt"
    tok = AutoTokenizer.from_pretrained(tiny_student)
    write_export(state, tiny_student, TrainConfig(), torch.float32, tok, ckpt / "model")
    assert not (ckpt / "adapter").exists()
    saved = load_file(str(ckpt / "model" / "model.safetensors"))
    assert saved.keys() == state.keys()
    for name, w in state.items():
        assert torch.equal(saved[name], w), name
    stale = tmp_path / "out" / "adapter"
    stale.mkdir(parents=True)
    (stale / "adapter_config.json").write_text("{}")
    export_model(str(ckpt), tmp_path / "out" / "model")
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
    assert not stale.exists()
