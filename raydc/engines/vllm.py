"""The vLLM scorer: one engine, token-in prompts, prompt log-probs of the given tokens.

Settings that make the numbers right rather than fast-but-wrong:

- ``TokensPrompt``: the ids are scored as sent; nothing is re-tokenised.
- ``prompt_logprobs=0``: only the log-prob of the actual next token, per position (the
  engine adds no top-k alternatives), read from the entry keyed by the sent token id.
- ``logprobs_mode="raw_logprobs"``, temperature 1: log-softmax of the raw logits, no
  temperature or penalties applied. vLLM's prompt log-probs ignore the sampling
  temperature, so a scorer at temperature T != 1 (the teacher of traces sampled at T)
  sets the ``scale`` of the model's ``LogitsProcessor`` modules to 1/T in the engine
  (``LLM.apply_model``): every logit the engine forms is then z / T, and the log-softmax
  of it is the log-prob under the sampling distribution.
- Prefix caching off: a cached prefix has no prompt log-probs to return.
- ``max_num_batched_tokens`` bounded: prompt log-probs materialise a [tokens x vocab]
  float32 tensor per scheduler step.

A dead engine fails its actor: vLLM runs the engine in a child process (``EngineCore``),
and when that process dies (an OOM kill) the client waits on its output queue with no
timeout, so the stage would hang with no error. ``EngineWatchdog`` polls the child and
exits the actor's process when it is gone; Ray Data restarts the actor and retries its
batch, ``ENGINE_RESTARTS`` times (``VLLMEngineConfig.actor_pool_args``), then the stage
fails naming the actor.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from raydc.engines.base import ScoreMismatchError, check_result

if TYPE_CHECKING:
    from raydc.config import VLLMEngineConfig


def max_prompt_len(model: str, max_model_len: int) -> int:
    """The longest row an engine scores: ``score.engine.max_model_len``, less one when the
    model's own context is no longer (vLLM counts the one generated token against the length)."""
    import json
    from pathlib import Path

    cfg = Path(model) / "config.json"
    limit = None
    if cfg.exists():
        data = json.loads(cfg.read_text())
        limit = data.get("text_config", data).get("max_position_embeddings")
    return int(min(max_model_len, limit - 1)) if limit else int(max_model_len)


def scale_logits(model, scale: float) -> int:
    """Set every ``LogitsProcessor.scale`` of ``model`` to ``scale``; return how many.
    Runs inside the engine (``LLM.apply_model``)."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    found = [m for m in model.modules() if isinstance(m, LogitsProcessor)]
    for m in found:
        m.scale = float(scale)
    return len(found)


def vocab_of(model: str) -> int | None:
    """The model's output vocabulary from its ``config.json`` (None when absent)."""
    import json
    from pathlib import Path

    cfg = Path(model) / "config.json"
    if not cfg.exists():
        return None
    data = json.loads(cfg.read_text())
    return int(data.get("text_config", data)["vocab_size"])


class VLLMScorer:
    """``entropy_top_k`` > 0 also asks the engine for that many top prompt log-probs per
    position, from which ``score_with_entropy`` estimates the entropy (a top-k estimate,
    within the bounds of ``raydc.method.entropy.topk_entropy``)."""

    def __init__(
        self,
        model: str,
        engine: VLLMEngineConfig,
        temperature: float = 1.0,
        entropy_top_k: int = 0,
    ):
        import functools

        from raydc.infra.models import offline_env

        offline_env()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if temperature != 1.0:
            # apply_model sends a function to the engine process: vLLM pickles one only
            # with this set (the engine is this process's own child).
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        import vllm
        from vllm import LLM, SamplingParams

        self.version = vllm.__version__
        self.temperature = float(temperature)
        self.llm = LLM(
            model=model,
            **engine.llm_kwargs(
                "raw_logprobs", max_model_len=max_prompt_len(model, engine.max_model_len) + 1
            ),
            enable_prefix_caching=False,
        )
        if self.temperature != 1.0:
            counts = self.llm.apply_model(functools.partial(scale_logits, scale=1.0 / temperature))
            if not counts or min(counts) < 1:
                raise ScoreMismatchError(
                    f"{model}: no LogitsProcessor in the vLLM model, so its log-probs cannot "
                    f"be taken at temperature {temperature}"
                )
        self.watchdog = EngineWatchdog.start(model)
        self.top_k = int(entropy_top_k)
        self.vocab = vocab_of(model) if self.top_k else None
        self.params = SamplingParams(
            max_tokens=1, temperature=1.0, prompt_logprobs=self.top_k, detokenize=False
        )

    def score(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        rows, outs = self._generate(token_ids)
        return [
            to_logprobs(i, r, o.prompt_token_ids, o.prompt_logprobs)
            for i, (r, o) in enumerate(zip(rows, outs))
        ]

    def score_with_entropy(
        self, token_ids: Sequence[Sequence[int]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row, the log-probs and the entropy estimate [T] of the distribution each
        token was drawn from (position 0: 0.0), from the top ``entropy_top_k``."""
        if not self.top_k:
            raise ValueError("this scorer was made without entropy_top_k")
        rows, outs = self._generate(token_ids)
        return [
            (
                to_logprobs(i, r, o.prompt_token_ids, o.prompt_logprobs),
                topk_entropies(o.prompt_logprobs, self.top_k, self.vocab),
            )
            for i, (r, o) in enumerate(zip(rows, outs))
        ]

    def _generate(self, token_ids):
        from vllm.inputs import TokensPrompt

        rows = [[int(t) for t in r] for r in token_ids]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=r) for r in rows], self.params, use_tqdm=False
        )
        if len(outs) != len(rows):
            raise ScoreMismatchError(f"{len(outs)} results for {len(rows)} rows sent")
        return rows, outs

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        self.llm = None


class EngineWatchdog:
    """Exits this process when one of its vLLM ``EngineCore`` children has died."""

    POLL_S = 2.0

    def __init__(self, engines: list, model: str):
        self.engines, self.model = engines, model
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="raydc-engine-watchdog", daemon=True).start()

    @classmethod
    def start(cls, model: str) -> EngineWatchdog | None:
        import psutil

        kids = psutil.Process().children(recursive=True)
        engines = [p for p in kids if "EngineCore" in _proc_name(p)]
        return cls(engines, model) if engines else None  # in-process engine: nothing to watch

    def stop(self) -> None:
        self._stop.set()

    def dead(self) -> list[int]:
        import psutil

        out = []
        for p in self.engines:
            try:
                if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
            except psutil.NoSuchProcess:
                out.append(p.pid)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.POLL_S):
            gone = self.dead()
            if gone and not self._stop.is_set():
                print(
                    f"raydc: the vLLM engine process {gone} of scoring actor pid {os.getpid()} "
                    f"({self.model}) died; exiting the actor so Ray Data restarts it",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)


def _proc_name(p) -> str:
    try:
        return p.name() + " " + " ".join(p.cmdline()[:2])
    except Exception:
        return ""


def to_logprobs(i: int, sent: list[int], got_ids, prompt_logprobs) -> np.ndarray:
    """One request's prompt log-probs as float32 [T], checked against what was sent."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(sent):
        n = None if prompt_logprobs is None else len(prompt_logprobs)
        raise ScoreMismatchError(f"row {i}: {n} prompt log-prob entries for {len(sent)} tokens")
    logp = np.zeros(len(sent), dtype=np.float32)
    for t in range(1, len(sent)):
        entry = prompt_logprobs[t]
        lp = entry.get(sent[t]) if entry is not None else None
        if lp is None:
            raise ScoreMismatchError(
                f"row {i}: position {t} has no log-prob for the sent token {sent[t]}"
            )
        logp[t] = lp.logprob
    check_result(i, sent, got_ids, logp)
    return logp


def topk_entropies(prompt_logprobs, k: int, vocab: int | None) -> np.ndarray:
    """float32 [T]: the entropy estimate at each position from its top-``k`` prompt
    log-probs (the entries of rank <= k: vLLM adds the sent token when it is not among
    them, and that one must not count as a top-k entry). Position 0: 0.0."""
    import torch

    from raydc.method.entropy import topk_entropy

    T = len(prompt_logprobs)
    top = np.full((T, k), -np.inf, np.float64)
    for t in range(1, T):
        entry = prompt_logprobs[t] or {}
        ranked = sorted((lp.rank, lp.logprob) for lp in entry.values() if lp.rank is not None)
        vals = [v for rank, v in ranked if rank <= k][:k]
        top[t, : len(vals)] = vals
    out = np.zeros(T, np.float32)
    if T > 1:
        est = topk_entropy(torch.from_numpy(top[1:]), int(vocab or k)).estimate
        out[1:] = est.numpy().astype(np.float32)
    return out
