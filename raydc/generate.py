"""Teacher trace sampling: prompts in, traces with the teacher's log-probs out.

For users who have a teacher but no traces. ``run_generate(cfg, teacher_dir, prompts_path,
out_dir)`` renders each prompt with the teacher's chat template, samples
``generate.n_samples`` responses per prompt at ``generate.temperature`` with vLLM (Ray
Data actors on a cluster, an in-process engine otherwise; ``raydc.engines.sampler``) and
records the teacher's log-prob of every sampled token *at the sampling temperature*: the
log-softmax of logits / T (after top-p), the distribution the token was drawn from, as
METHOD.md's ``t_t`` requires (DASD trains on T=0.6 traces, then T=1.0 traces).

``out_dir/traces.parquet`` holds one row per trace in the prompt/response schema the
prepare stage reads, under the column names of ``cfg.data``:

| column (default name) | meaning |
|---|---|
| ``id`` | ``"{prompt_id}:{k}"``, k the sample index |
| ``prompt_id`` | the prompt's id (its ``generate.id_key`` value, else ``"{file}:{index}"``) |
| ``prompt``, ``response`` | the user message and the decoded response (special tokens skipped) |
| ``teacher_logprobs`` | list<float32>: one per generated token, the stop token included |
| ``teacher_offsets`` | list<list<int32>>: each token's [start, end) in ``response``, as a fast tokenizer's offset mapping gives them (a byte token ending inside a character shares that character's span; the stop token has the empty span at the end) |

plus ``teacher_pieces`` (each token's piece of ``response``; their concatenation is
``response`` exactly, special tokens and byte tokens that end inside a character give
``""``), ``teacher_token_ids``, ``finish_reason`` (stop | length), ``num_tokens``,
``sample``, ``temperature`` and the source row's other string columns (e.g. a gold
``answer``). The pieces are deliberately not written under ``data.teacher_tokens_key``:
the prepare stage prefers token strings to offsets, and an empty piece has no span left
to carry its log-prob, whereas the offsets keep every token's log-prob.
Truncated traces (no stop token within ``max_new_tokens``) would teach the student to stop
mid-thought, so they are dropped unless ``generate.keep_truncated``; the summary counts them.

Counts: over prompts, ``rows_in == rows_out + rows_rejected`` (rejects.parquet says why);
``traces`` rows are written, ``traces_truncated`` were cut at ``max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from raydc.config import ConfigError, roles
from raydc.engines.sampler import (
    ParquetSink,
    Sampling,
    fit_prompts,
    prompt_items,
    read_prompts,
    sample_requests,
    sampling_figures,
)
from raydc.infra.artifacts import fingerprint_paths, write_json
from raydc.infra.models import check_context, check_input, check_model, check_vocab
from raydc.infra.schemas import trace_schema
from raydc.infra.stage import Stage
from raydc.method.align import char_spans, token_pieces

if TYPE_CHECKING:
    from raydc.engines.sampler import LocalEngine, Sample


def run_generate(
    cfg,
    teacher_dir: str,
    prompts_path: str | Path,
    out_dir: str | Path,
    engine: LocalEngine | None = None,
) -> dict:
    """Sample teacher traces for the prompts in ``prompts_path``; returns the summary
    (also ``out_dir/summary.json``). ``engine``: a started LocalEngine of this teacher."""
    from raydc.infra.models import load_tokenizer

    t0 = time.perf_counter()
    gcfg = cfg.generate
    check_context(
        "generate.engine.max_model_len", gcfg.engine.max_model_len, "teacher", str(teacher_dir)
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, pkey = read_prompts(prompts_path, gcfg)
    extra = _extra_columns(records, cfg.data, exclude=(pkey, gcfg.id_key))
    items, rejects = prompt_items(records, pkey, gcfg.id_key, "generate", extra)
    tokenizer = load_tokenizer(teacher_dir)
    kept, prompt_ids, rejects = fit_prompts(
        tokenizer, items, rejects, gcfg, "generate", pkey, out / "rejects.parquet"
    )

    sampling = Sampling.from_config(gcfg, logprobs=True)
    backend, batches = sample_requests(
        str(teacher_dir),
        tokenizer,
        prompt_ids,
        sampling,
        gcfg.engine,
        cfg.run.ray_address,
        engine,
        log_dir=out,  # an engine that dies is reported with its own error
    )
    sink = ParquetSink(out / "traces.parquet", trace_schema(cfg.data, extra))
    t_gen = time.perf_counter()
    with closing(sink):
        counts = _write_traces(sink, batches, kept, tokenizer, cfg)
    gen_seconds = time.perf_counter() - t_gen

    summary = {
        "rows_in": len(records),
        "rows_out": len(kept),
        "rows_rejected": len(rejects),
        "traces": sink.rows,
        "traces_truncated": counts["truncated"],
        "truncated_dropped": 0 if gcfg.keep_truncated else counts["truncated"],
        "n_samples": gcfg.n_samples,
        "teacher": str(teacher_dir),
        "logprobs": "processed (at the sampling temperature)",
        **sampling_figures(gcfg, backend, counts["tokens"], gen_seconds),
        "seconds": time.perf_counter() - t0,
        "paths": {
            "traces": str(out / "traces.parquet"),
            "rejects": str(out / "rejects.parquet"),
            "summary": str(out / "summary.json"),
        },
    }
    write_json(out / "summary.json", summary)
    return summary


def _extra_columns(records: list[tuple[str, dict]], dcfg, exclude: Iterable[str]) -> list[str]:
    """The source rows' other string columns, carried onto each trace (e.g. a gold
    ``answer``); none may shadow a trace column or the prompt / id column (``exclude``)."""
    taken = {
        dcfg.id_key,
        dcfg.prompt_id_key,
        dcfg.prompt_key,
        dcfg.response_key,
        dcfg.teacher_logprobs_key,
        dcfg.teacher_tokens_key,
        dcfg.teacher_offsets_key,
        "teacher_pieces",
        "teacher_token_ids",
        "finish_reason",
        "num_tokens",
        "sample",
        "temperature",
        *exclude,
    }
    return sorted(
        {k for _, r in records for k, v in r.items() if isinstance(v, str) and k not in taken}
    )


def _write_traces(
    sink: ParquetSink, batches: Iterable[list[Sample]], items: list[dict], tokenizer, cfg
) -> dict:
    """Write each sample as a trace row of the prompt ``items[i]`` (truncated ones only with
    ``generate.keep_truncated``); returns the counts of ``truncated`` samples and ``tokens``."""
    gcfg = cfg.generate
    special = {int(i) for i in tokenizer.all_special_ids}
    truncated = tokens = 0
    for batch in batches:
        rows = []
        for smp in batch:
            tokens += len(smp.token_ids)
            if smp.finish_reason == "length":
                truncated += 1
                if not gcfg.keep_truncated:
                    continue
            i, k = divmod(smp.key, gcfg.n_samples)
            rows.append(_trace_row(items[i], k, smp, tokenizer, special, cfg))
        sink.write(rows)
    return {"truncated": truncated, "tokens": tokens}


def _trace_row(item: dict, k: int, smp: Sample, tokenizer, special: set[int], cfg) -> dict:
    """Sample ``k`` of a prompt as one row of ``traces.parquet``."""
    dcfg = cfg.data
    text, pieces = token_pieces(tokenizer, smp.token_ids, special)
    return {
        dcfg.id_key: f"{item['row_id']}:{k}",
        dcfg.prompt_id_key: item["row_id"],
        dcfg.prompt_key: item["message"],
        dcfg.response_key: text,
        dcfg.teacher_logprobs_key: smp.logprobs,
        dcfg.teacher_offsets_key: [list(se) for se in char_spans(pieces, smp.token_ids, special)],
        "teacher_pieces": pieces,
        "teacher_token_ids": smp.token_ids,
        "finish_reason": smp.finish_reason,
        "num_tokens": len(smp.token_ids),
        "sample": k,
        "temperature": cfg.generate.temperature,
        **item.get("extra", {}),
    }


# ----------------------------------------------------------------------------- the stage


def _teacher(cfg) -> str:
    if not cfg.generate.prompts:
        raise ConfigError("generate.prompts: not set; name the prompts to sample traces for")
    teacher = roles(cfg).generate_teacher
    if not teacher:
        raise ConfigError(
            "generate.teacher: not set and score.teacher is empty; name the model that "
            "writes the traces"
        )
    return teacher


def _check(cfg) -> None:
    check_input("generate.prompts", cfg.generate.prompts)
    field = "generate.teacher" if cfg.generate.teacher else "score.teacher"
    teacher = _teacher(cfg)
    check_model(field, teacher)
    if Path(teacher).expanduser().is_dir():  # the score stage's checks, for this engine
        check_vocab(field, teacher)
        check_context(
            "generate.engine.max_model_len", cfg.generate.engine.max_model_len, field, teacher
        )


GENERATE = Stage(
    "generate",
    help="sample teacher traces with their log-probs (vLLM) for generate.prompts",
    enabled=lambda cfg: cfg.generate.enabled,
    check=_check,
    reads=lambda cfg, up: {
        "generate": dataclasses.asdict(cfg.generate),
        "prompts": fingerprint_paths(cfg.generate.prompts),
        "teacher": fingerprint_paths(_teacher(cfg)),
    },
    run=lambda cfg, up, out: run_generate(cfg, _teacher(cfg), cfg.generate.prompts, out),
)
