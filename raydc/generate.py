"""Teacher trace sampling: prompts in, traces with the teacher's log-probs out.

For users who have a teacher but no traces. ``run_generate(cfg, teacher_dir, prompts_path,
out_dir)`` renders each prompt with the teacher's chat template, samples
``generate.n_samples`` responses per prompt at ``generate.temperature`` with vLLM (Ray
Data actors on a cluster, an in-process engine otherwise; ``raydc.eval.generation``) and
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

import json
from pathlib import Path

import pyarrow as pa

from raydc.data.align import char_spans, token_pieces
from raydc.eval.generation import (
    LocalEngine,
    ParquetSink,
    Request,
    Sampling,
    iter_samples,
    now,
    pick_key,
    read_records,
    render_prompts,
    resolve_backend,
    stop_token_ids,
    write_rejects,
)
from raydc.runtime import connect_ray

PROMPT_KEYS = ("prompt", "question", "problem")


def trace_schema(dcfg, extra: list[str]) -> pa.Schema:
    return pa.schema(
        [
            (dcfg.id_key, pa.string()),
            (dcfg.prompt_id_key, pa.string()),
            (dcfg.prompt_key, pa.string()),
            (dcfg.response_key, pa.string()),
            (dcfg.teacher_logprobs_key, pa.list_(pa.float32())),
            (dcfg.teacher_offsets_key, pa.list_(pa.list_(pa.int32()))),
            ("teacher_pieces", pa.list_(pa.string())),
            ("teacher_token_ids", pa.list_(pa.int32())),
            ("finish_reason", pa.string()),
            ("num_tokens", pa.int32()),
            ("sample", pa.int32()),
            ("temperature", pa.float32()),
            *[(name, pa.string()) for name in extra],
        ]
    )


def run_generate(
    cfg,
    teacher_dir: str,
    prompts_path: str | Path,
    out_dir: str | Path,
    engine: LocalEngine | None = None,
) -> dict:
    """Sample teacher traces for the prompts in ``prompts_path``; returns the summary
    (also ``out_dir/summary.json``). ``engine``: a started LocalEngine of this teacher."""
    t0 = now()
    gcfg, dcfg = cfg.generate, cfg.data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = read_records(prompts_path)
    if gcfg.num_prompts is not None:
        records = records[: gcfg.num_prompts]
    pkey = pick_key([r for _, r in records], gcfg.prompt_key, PROMPT_KEYS, "prompt")

    from raydc.models import load_tokenizer

    tokenizer = load_tokenizer(teacher_dir)
    special = {int(i) for i in tokenizer.all_special_ids}
    out_names = {
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
    }
    extra = sorted(
        {
            k
            for _, r in records
            for k, v in r.items()
            if isinstance(v, str) and k not in out_names and k not in (pkey, gcfg.id_key)
        }
    )

    items, rejects, seen = [], [], set()
    for default_id, row in records:
        pid = str(row[gcfg.id_key]) if row.get(gcfg.id_key) is not None else default_id
        prompt = row.get(pkey)
        why = None
        if not isinstance(prompt, str) or not prompt.strip():
            why = (pkey, "missing_prompt: no prompt text")
        elif pid in seen:
            why = (gcfg.id_key, f"duplicate_id: prompt id {pid!r} seen before")
        if why:
            rejects.append({"row_id": pid, "stage": "generate", "field": why[0], "reason": why[1]})
            continue
        seen.add(pid)
        items.append(
            {
                "prompt_id": pid,
                "prompt": prompt,
                "extra": {k: row.get(k) if isinstance(row.get(k), str) else None for k in extra},
            }
        )

    ids = render_prompts(tokenizer, [it["prompt"] for it in items], gcfg.system_prompt)
    room = gcfg.engine.max_model_len - gcfg.max_new_tokens
    kept = []
    for it, tok_ids in zip(items, ids):
        if len(tok_ids) > room:
            rejects.append(
                {
                    "row_id": it["prompt_id"],
                    "stage": "generate",
                    "field": pkey,
                    "reason": f"prompt_too_long: {len(tok_ids)} prompt tokens > "
                    f"engine.max_model_len - max_new_tokens = {room}",
                }
            )
            continue
        kept.append((it, tok_ids))
    write_rejects(out / "rejects.parquet", rejects)

    n = gcfg.n_samples
    requests = [
        Request(key=i * n + k, prompt_token_ids=tok_ids, seed=gcfg.seed + i * n + k)
        for i, (_, tok_ids) in enumerate(kept)
        for k in range(n)
    ]
    sampling = Sampling(gcfg.temperature, gcfg.top_p, gcfg.max_new_tokens, logprobs=True)
    backend = resolve_backend(gcfg.engine.backend, cfg.run.ray_address)
    if backend == "ray" and requests:
        connect_ray(cfg.run.ray_address)
    sink = ParquetSink(out / "traces.parquet", trace_schema(dcfg, extra))
    truncated = returned = tokens = 0
    t_gen = now()
    for batch in iter_samples(
        str(teacher_dir),
        requests,
        sampling,
        gcfg.engine,
        backend,
        stop_token_ids(str(teacher_dir), tokenizer),
        engine=engine,
    ):
        rows = []
        for smp in batch:
            returned += 1
            tokens += len(smp.token_ids)
            if smp.finish_reason == "length":
                truncated += 1
                if not gcfg.keep_truncated:
                    continue
            i, k = divmod(smp.key, n)
            it = kept[i][0]
            text, pieces = token_pieces(tokenizer, smp.token_ids, special)
            rows.append(
                {
                    dcfg.id_key: f"{it['prompt_id']}:{k}",
                    dcfg.prompt_id_key: it["prompt_id"],
                    dcfg.prompt_key: it["prompt"],
                    dcfg.response_key: text,
                    dcfg.teacher_logprobs_key: smp.logprobs,
                    dcfg.teacher_offsets_key: [
                        list(se) for se in char_spans(pieces, smp.token_ids, special)
                    ],
                    "teacher_pieces": pieces,
                    "teacher_token_ids": smp.token_ids,
                    "finish_reason": smp.finish_reason,
                    "num_tokens": len(smp.token_ids),
                    "sample": k,
                    "temperature": gcfg.temperature,
                    **it["extra"],
                }
            )
        sink.write(rows)
    sink.close()
    gen_seconds = now() - t_gen
    if returned != len(requests):
        raise RuntimeError(f"generate: {len(requests)} samples requested, {returned} returned")

    summary = {
        "rows_in": len(records),
        "rows_out": len(kept),
        "rows_rejected": len(rejects),
        "traces": sink.rows,
        "traces_truncated": truncated,
        "truncated_dropped": 0 if gcfg.keep_truncated else truncated,
        "generated_tokens": tokens,
        "n_samples": n,
        "temperature": gcfg.temperature,
        "top_p": gcfg.top_p,
        "max_new_tokens": gcfg.max_new_tokens,
        "seed": gcfg.seed,
        "backend": backend,
        "teacher": str(teacher_dir),
        "logprobs": "processed (at the sampling temperature)",
        "generation_seconds": gen_seconds,
        "tokens_per_second": tokens / gen_seconds if gen_seconds > 0 else None,
        "seconds": now() - t0,
        "paths": {
            "traces": str(out / "traces.parquet"),
            "rejects": str(out / "rejects.parquet"),
            "summary": str(out / "summary.json"),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
