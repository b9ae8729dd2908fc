"""The select stage: DASD divergence-aware selection over the scored store (Ray Data).

One streaming pass scores every scored row where it lies (the share of its sentences whose
student/teacher divergence passes ``select.threshold``) and brings back only
(row_id, prompt_id, score); the per-prompt top-k is taken on the driver. The stage writes
the kept row ids, never a copy of the rows: training reads the scored store through them
(docs/contracts.md, "The selection").
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raydc.engines.base import ScoreError
from raydc.infra.artifacts import (
    REJECTS_FILE,
    REJECTS_SCHEMA,
    StageError,
    collect_parts,
    count_rows,
    data_files,
    prepare_out_dir,
    write_json,
)
from raydc.infra.runtime import LIGHT_CPUS, connect_ray
from raydc.infra.schemas import SELECTION_FILE, SELECTION_SCHEMA
from raydc.infra.stage import Stage


def dasd_batch_scores(batch: pa.Table, threshold: float) -> pa.Table:
    """(row_id, prompt_id, score) for a batch of scored rows: each row's DASD score, the
    share of its sentences with delta > ``threshold``. Rows are scored independently."""
    import torch

    from raydc.method.selection import divergence_scores

    rows = batch.select(
        ["row_id", "prompt_id", "student_logprobs", "teacher_logprobs", "sentence_ids", "loss_mask"]
    ).to_pylist()
    missing = [r["row_id"] for r in rows if r["teacher_logprobs"] is None]
    if missing:
        raise ScoreError(
            f"selection needs teacher log-probs; rows {missing[:5]} have none (set "
            "score.teacher or give them in the data)"
        )
    B, T = len(rows), max((len(r["loss_mask"]) for r in rows), default=0)
    s, t = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    sid, m = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        n = len(r["loss_mask"])
        s[b, :n] = torch.tensor(r["student_logprobs"], dtype=torch.float64)
        t[b, :n] = torch.tensor(r["teacher_logprobs"], dtype=torch.float64)
        sid[b, :n] = torch.tensor(r["sentence_ids"])
        m[b, :n] = torch.tensor(r["loss_mask"])
    scores = divergence_scores(s, t, sid, m, threshold).tolist() if B else []
    return pa.table(
        {
            "row_id": pa.array([r["row_id"] for r in rows], pa.string()),
            "prompt_id": pa.array([r["prompt_id"] for r in rows], pa.string()),
            "score": pa.array(scores, pa.float64()),
        }
    )


def _natural_key(text: str) -> tuple:
    """Sort key that orders "p-2" before "p-10" (row ids carry line numbers)."""
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", text))


def scored_records(files: list[str], threshold: float) -> list[dict]:
    """One Ray Data pass: (row_id, prompt_id, score) of every scored row, sorted by prompt
    and then row id (natural order). Row ids must be unique."""
    import ray

    columns = ["row_id", "prompt_id", "student_logprobs", "teacher_logprobs"]
    columns += ["sentence_ids", "loss_mask"]
    scored = ray.data.read_parquet(files, columns=columns, num_cpus=LIGHT_CPUS).map_batches(
        dasd_batch_scores,
        batch_format="pyarrow",
        num_cpus=LIGHT_CPUS,
        fn_kwargs=dict(threshold=threshold),
    )
    tables = [t for t in ray.get(scored.to_arrow_refs()) if t.num_rows]
    records = pa.concat_tables(tables).to_pylist() if tables else []
    seen: set = set()
    for r in records:
        if r["row_id"] in seen:
            raise ScoreError(
                f"selection needs unique row ids; row_id {r['row_id']!r} appears more than once "
                "(check data.id_key)"
            )
        seen.add(r["row_id"])
    records.sort(key=lambda r: (str(r["prompt_id"]), _natural_key(r["row_id"])))
    return records


def _not_selected(records: list[dict], top_k: int) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "row_id": r["row_id"],
                "stage": "select",
                "field": "teacher_logprobs",
                "reason": f"not_selected: DASD score {r['score']:.4f} outside the top {top_k} "
                f"of prompt {r['prompt_id']}",
            }
            for r in records
        ],
        schema=REJECTS_SCHEMA,
    )


def _selection_manifest(src_manifest: Path, summary: dict, sel, files, out: Path) -> dict:
    """The scored store's manifest with the selection's counts and settings."""
    manifest = json.loads(src_manifest.read_text())
    manifest["counts"] = {
        **manifest.get("counts", {}),
        "rows_in": summary["rows_in"],
        "rows_out": summary["rows_out"],
        "rows_rejected": summary["rows_rejected"],
    }
    manifest["selection"] = {
        "threshold": sel.threshold,
        "top_k": sel.top_k,
        # The scored store the kept ids point into, relative to this folder, and its files'
        # sizes (training refuses a store that changed since).
        "source": os.path.relpath(src_manifest.parent.resolve(), out.resolve()),
        "source_files": {Path(f).name: os.path.getsize(f) for f in files},
        "mean_score_kept": summary["mean_score_kept"],
        "mean_score_all": summary["mean_score_all"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return manifest


def run_select(cfg, scored_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """DASD divergence-aware selection on scored rows: per prompt, keep the top
    ``cfg.select.top_k`` candidates by the share of sentences with delta >
    ``cfg.select.threshold``. Writes the kept row ids (``selection.parquet``, no copy of the
    rows: training reads the scored store through it), ``rejects.parquet`` (the rows not
    selected, reason ``not_selected``) and a manifest; returns the summary.

    No shuffle: one pass scores every row where it lies and brings back only
    (row_id, prompt_id, score); the top-k is taken on the driver (a few dozen bytes a row).
    Ties go to the row id that sorts first.
    """
    from raydc.method.selection import select_top_k

    t0 = time.time()
    files = data_files(scored_dir)
    src_manifest = Path(scored_dir) / "manifest.json"
    if not files or not src_manifest.exists():
        raise ScoreError(f"{scored_dir}: no scored data (run the score stage first)")
    connect_ray(cfg.run.ray_address)
    out = prepare_out_dir(out_dir)
    sel = cfg.select
    top_k = int(sel.top_k)
    records = scored_records(files, float(sel.threshold))
    keep = set(
        select_top_k([r["prompt_id"] for r in records], [r["score"] for r in records], top_k)
    )
    dropped = _not_selected([r for i, r in enumerate(records) if i not in keep], top_k)
    kept = [records[i] for i in sorted(keep)]
    pq.write_table(
        pa.Table.from_pylist(
            [{k: r[k] for k in SELECTION_SCHEMA.names} for r in kept], schema=SELECTION_SCHEMA
        ),
        out / SELECTION_FILE,
        compression="zstd",
    )
    _, rejects = collect_parts(out, "select", extra_rejects=dropped)
    rows_out = count_rows([str(out / SELECTION_FILE)])
    n_scored = count_rows(files)
    if len(records) != n_scored or n_scored != rows_out + rejects.num_rows:
        raise ScoreError(
            f"select lost rows: {n_scored} scored, {len(records)} seen, {rows_out} kept "
            f"+ {rejects.num_rows} not selected (a bug; please report)"
        )
    summary = {
        "stage": "select",
        "rows_in": len(records),
        "rows_out": rows_out,
        "rows_rejected": rejects.num_rows,
        "not_selected": dropped.num_rows,  # of rows_rejected: candidates outside the top k
        "mean_score_kept": sum(r["score"] for r in kept) / max(1, rows_out),
        "mean_score_all": sum(r["score"] for r in records) / max(1, len(records)),
        "seconds": round(time.time() - t0, 3),
    }
    manifest = _selection_manifest(src_manifest, summary, sel, files, out)
    write_json(out / "manifest.json", manifest)
    summary["paths"] = {
        "data": str(out),
        "manifest": str(out / "manifest.json"),
        "rejects": str(out / REJECTS_FILE),
    }
    return summary


def _check(cfg) -> None:
    if not cfg.select.enabled:  # a stage error (exit 1): the config itself is valid
        raise StageError("select: select.enabled is false; set select.enabled=true")


SELECT = Stage(
    "select",
    help="DASD divergence-aware top-k selection per prompt",
    needs=lambda cfg: ("score",),
    enabled=lambda cfg: cfg.select.enabled,
    check=_check,
    reads=lambda cfg, up: {
        "select": dataclasses.asdict(cfg.select),
        "score": up["score"].fingerprint,
    },
    run=lambda cfg, up, out: run_select(cfg, str(up["score"].out_dir), out),
)
