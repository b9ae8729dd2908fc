"""The tiny teacher fixture loads in vLLM's CPU build and scores like transformers."""

import pytest
import torch

pytestmark = pytest.mark.integration


def test_tiny_teacher_loads_in_vllm_and_matches_transformers(tiny_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    ids = tok("Weng earns 12 an hour. She worked 50 minutes.").input_ids
    llm = LLM(
        model=tiny_teacher,
        dtype="float32",
        max_model_len=256,
        gpu_memory_utilization=0.1,
        enforce_eager=True,
        enable_prefix_caching=False,
    )
    try:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    finally:
        del llm
    got = [None] + [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    ref = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert out.prompt_logprobs[0] is None
    assert got[1:] == pytest.approx(ref, abs=1e-4)


def test_vllm_entropy_estimate_brackets_the_exact_entropy(tiny_student):
    """The vLLM scorer's entropy (from the top-20 prompt log-probs) against the exact one
    from transformers: the exact entropy lies within the top-k bounds computed from the
    same top 20, and the stored estimate is their midpoint."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydc.config import ScoreConfig
    from raydc.engines import make_scorer
    from raydc.method.entropy import topk_entropy

    tok = AutoTokenizer.from_pretrained(tiny_student)
    rows = [
        tok("Weng earns 12 an hour. She worked 50 minutes. How much?").input_ids,
        tok("Natalia sold clips to 48 of her friends in April.").input_ids,
    ]
    cfg = ScoreConfig(backend="vllm", entropy_top_k=20)
    cfg.engine.dtype, cfg.engine.max_model_len = "float32", 256
    scorer = make_scorer(cfg, tiny_student, entropy=True)
    try:
        got = scorer.score_with_entropy(rows)
    finally:
        scorer.close()
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32).eval()
    for ids, (lp, h) in zip(rows, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        exact = -(logp.exp() * logp).sum(-1).numpy()
        bounds = topk_entropy(logp.topk(20, -1).values, logp.shape[-1])
        assert h[0] == 0.0 and len(h) == len(ids)
        assert np.all(bounds.lower.numpy() <= exact + 1e-6)
        assert np.all(exact <= bounds.upper.numpy() + 1e-6)
        np.testing.assert_allclose(h[1:], bounds.estimate.numpy(), atol=2e-3)
        assert lp[1:] == pytest.approx(
            [logp[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4
        )
