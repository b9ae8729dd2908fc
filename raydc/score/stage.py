"""The score stage: prepared rows -> scored Parquet + manifest (Ray Data).

Scoring is one streaming Ray Data pipeline::

    read prepared Parquet
      -> check       (task)   rows longer than score.engine.max_model_len or with ids
                              outside the vocabulary -> rejects
      -> student     (actors) one engine per actor (vLLM or transformers): student_logprobs
                              (raydc.score.actors)
      -> teacher     (actors) only with score.teacher set and rows without teacher
                              log-probs; another tokenizer: scored on its own rendering of
                              the conversation and aligned by character spans
                              (raydc.score.teacher)
      -> finish      (task)   unknown teacher log-probs on loss tokens (NaN) become the
                              student's (a neutral ratio, counted); the store's schema
                              (raydc.score.store)
      -> write Parquet; rejects + counts merged; manifest.json with weight diagnostics

Engines are actors of a ``map_batches`` actor pool (``score.engine``): each loads its
model once and then scores batches as they stream past (the measurement behind this
choice over ``ray.data.llm`` is in docs/scoring.md). Light tasks ask for a quarter of a CPU
so they run beside engines on a small machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raydc.config import ConfigError
from raydc.engines.base import ScoreError
from raydc.engines.vllm import max_prompt_len
from raydc.infra.artifacts import (
    PARTS_DIR,
    REJECTS_FILE,
    batch_key,
    check_reject_share,
    column_bytes,
    data_files,
    fingerprint_paths,
    prepare_out_dir,
    summarize_parts,
    tokenizer_fingerprint,
    write_json,
    write_parts,
)
from raydc.infra.models import check_context, check_model, check_vocab
from raydc.infra.runtime import LIGHT_CPUS, restart_args_allowed
from raydc.infra.schemas import INSPECT_DIR, SCORED_WRITE_ARGS
from raydc.infra.stage import Stage
from raydc.method.weights import needs_teacher
from raydc.score.actors import ENGINE_PARTS, StudentScorer, vocab_size
from raydc.score.store import (
    bytes_per_token,
    finish_batch,
    store_info,
    stored_weight_diagnostics,
)
from raydc.score.teacher import TeacherScorer

# The summary's counts the manifest keeps.
MANIFEST_COUNTS = (
    "rows_in",
    "rows_out",
    "rows_rejected",
    "tokens",
    "loss_tokens",
    "teacher_rows",
    "teacher_unknown_tokens",
    "teacher_aligned_rows",
    "teacher_carried_tokens",
)


# ----------------------------------------------------------------------------- inputs


def check_batch(batch: pa.Table, max_len: int, vocab: int, parts_dir: str) -> pa.Table:
    """Reject rows the engines cannot score; count rows in."""
    ids = batch.column("input_ids").to_pylist()
    keep, rejects = [], []
    for k, (rid, row) in enumerate(zip(batch.column("row_id").to_pylist(), ids)):
        if len(row) > max_len:
            rejects.append(
                {
                    "row_id": rid,
                    "field": "input_ids",
                    "reason": f"too_long: {len(row)} tokens > score.engine.max_model_len={max_len}",
                }
            )
        elif row and (max(row) >= vocab or min(row) < 0):
            bad = max(row) if max(row) >= vocab else min(row)
            rejects.append(
                {
                    "row_id": rid,
                    "field": "input_ids",
                    "reason": f"vocab: token id {bad} outside the model's {vocab} ids",
                }
            )
        else:
            keep.append(k)
    stats = {"rows_in": batch.num_rows, "rows_rejected": len(rejects)}
    write_parts(parts_dir, batch_key(batch.column("row_id").to_pylist()), "score", rejects, stats)
    return batch.take(keep) if len(keep) < batch.num_rows else batch


def _same_tokenizer(student: str, teacher: str) -> bool:
    from raydc.infra.models import load_tokenizer

    a, b = load_tokenizer(student), load_tokenizer(teacher)
    return a.get_vocab() == b.get_vocab()


def _first_row_without_teacher(files: list[str]) -> str | None:
    """The first prepared row with no teacher log-probs, reading one batch at a time."""
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(columns=["row_id", "teacher_logprobs"]):
            nulls = batch.column("teacher_logprobs").is_null()
            if nulls.true_count:
                return batch.column("row_id")[nulls.to_pylist().index(True)].as_py()
    return None


def _check_prepared(cfg, prepared_dir: str | os.PathLike) -> tuple[list[str], dict]:
    """The prepared shards and their summary, refused before any engine starts when they
    do not fit the student (another tokenizer) or mix rows with and without teacher
    log-probs that no teacher will fill."""
    scfg = cfg.score
    if not scfg.student:
        raise ScoreError("score.student is empty: set it to the student model folder")
    student = str(scfg.student)
    files = data_files(prepared_dir)
    summary_path = Path(prepared_dir) / "summary.json"
    if not files or not summary_path.exists():
        raise ScoreError(f"{prepared_dir}: no prepared data (run the prepare stage first)")
    prep = json.loads(summary_path.read_text())
    tok_fp = tokenizer_fingerprint(student)
    if prep.get("tokenizer_fingerprint") != tok_fp:
        raise ScoreError(
            f"{prepared_dir} was tokenised with {prep.get('tokenizer')!r} (fingerprint "
            f"{prep.get('tokenizer_fingerprint')}), not the student's tokenizer {student!r} "
            f"({tok_fp}); prepare again with data.tokenizer unset or set to the student"
        )
    given = int(prep.get("given_teacher_rows", 0))
    if not scfg.teacher and 0 < given < prep["rows_out"]:
        # Training needs every row of a micro-batch to have teacher log-probs or none.
        row = _first_row_without_teacher(files)
        raise ScoreError(
            f"row {row!r}: no teacher_logprobs, but {given} of {prep['rows_out']} rows give "
            "them; give them for every row or for none, or set score.teacher to score the rest"
        )
    return files, prep


# ----------------------------------------------------------------------------- the pipeline


def _write_scored(cfg, files: list[str], out: Path, teacher: str | None, same: bool | None) -> None:
    """The streaming pipeline: check -> student -> (teacher) -> finish -> Parquet."""
    import ray

    scfg = cfg.score
    student = str(scfg.student)
    parts = str(out / PARTS_DIR)
    ds = ray.data.read_parquet(files, num_cpus=LIGHT_CPUS)
    ds = ds.map_batches(
        check_batch,
        batch_format="pyarrow",
        num_cpus=LIGHT_CPUS,
        fn_kwargs=dict(
            max_len=max_prompt_len(student, int(scfg.engine.max_model_len)),
            vocab=vocab_size(student),
            parts_dir=parts,
        ),
    )
    with restart_args_allowed():
        ds = ds.map_batches(
            StudentScorer,
            fn_constructor_kwargs=dict(
                model=student, score_cfg=scfg, parts_dir=parts, entropy=cfg.stores_entropy()
            ),
            **scfg.engine.actor_pool_args(),
        )
        if teacher is not None:
            ds = ds.map_batches(
                TeacherScorer,
                fn_constructor_kwargs=dict(
                    model=teacher,
                    score_cfg=scfg,
                    same_tokenizer=same,
                    parts_dir=parts,
                    train_empty_think=cfg.data.train_empty_think,
                ),
                **scfg.engine.actor_pool_args(),
            )
    ds = ds.map_batches(
        finish_batch,
        batch_format="pyarrow",
        num_cpus=LIGHT_CPUS,
        fn_kwargs=dict(
            weights=cfg.weights,
            parts_dir=parts,
            logprobs=scfg.logprobs,
            inspect_dir=str(out / INSPECT_DIR) if scfg.inspection else None,
        ),
    )
    ds.write_parquet(str(out), ray_remote_args={"num_cpus": LIGHT_CPUS}, **SCORED_WRITE_ARGS)


# ----------------------------------------------------------------------------- the stage


def run_score(cfg, prepared_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Score prepared rows under the student (and teacher); write scored Parquet,
    ``rejects.parquet`` and ``manifest.json`` to ``out_dir``; return the summary."""
    from raydc.infra.models import offline_env
    from raydc.infra.runtime import connect_ray

    t0 = time.time()
    offline_env()
    files, prep = _check_prepared(cfg, prepared_dir)
    teacher = _teacher_to_score(cfg.score, prep)
    same = _same_tokenizer(str(cfg.score.student), teacher) if teacher else None

    connect_ray(cfg.run.ray_address)
    out = prepare_out_dir(out_dir)
    _write_scored(cfg, files, out, teacher, same)

    on_disk = column_bytes(data_files(out))
    summary = _summarize(out, on_disk, t0)
    manifest = _manifest(
        cfg, prep, summary, out=out, on_disk=on_disk, same=same, files=files, prepared=prepared_dir
    )
    write_json(out / "manifest.json", manifest)
    check_reject_share(
        "score", summary, cfg.data.max_reject_share, out / REJECTS_FILE, error=ScoreError
    )
    summary["paths"] = {
        "data": str(out),
        "manifest": str(out / "manifest.json"),
        "rejects": str(out / REJECTS_FILE),
    }
    return summary


def _teacher_to_score(scfg, prep: dict) -> str | None:
    """``score.teacher`` when some prepared rows give no teacher log-probs, else None."""
    if scfg.teacher and prep.get("given_teacher_rows", 0) < prep["rows_out"]:
        return str(scfg.teacher)
    return None


def _summarize(out: Path, on_disk: dict[str, int], t0: float) -> dict:
    """The stage summary from the parts the pipeline wrote; every row in is out or rejected."""
    finished = _collect_stats(out, "finish")
    engines = _engine_stats(out)
    head, totals = summarize_parts(out, "score", error=ScoreError)
    files = data_files(out)
    tokens = int(finished.get("tokens", 0))
    summary = {
        **head,
        "tokens": tokens,
        "loss_tokens": int(finished.get("loss_tokens", 0)),
        "teacher_rows": int(finished.get("teacher_rows", 0)),
        "teacher_unknown_tokens": int(finished.get("teacher_unknown_tokens", 0)),
        # cross-tokenizer rows whose placed teacher log-probs were checked to sum to the
        # teacher's, and teacher values carried past a gap or from an empty span
        "teacher_aligned_rows": int(totals.get("teacher_aligned_rows", 0)),
        "teacher_carried_tokens": int(totals.get("teacher_carried_tokens", 0)),
        "engines": engines,  # start-up (mean per engine) apart from busy scoring time
        "store_bytes_per_token": bytes_per_token(
            on_disk, tokens, sum(os.path.getsize(f) for f in files)
        ),
        "seconds": round(time.time() - t0, 3),
    }
    if finished.get("rows_out") != head["rows_out"]:
        raise ScoreError(
            f"score lost rows: {head['rows_in']} in != {head['rows_out']} out + "
            f"{head['rows_rejected']} rejected (a bug; please report)"
        )
    return summary


def _manifest(cfg, prep: dict, summary: dict, *, out, on_disk, same, files, prepared) -> dict:
    """``manifest.json``: the models, versions, counts, config and the store's description."""
    from raydc.infra.artifacts import fingerprint_paths

    scfg = cfg.score
    student, teacher = str(scfg.student), scfg.teacher and str(scfg.teacher)
    scored = _teacher_to_score(scfg, prep) is not None
    versions = _backend_version(scfg.backend)
    return {
        "student": {"path": student, "fingerprint": fingerprint_paths(student)},
        "tokenizer_fingerprint": prep["tokenizer_fingerprint"],
        "teacher": None
        if not teacher
        else {
            "path": teacher,
            "fingerprint": fingerprint_paths(teacher),
            "scored": scored,
            "same_tokenizer": same,
            "tokenizer_fingerprint": tokenizer_fingerprint(teacher),
            # softmax(logits / T): the distribution the traces were sampled from
            "temperature": float(scfg.teacher_temperature) if scored else None,
        },
        "backend": scfg.backend,
        "vllm_version": versions.get("vllm"),
        "versions": versions,
        "counts": {k: summary[k] for k in MANIFEST_COUNTS},
        "config": {"score": dataclasses.asdict(scfg), "data": prep.get("config")},
        "store": {**store_info(scfg), "column_bytes": on_disk},
        "input_fingerprint": fingerprint_paths(*files),
        "prepared": str(prepared),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": summary["seconds"],
        "engines": summary["engines"],
        # The weighting is not part of what scoring reads, except for the inspection table
        # (its fingerprint keys the weights then): only there do these describe the store.
        **(
            {
                "weights": cfg.weights.to_dict(),
                "weight_diagnostics": stored_weight_diagnostics(data_files(out), cfg.weights),
            }
            if scfg.inspection
            else {}
        ),
    }


def _engine_stats(out: Path) -> dict:
    """Per role: engines, mean start-up, busy time and tokens, tokens/s while busy."""
    engines = {}
    for role in ("student", "teacher"):
        eng = _collect_stats(out, ENGINE_PARTS + role)
        if eng:
            busy = eng.get("busy_s", 0.0)
            engines[role] = {
                "engines": int(eng.get("engines", 0)),
                "startup_s": round(eng.get("startup_s", 0.0) / max(1, eng.get("engines", 1)), 3),
                "busy_s": round(busy, 3),
                "tokens": int(eng.get("tokens", 0)),
                "tokens_per_s_busy": round(eng.get("tokens", 0) / busy, 1) if busy else None,
            }
    return engines


def _collect_stats(out: Path, stage: str) -> dict:
    totals: dict = {}
    for f in sorted((out / PARTS_DIR).glob(f"stats-{stage}-*.json")):
        for k, v in json.loads(f.read_text()).items():
            totals[k] = totals.get(k, 0) + v
        f.unlink()
    return totals


def _backend_version(backend: str) -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("vllm", "torch", "transformers", "ray"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            try:
                out[pkg] = md.version(f"{pkg}-cpu") if pkg == "vllm" else None
            except md.PackageNotFoundError:
                out[pkg] = None
    if backend != "vllm":
        out["vllm"] = None
    return out


def _check(cfg) -> None:
    check_model("score.student", cfg.score.student)
    if cfg.score.teacher and needs_teacher(cfg.weights):
        check_model("score.teacher", cfg.score.teacher)
    if cfg.score.teacher and Path(cfg.score.teacher).is_dir():
        check_vocab("score.teacher", cfg.score.teacher)
    _check_context(cfg)


def _check_context(cfg) -> None:
    """``score.engine.max_model_len`` holds the longest row prepare keeps
    (``data.max_length``) and fits the context of the models it scores with. A shorter one
    rejected the longer rows as ``too_long`` only when scoring reached them; a longer one
    than a model's failed when its engine started, in vLLM's words."""
    field = "score.engine.max_model_len"
    length = int(cfg.score.engine.max_model_len)
    if length < cfg.data.max_length:
        raise ConfigError(
            f"{field}={length}: shorter than data.max_length={cfg.data.max_length}, the "
            f"longest row prepare keeps; rows longer than {length} tokens would be rejected "
            f"as too_long only when scored; set {field} to at least {cfg.data.max_length} "
            "or lower data.max_length"
        )
    check_context(field, length, "score.student", cfg.score.student)
    if cfg.score.teacher:
        check_context(field, length, "score.teacher", cfg.score.teacher)


SCORE = Stage(
    "score",
    help="score teacher tokens under the student (and teacher) with vLLM",
    needs=lambda cfg: ("prepare",),
    check=_check,
    # cfg.weights is left out on purpose: weights are computed in the loss from the stored
    # log-probs, so changing them (or a Tune trial) never re-scores. Only the inspection
    # table (score.inspection, off by default) stores weights, so only then do they count.
    reads=lambda cfg, up: {
        "score": dataclasses.asdict(cfg.score),
        "prepare": up["prepare"].fingerprint,
        "student": fingerprint_paths(cfg.score.student),
        "teacher": fingerprint_paths(cfg.score.teacher),
        "needs_teacher": needs_teacher(cfg.weights),
        "entropy": cfg.stores_entropy(),
        "weights": cfg.weights.to_dict() if cfg.score.inspection else None,
    },
    run=lambda cfg, up, out: run_score(cfg, str(up["prepare"].out_dir), out),
)
