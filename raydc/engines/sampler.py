"""Sampling from a model with vLLM: the prologue and engine shared by ``run_eval``,
``run_generate`` and the reverse-KL metric.

Each turns prompts into requests and gets back sampled token ids, optionally with the
log-prob of each sampled token, in two steps:

- ``fit_prompts``: render each prompt with the model's own chat template (tokenised once on
  the driver) and drop, as a reject, any prompt that leaves no room for ``max_new_tokens``
  in the engine's context;
- ``sample_requests``: ``n`` seeded requests per prompt, sent to the backend.

Two backends behind one function, ``iter_samples``:

- ``ray``: vLLM engines as a Ray Data actor pool (``ray.data.llm``), one placement-group
  bundle per engine worker (CPU-only bundles on machines without a GPU; without one the
  actor waits for a GPU forever). This is the path on a cluster.
- ``local``: one in-process ``vllm.LLM`` (a laptop, a test, a single GPU box).

Choices that make the numbers right:

- One request per sample, each with its own seed (``seed + prompt_index * n + k``), instead
  of vLLM's ``n``: Ray Data's vLLM stage keeps only the first completion of a request, and
  per-request seeds give the same samples whatever the backend, batching or engine count.
- ``logprobs_mode="processed_logprobs"`` with ``logprobs=0``: the returned log-prob of each
  sampled token is the log-softmax of the logits *after* temperature (and top-p), i.e. of
  the distribution the token was actually drawn from (vLLM 0.32's default,
  ``raw_logprobs``, reports the untempered model). METHOD.md's ``t_t`` is defined at the
  generation temperature. At temperature 0 (greedy) vLLM returns the raw log-softmax.
- Prompts are sent as token ids, so nothing is re-tokenised by the engine.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raydc.infra.artifacts import REJECTS_SCHEMA
from raydc.infra.runtime import connect_ray

BACKENDS = ("auto", "ray", "local")


class GenerationError(RuntimeError):
    """A generation request the engine could not serve, or inconsistent engine output."""


@dataclass(frozen=True)
class Request:
    key: int  # the caller's index of this sample; results come back keyed by it
    prompt_token_ids: list[int]
    seed: int


@dataclass
class Sample:
    key: int
    token_ids: list[int]
    logprobs: list[float] | None  # log-prob of each sampled token at the sampling temperature
    finish_reason: str  # "stop" (a stop/EOS token) or "length" (hit max_new_tokens)


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int
    logprobs: bool  # record the sampled tokens' log-probs
    n: int = 1  # samples per prompt
    seed: int = 0  # sample k of prompt i uses seed + i * n + k

    @classmethod
    def from_config(cls, scfg, logprobs: bool) -> Sampling:
        """The settings of a stage's config section (eval or generate)."""
        return cls(
            scfg.temperature, scfg.top_p, scfg.max_new_tokens, logprobs, scfg.n_samples, scfg.seed
        )


# ----------------------------------------------------------------------------- inputs


def read_records(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """Rows of a JSONL or Parquet file (or a folder of them), each with its default id
    ``"{file}:{index}"``. Errors name the file and line."""
    p = Path(path)
    if not str(path):
        raise FileNotFoundError("no input path given")
    if p.is_dir():
        files = sorted(
            f for f in p.iterdir() if f.suffix in (".jsonl", ".json", ".parquet") and f.is_file()
        )
        if not files:
            raise FileNotFoundError(f"{p}: no .jsonl or .parquet files in the folder")
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"{p}: no such file or folder")
    out: list[tuple[str, dict]] = []
    for f in files:
        if f.suffix == ".parquet":
            for i, row in enumerate(pq.read_table(f).to_pylist()):
                out.append((f"{f.name}:{i}", row))
            continue
        with open(f, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{i + 1}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{f}:{i + 1}: expected a JSON object per line")
                out.append((f"{f.name}:{i}", row))
    return out


def pick_key(rows: Sequence[dict], key: str, candidates: Sequence[str], what: str) -> str:
    """``key`` itself, or with ``auto`` the first candidate column the rows have."""
    if key != "auto":
        return key
    for c in candidates:
        if any(c in r for r in rows[:100]):
            return c
    raise ValueError(f"no {what} column: expected one of {list(candidates)} (or set the key)")


def render_prompts(tokenizer, prompts: Sequence[str], system_prompt: str | None) -> list[list[int]]:
    """Token ids of each prompt as a user turn in the model's chat template, ready for the
    assistant's answer (``add_generation_prompt``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')} has no chat template"
        )
    out = []
    for p in prompts:
        messages = [{"role": "user", "content": p}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def stop_token_ids(model_dir: str, tokenizer) -> set[int]:
    """The ids that end a generation: the tokenizer's EOS and the generation config's."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    gc = Path(model_dir) / "generation_config.json"
    if gc.is_file():
        eos = json.loads(gc.read_text()).get("eos_token_id")
        ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    return ids


def read_prompts(
    path: str | os.PathLike, scfg, candidates: Sequence[str]
) -> tuple[list[tuple[str, dict]], str]:
    """The first ``scfg.num_prompts`` rows of ``path`` (as ``read_records`` gives them) and
    their prompt column: ``scfg.prompt_key``, or with ``auto`` the first of ``candidates``."""
    records = read_records(path)[: scfg.num_prompts]
    return records, pick_key([r for _, r in records], scfg.prompt_key, candidates, "prompt")


def fit_prompts(
    tokenizer,
    items: Sequence[dict],
    rejects: list[dict],
    scfg,
    stage: str,
    field: str,
    rejects_path: Path | None = None,
) -> tuple[list[dict], list[list[int]], list[dict]]:
    """Render each item's ``message`` (the user turn) with the model's chat template and
    ``scfg.system_prompt``, and keep the items whose prompt leaves room for
    ``scfg.max_new_tokens`` in ``scfg.engine.max_model_len``.

    ``items``: the rows a stage accepted, each with ``row_id`` and ``message``; ``rejects``:
    the rows it refused. Returns the kept items, their prompt token ids, and ``rejects`` with
    a row (``field``, ``prompt_too_long``) for each prompt dropped here, also written to
    ``rejects_path`` when given. ``scfg``: the stage's config section (eval or generate).
    """
    ids = render_prompts(tokenizer, [it["message"] for it in items], scfg.system_prompt)
    room = scfg.engine.max_model_len - scfg.max_new_tokens
    kept, prompt_ids, rejects = [], [], list(rejects)
    for it, tok_ids in zip(items, ids):
        if len(tok_ids) > room:
            reason = (
                f"prompt_too_long: {len(tok_ids)} prompt tokens > "
                f"engine.max_model_len - max_new_tokens = {room}"
            )
            rejects.append(
                {"row_id": it["row_id"], "stage": stage, "field": field, "reason": reason}
            )
            continue
        kept.append(it)
        prompt_ids.append(tok_ids)
    if rejects_path is not None:
        write_rejects(rejects_path, rejects)
    return kept, prompt_ids, rejects


# ----------------------------------------------------------------------------- backends


def resolve_backend(backend: str, ray_address: str | None) -> str:
    """``auto``: Ray Data when Ray is already up or a cluster address is configured."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {list(BACKENDS)}")
    if backend != "auto":
        return backend
    if ray_address or os.environ.get("RAY_ADDRESS"):
        return "ray"
    try:
        import ray
    except ImportError:
        return "local"
    return "ray" if ray.is_initialized() else "local"


def sampling_params(s: Sampling, seed: int) -> dict:
    return dict(
        temperature=float(s.temperature),
        top_p=float(s.top_p),
        max_tokens=int(s.max_new_tokens),
        seed=int(seed),
        logprobs=0 if s.logprobs else None,
        detokenize=False,  # callers decode with the tokenizer (token strings, offsets)
    )


def _sampled_logprobs(key: int, token_ids: Sequence[int], entries) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position {token_id: Logprob}."""
    if entries is None or len(entries) != len(token_ids):
        n = None if entries is None else len(entries)
        raise GenerationError(f"request {key}: {n} log-prob entries for {len(token_ids)} tokens")
    out = []
    for tid, entry in zip(token_ids, entries):
        lp = entry.get(tid, entry.get(str(tid))) if entry is not None else None
        if lp is None:
            raise GenerationError(f"request {key}: no log-prob for sampled token {tid}")
        out.append(float(lp["logprob"] if isinstance(lp, dict) else lp.logprob))
    return out


def finish_reason(token_ids: Sequence[int], max_new_tokens: int, stop_ids: set[int]) -> str:
    """``length`` when the budget is used up without a stop token at the end, else ``stop``
    (Ray Data's vLLM rows do not carry vLLM's own finish reason)."""
    if len(token_ids) >= max_new_tokens and (not token_ids or token_ids[-1] not in stop_ids):
        return "length"
    return "stop"


class LocalEngine:
    """One in-process vLLM engine; reusable across calls (tests share one per module)."""

    def __init__(self, model_dir: str, ecfg):
        from raydc.infra.models import offline_env

        offline_env()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        import vllm

        self.model_dir = str(model_dir)
        self.version = vllm.__version__
        self.llm = vllm.LLM(model=self.model_dir, **ecfg.llm_kwargs("processed_logprobs"))

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def generate(self, requests: Sequence[Request], s: Sampling) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r.prompt_token_ids) for r in requests]
        params = [SamplingParams(**sampling_params(s, r.seed)) for r in requests]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        samples = []
        for r, o in zip(requests, outs):
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = _sampled_logprobs(r.key, ids, c.logprobs) if s.logprobs else None
            finish = "length" if c.finish_reason == "length" else "stop"
            samples.append(Sample(r.key, ids, lps, finish))
        return samples


def iter_samples(
    model_dir: str,
    requests: Sequence[Request],
    s: Sampling,
    ecfg,
    backend: str,
    stop_ids: set[int],
    engine: LocalEngine | None = None,
) -> Iterator[list[Sample]]:
    """Generate every request; yields batches of samples (in no particular order on Ray).

    ``backend`` is ``ray`` or ``local`` (resolve ``auto`` first); ``engine`` reuses a
    started LocalEngine for the same model. ``stop_ids`` tells a stop from a truncation
    on the Ray path, whose rows carry no finish reason.
    """
    if not requests:
        return
    if backend == "local":
        eng = engine if engine is not None else LocalEngine(model_dir, ecfg)
        if eng.model_dir != str(model_dir):
            raise ValueError(f"engine serves {eng.model_dir}, not {model_dir}")
        chunk = max(256, 8 * int(ecfg.batch_size))  # bounded memory, streamed to disk
        try:
            for i in range(0, len(requests), chunk):
                yield eng.generate(requests[i : i + chunk], s)
        finally:
            if engine is None:  # ours: free its memory before the next stage
                eng.close()
        return
    if backend == "ray":
        yield from _ray_samples(model_dir, requests, s, ecfg, stop_ids)
        return
    raise ValueError(f"backend={backend!r}: must be 'ray' or 'local' here")


def _ray_samples(model_dir, requests, s: Sampling, ecfg, stop_ids) -> Iterator[list[Sample]]:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=str(model_dir),
        engine_kwargs=ecfg.llm_kwargs("processed_logprobs"),
        **ecfg.processor_args(),
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        log_engine_metrics=False,  # the metrics exporter needs Ray Serve
    )
    want_lp = s.logprobs
    max_new = int(s.max_new_tokens)
    stops = set(stop_ids)

    def pre(row: dict) -> dict:
        return dict(
            key=int(row["key"]),
            tokenized_prompt=list(row["prompt_token_ids"]),
            sampling_params=sampling_params(s, int(row["seed"])),
        )

    def post(row: dict) -> dict:
        ids = [int(t) for t in row["generated_tokens"]]
        lps = _sampled_logprobs(int(row["key"]), ids, row["logprobs"]) if want_lp else None
        return dict(
            key=int(row["key"]),
            token_ids=ids,
            logprobs=lps,
            finish_reason=finish_reason(ids, max_new, stops),
        )

    processor = build_processor(config, preprocess=pre, postprocess=post)
    items = [
        {"key": r.key, "prompt_token_ids": list(r.prompt_token_ids), "seed": r.seed}
        for r in requests
    ]
    blocks = max(1, min(len(items), 16 * int(ecfg.num_engines)))  # work for every engine
    ds = processor(ray.data.from_items(items, override_num_blocks=blocks))
    for batch in ds.iter_batches(batch_size=int(ecfg.batch_size) * 8, batch_format="pyarrow"):
        yield [
            Sample(r["key"], list(r["token_ids"]), r["logprobs"], r["finish_reason"])
            for r in batch.to_pylist()
        ]


def sample_requests(
    model_dir: str,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    s: Sampling,
    ecfg,
    ray_address: str | None,
    engine: LocalEngine | None = None,
) -> tuple[str, Iterator[list[Sample]]]:
    """``s.n`` samples of each prompt: the backend that serves them and their batches.

    Sample k of prompt i has key ``i * n + k`` (``divmod(key, n)`` gives both back) and seed
    ``s.seed + i * n + k``. ``ecfg``: the engine section; ``engine``: a started LocalEngine
    of ``model_dir`` to reuse. Joins Ray first on the ``ray`` backend. The batches raise
    GenerationError at their end unless every request came back.
    """
    n = s.n
    requests = [
        Request(key=i * n + k, prompt_token_ids=tok_ids, seed=s.seed + i * n + k)
        for i, tok_ids in enumerate(prompt_ids)
        for k in range(n)
    ]
    backend = resolve_backend(ecfg.backend, ray_address)
    if backend == "ray" and requests:
        connect_ray(ray_address)
    stop_ids = stop_token_ids(str(model_dir), tokenizer)

    def batches() -> Iterator[list[Sample]]:
        returned = 0
        for batch in iter_samples(str(model_dir), requests, s, ecfg, backend, stop_ids, engine):
            returned += len(batch)
            yield batch
        if returned != len(requests):
            raise GenerationError(f"{len(requests)} samples requested, {returned} returned")

    return backend, batches()


# ----------------------------------------------------------------------------- outputs


class ParquetSink:
    """Rows appended in batches to one Parquet file (schema from the first batch)."""

    def __init__(self, path: Path, schema: pa.Schema | None = None):
        self.path = Path(path)
        self.schema = schema
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=self.schema)
        if self.writer is None:
            self.schema = table.schema
            self.writer = pq.ParquetWriter(self.path, self.schema)
        self.writer.write_table(table)
        self.rows += len(rows)

    def close(self) -> None:
        if self.writer is None and self.schema is not None:
            pq.write_table(self.schema.empty_table(), self.path)
        elif self.writer is not None:
            self.writer.close()


def write_rejects(path: Path, rejects: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), path)


def now() -> float:
    return time.perf_counter()


def sampling_figures(scfg, backend: str, tokens: int, seconds: float) -> dict:
    """What eval and generate report of their sampling: the settings of ``scfg`` (the
    stage's config section), the backend, and ``tokens`` generated in ``seconds``."""
    return {
        "temperature": scfg.temperature,
        "top_p": scfg.top_p,
        "max_new_tokens": scfg.max_new_tokens,
        "seed": scfg.seed,
        "backend": backend,
        "generated_tokens": tokens,
        "generation_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
    }
