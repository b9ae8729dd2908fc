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

import copy
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raydc.config.engines import ENGINE_RESTARTS
from raydc.infra.artifacts import REJECTS_SCHEMA
from raydc.infra.runtime import connect_ray, route_library_logs

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


# The prompt column a prompt file may use (``prompt_key: auto`` takes the first present);
# generate, mixed_policy and eval read prompts with it.
PROMPT_KEYS = ("prompt", "question", "problem")


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
    path: str | os.PathLike, scfg, candidates: Sequence[str] = PROMPT_KEYS
) -> tuple[list[tuple[str, dict]], str]:
    """The first ``scfg.num_prompts`` rows of ``path`` (as ``read_records`` gives them) and
    their prompt column: ``scfg.prompt_key``, or with ``auto`` the first of ``candidates``."""
    records = read_records(path)[: scfg.num_prompts]
    return records, pick_key([r for _, r in records], scfg.prompt_key, candidates, "prompt")


def prompt_items(
    records: list[tuple[str, dict]],
    pkey: str,
    id_key: str,
    stage: str,
    extra: Sequence[str] = (),
) -> tuple[list[dict], list[dict]]:
    """The rows with prompt text and an id not seen before, as items for ``fit_prompts``
    (``row_id``, ``message``, and with ``extra`` those columns' strings under ``extra``); a
    reject row of ``stage`` for each other row: the one prompt-row rule of the stages that
    sample (generate, on_policy)."""
    items, rejects, seen = [], [], set()
    for default_id, row in records:
        pid = str(row[id_key]) if row.get(id_key) is not None else default_id
        prompt = row.get(pkey)
        why = None
        if not isinstance(prompt, str) or not prompt.strip():
            why = (pkey, "missing_prompt: no prompt text")
        elif pid in seen:
            why = (id_key, f"duplicate_id: prompt id {pid!r} seen before")
        if why:
            rejects.append({"row_id": pid, "stage": stage, "field": why[0], "reason": why[1]})
            continue
        seen.add(pid)
        item = {"row_id": pid, "message": prompt}
        if extra:
            item["extra"] = {k: row.get(k) if isinstance(row.get(k), str) else None for k in extra}
        items.append(item)
    return items, rejects


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


# In the folder a stage gives as ``log_dir``: vLLM's logging config for the stage's engines
# (its console handler plus one file handler) and the ERROR records of every vLLM process
# of those engines (front end, engine core, workers), wherever they run.
ENGINE_LOGGING = ".vllm_logging.json"
ENGINE_ERRORS = ".vllm_errors.log"
# The last line of a Python traceback: "SomeError: message" (or a bare "SomeError").
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception))(?::\s.*)?$")


def engine_log_env(log_dir: str | os.PathLike) -> dict[str, str]:
    """The environment that makes vLLM processes also write their ERROR records (with
    tracebacks) to ``log_dir/ENGINE_ERRORS``, beside vLLM's usual console log.

    A vLLM engine dies in its own processes (the engine core and its workers); the process
    that called it only sees ``EngineDeadError: ... See stack trace (above)``, and on Ray
    that stack trace is in a worker log on the engine's node. ``log_dir`` must be readable
    where the engines run (a stage folder under ``run.output_dir``, shared on a cluster).
    Clears the errors of a previous engine."""
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    folder = Path(log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    errors = folder / ENGINE_ERRORS
    errors.unlink(missing_ok=True)
    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    config["formatters"]["raydc_errors"] = {
        "format": "%(asctime)s pid=%(process)d %(levelname)s %(name)s: %(message)s"
    }
    config["handlers"]["raydc_errors"] = {
        "class": "logging.FileHandler",
        "filename": str(errors.resolve()),
        "level": "ERROR",
        "formatter": "raydc_errors",
        "delay": True,  # no file unless something fails
    }
    config["loggers"]["vllm"]["handlers"].append("raydc_errors")
    path = folder / ENGINE_LOGGING
    path.write_text(json.dumps(config, indent=1))
    return {"VLLM_CONFIGURE_LOGGING": "1", "VLLM_LOGGING_CONFIG_PATH": str(path.resolve())}


def engine_error(log_dir: str | os.PathLike | None) -> str | None:
    """The engine's own error: the first exception line (``RuntimeError: ...``) in the
    ERROR records ``engine_log_env`` had vLLM write to ``log_dir``; None if there is none."""
    if log_dir is None:
        return None
    try:
        text = (Path(log_dir) / ENGINE_ERRORS).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if _EXCEPTION_LINE.match(line.strip()) and line == line.lstrip():
            return line.strip()
    return None


def engine_failure(exc: BaseException, model_dir: str, backend: str, log_dir) -> BaseException:
    """What a stage reports when sampling failed: for an engine that died (vLLM's
    ``EngineDeadError``, a Ray actor that died, or errors in vLLM's own log), a
    GenerationError naming the engine's own error (``engine_error``); else ``exc``."""
    cause = engine_error(log_dir)
    dead = {c.__name__ for c in type(exc).__mro__} & {"EngineDeadError", "RayActorError"}
    if cause is None and not dead:
        return exc
    on_ray = (
        f"a dead engine is restarted {ENGINE_RESTARTS} time(s) on Ray, then the stage fails; "
        if backend == "ray"
        else ""
    )
    if cause is None:
        where = "the Ray worker log of the engine actor" if backend == "ray" else "stderr"
        return GenerationError(
            f"the vLLM engine of {model_dir} died: {type(exc).__name__}; its own error is in "
            f"{where}" + (f" ({on_ray.rstrip('; ')})" if on_ray else "")
        )
    return GenerationError(
        f"the vLLM engine of {model_dir} died: {cause} ({on_ray}vLLM's errors: "
        f"{Path(log_dir) / ENGINE_ERRORS})"
    )


class LocalEngine:
    """One in-process vLLM engine; reusable across calls (tests share one per module).
    ``log_dir``: where its vLLM processes also write their errors (``engine_log_env``)."""

    def __init__(self, model_dir: str, ecfg, log_dir: str | os.PathLike | None = None):
        from raydc.infra.models import offline_env

        offline_env()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        import vllm

        route_library_logs()  # from here vLLM's notices in this process go to the run's log
        self.model_dir = str(model_dir)
        self.version = vllm.__version__
        kwargs = ecfg.llm_kwargs("processed_logprobs", seeded=True)
        # The engine's processes are started now and take this environment with them.
        env = engine_log_env(log_dir) if log_dir is not None else {}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.llm = vllm.LLM(model=self.model_dir, **kwargs)
            route_library_logs()  # the engine set vLLM's logging up in this process anew
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

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
    log_dir: str | os.PathLike | None = None,
) -> Iterator[list[Sample]]:
    """Generate every request; yields batches of samples (in no particular order on Ray).

    ``backend`` is ``ray`` or ``local`` (resolve ``auto`` first); ``engine`` reuses a
    started LocalEngine for the same model. ``stop_ids`` tells a stop from a truncation
    on the Ray path, whose rows carry no finish reason. ``log_dir`` (the stage's folder):
    where the engines started here write their errors, so that an engine that dies is
    reported with its own error (``engine_failure``); on Ray a dead engine is restarted
    ``ENGINE_RESTARTS`` times before that.
    """
    if not requests:
        return
    try:
        yield from _samples(model_dir, requests, s, ecfg, backend, stop_ids, engine, log_dir)
    except GenerationError:
        raise
    except Exception as e:
        failure = engine_failure(e, str(model_dir), backend, log_dir)
        if failure is e:
            raise
        raise failure from e


def _samples(model_dir, requests, s, ecfg, backend, stop_ids, engine, log_dir):
    if backend == "local":
        eng = engine if engine is not None else LocalEngine(model_dir, ecfg, log_dir)
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
        yield from _ray_samples(model_dir, requests, s, ecfg, stop_ids, log_dir)
        return
    raise ValueError(f"backend={backend!r}: must be 'ray' or 'local' here")


def _ray_samples(
    model_dir, requests, s: Sampling, ecfg, stop_ids, log_dir
) -> Iterator[list[Sample]]:
    import ray
    import vllm.logger  # noqa: F401  (imported below anyway: routed before it speaks)
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    route_library_logs()  # before vLLM's notices of this driver: to the run's log
    env = engine_log_env(log_dir) if log_dir is not None else {}
    config = vLLMEngineProcessorConfig(
        model_source=str(model_dir),
        engine_kwargs=ecfg.llm_kwargs("processed_logprobs", seeded=True),
        **ecfg.processor_args(),
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        log_engine_metrics=False,  # the metrics exporter needs Ray Serve
        runtime_env={"env_vars": env} if env else None,
    )
    restarts = ecfg.restart_args()

    def bound_restarts(name: str, stage) -> None:
        # ray.data.llm leaves the engine actor at Ray Data's default: restarted forever
        # (the actor exits on EngineDeadError so that Ray replaces it).
        if name.startswith("vLLMEngineStage"):
            stage.map_batches_kwargs.update(restarts)

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

    processor = build_processor(
        config,
        preprocess=pre,
        postprocess=post,
        builder_kwargs={"override_stage_config_fn": bound_restarts},
    )
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
    log_dir: str | os.PathLike | None = None,
) -> tuple[str, Iterator[list[Sample]]]:
    """``s.n`` samples of each prompt: the backend that serves them and their batches.

    Sample k of prompt i has key ``i * n + k`` (``divmod(key, n)`` gives both back) and seed
    ``s.seed + i * n + k``. ``ecfg``: the engine section; ``engine``: a started LocalEngine
    of ``model_dir`` to reuse; ``log_dir``: the stage's folder (``iter_samples``). Joins Ray
    first on the ``ray`` backend. The batches raise GenerationError at their end unless
    every request came back, and one naming the engine's own error if the engine died.
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
        for batch in iter_samples(
            str(model_dir), requests, s, ecfg, backend, stop_ids, engine, log_dir
        ):
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
