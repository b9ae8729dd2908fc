"""Teacher sampling with vLLM and the check of its log-probs."""

from __future__ import annotations

import os
from collections.abc import Sequence

from raydc.quality.task import EOS
from raydc.quality.traces import build_trace_set, score_traces


def sample_with_vllm(
    model_dir: str,
    prompts: Sequence[list[int]],
    n: int,
    temperatures: Sequence[float],
    max_tokens: int,
    seed: int = 0,
) -> dict[float, list[list[tuple[list[int], list[float]]]]]:
    """Sample ``n`` continuations per prompt with one vLLM engine at each temperature;
    return {temperature: per prompt, [(token ids incl. EOS when reached, log-probs)]}.

    ``logprobs_mode="raw_logprobs"``: the log-probs are log-softmax of the raw logits, i.e.
    under the T = 1 distribution. At T = 1 (no top-k/top-p) that *is* the sampled
    distribution; for hotter sampling it is the teacher's own T = 1 view of the noisy
    token, which is what the weights compare the student to.
    """
    from raydc.models import offline_env

    offline_env()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=256,
        gpu_memory_utilization=0.05,
        skip_tokenizer_init=True,
        enforce_eager=True,
        enable_prefix_caching=False,
        logprobs_mode="raw_logprobs",
        seed=seed,
    )
    # No per-request seed: it would give every prompt the same random stream. The engine
    # seed makes a run reproducible.
    requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    results = {}
    for temperature in temperatures:
        params = SamplingParams(
            n=n,
            temperature=float(temperature),
            top_p=1.0,
            top_k=0,
            max_tokens=max_tokens,
            logprobs=0,
            detokenize=False,
            stop_token_ids=[EOS],
        )
        outs = llm.generate(requests, params, use_tqdm=False)
        if len(outs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outs)} results for {len(requests)} prompts")
        result = []
        for i, o in enumerate(outs):
            cands = []
            for c in o.outputs:
                ids = list(c.token_ids)
                if c.logprobs is None or len(c.logprobs) != len(ids):
                    raise RuntimeError(f"prompt {i}: log-probs missing for the sampled tokens")
                lps = [float(entry[t].logprob) for t, entry in zip(ids, c.logprobs)]
                cands.append((ids, lps))
            result.append(cands)
        results[float(temperature)] = result
    del llm
    return results


def check_vllm_logprobs(model, prompts, samples, k: int = 32) -> float:
    """Max |vLLM log-prob - transformers log-prob| over the first k samples' tokens."""
    rows_p, rows_r, rows_lp = [], [], []
    for p, cands in zip(prompts, samples):
        for ids, lps in cands:
            rows_p.append(p)
            rows_r.append(ids)
            rows_lp.append(lps)
            if len(rows_p) >= k:
                break
        if len(rows_p) >= k:
            break
    ts = build_trace_set(rows_p, rows_r, rows_lp)
    ref = score_traces(model, ts)
    return float((ref - ts.teacher_lp).abs()[ts.loss_mask].max())
