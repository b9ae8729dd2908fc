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
