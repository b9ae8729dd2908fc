"""The scored store: what the finish step writes, and what the manifest says about it.

``finish_batch`` resolves unknown teacher log-probs (the student's own: a neutral ratio,
counted and masked in ``teacher_mask``) and casts a batch to the store's schema
(``raydc.infra.schemas.scored_schema``; log-probs as float16 or float32, ``to_store``).
``store_info``, ``bytes_per_token`` and ``stored_weight_diagnostics`` describe the written
store in the manifest; the diagnostics are of the configured weights recomputed from the stored
log-probs, i.e. what training sees. ``write_store`` is the one writer of the store's format
outside the score stage (tests, benches).
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydc.infra.artifacts import batch_key, write_parts
from raydc.infra.schemas import INSPECT_DIR, INSPECT_SCHEMA, STORE_FORMAT, scored_schema

if TYPE_CHECKING:
    from raydc.config import ScoreConfig
    from raydc.method.weights import WeightConfig

DIAGNOSTICS_MAX_TOKENS = 2_000_000  # weight diagnostics over at most this many loss tokens


def set_column(batch: pa.Table, name: str, col: pa.Array) -> pa.Table:
    """``batch`` with column ``name`` replaced by ``col``, or added."""
    if name in batch.column_names:
        return batch.set_column(batch.column_names.index(name), name, col)
    return batch.append_column(name, col)


def batch_weights(s_rows, t_rows, m_rows, sid_rows, wcfg) -> list[np.ndarray]:
    """``compute_weights`` of ``wcfg`` for rows given as lists (ragged). Rows with and without
    teacher log-probs are weighted apart: without, d = log p_S.
    An entropy gate is left out (the store holds no entropy; training applies it)."""
    import dataclasses

    import torch

    from raydc.method.weights import compute_weights, needs_entropy

    if needs_entropy(wcfg):
        wcfg = dataclasses.replace(wcfg, gate="none")

    B, T = len(m_rows), max((len(m) for m in m_rows), default=0)
    m_BT = torch.zeros(B, T, dtype=torch.bool)
    s_BT = torch.zeros(B, T)
    sid_BT = torch.zeros(B, T, dtype=torch.long)
    t_BT = torch.zeros(B, T)
    has_t = [t is not None for t in t_rows]
    for b in range(B):
        n = len(m_rows[b])
        m_BT[b, :n] = torch.as_tensor(np.asarray(m_rows[b], bool))
        s_BT[b, :n] = torch.as_tensor(np.asarray(s_rows[b], np.float32))
        sid_BT[b, :n] = torch.as_tensor(np.asarray(sid_rows[b], np.int64))
        if has_t[b]:
            t_BT[b, :n] = torch.as_tensor(np.asarray(t_rows[b], np.float32))
    w_BT = torch.zeros(B, T)
    for group in (True, False):
        rows = [b for b in range(B) if has_t[b] == group]
        if rows:
            w_BT[rows] = compute_weights(
                s_BT[rows], t_BT[rows] if group else None, m_BT[rows], wcfg, sid_BT[rows]
            )
    return [w_BT[b, : len(m_rows[b])].numpy() for b in range(B)]


def to_store(rows: list, logprobs: str) -> pa.Array:
    """Log-prob rows as the store's list column: float16 rounds to nearest (values below
    float16's range, never seen in practice, clamp to its lowest finite value)."""
    if logprobs == "float32":
        return pa.array(rows, pa.list_(pa.float32()))
    lo = float(np.finfo(np.float16).min)
    return pa.array(
        [None if r is None else np.maximum(np.asarray(r, np.float32), lo) for r in rows],
        pa.list_(pa.float32()),
    ).cast(pa.list_(pa.float16()))


def finish_batch(
    batch: pa.Table,
    weights: WeightConfig,
    parts_dir: str,
    logprobs: str = "float16",
    inspect_dir: str | None = None,
) -> pa.Table:
    """Resolve unknown teacher log-probs and cast to the scored store's schema. With
    ``inspect_dir``, also write the rows' text, offsets, conversation and configured weights
    (from the fp32 log-probs, under ``weights``) to a side-table part named by the batch's
    row ids."""
    s_rows = batch.column("student_logprobs").to_pylist()
    t_rows = batch.column("teacher_logprobs").to_pylist()
    m_rows = batch.column("loss_mask").to_pylist()
    filled = 0
    tm_rows: list[list[bool] | None] = [None] * len(t_rows)
    for k, (s, t, m) in enumerate(zip(s_rows, t_rows, m_rows)):
        if t is None:
            continue
        t = [math.nan if x is None else float(x) for x in t]
        known = [True] * len(t)
        for i, on in enumerate(m):
            if on and math.isnan(t[i]):
                t[i] = s[i]  # the teacher said nothing here: a neutral ratio of 1
                known[i] = False
                filled += 1
            elif not on and math.isnan(t[i]):
                t[i] = 0.0
        t_rows[k] = t
        if not all(known):
            tm_rows[k] = known  # training keeps these at weight 1 under any student reference
    key = batch_key(batch.column("row_id").to_pylist())
    if inspect_dir is not None:
        sid_rows = batch.column("sentence_ids").to_pylist()
        w_rows = batch_weights(s_rows, t_rows, m_rows, sid_rows, weights)
        side = batch.select([n for n in INSPECT_SCHEMA.names if n != "weights"])
        side = side.append_column("weights", pa.array(w_rows, pa.list_(pa.float32())))
        os.makedirs(inspect_dir, exist_ok=True)
        tmp = os.path.join(inspect_dir, f".{key}.parquet.tmp")
        pq.write_table(side.cast(INSPECT_SCHEMA), tmp, compression="zstd")
        os.replace(tmp, os.path.join(inspect_dir, f"{key}.parquet"))
    batch = set_column(batch, "teacher_logprobs", to_store(t_rows, logprobs))
    batch = set_column(batch, "student_logprobs", to_store(s_rows, logprobs))
    batch = set_column(batch, "teacher_mask", pa.array(tm_rows, pa.list_(pa.bool_())))
    if "student_entropy" in batch.column_names:
        h_rows = batch.column("student_entropy").to_pylist()
        batch = set_column(batch, "student_entropy", to_store(h_rows, logprobs))
    else:
        batch = set_column(
            batch, "student_entropy", pa.nulls(batch.num_rows, pa.list_(pa.float32()))
        )
    stats = {
        "rows_out": batch.num_rows,
        "tokens": int(sum(len(m) for m in m_rows)),
        "loss_tokens": int(sum(sum(m) for m in m_rows)),
        "teacher_rows": int(sum(t is not None for t in t_rows)),
        "teacher_unknown_tokens": filled,
    }
    write_parts(parts_dir, key, "finish", [], stats)
    schema = scored_schema(logprobs)
    return batch.select(schema.names).cast(schema)


def store_info(scfg: ScoreConfig) -> dict:
    """The manifest's description of the scored store (training checks ``format``)."""
    return {
        "format": STORE_FORMAT,
        "logprobs": scfg.logprobs,
        "inspection": INSPECT_DIR if scfg.inspection else None,
    }


def bytes_per_token(on_disk: dict[str, int], tokens: int, file_bytes: int) -> dict[str, float]:
    """Bytes per scored token: per column (compressed chunks), the files' footers and page
    headers (``metadata``), and the whole files (``total``)."""
    if not tokens:
        return {}
    per = {k: round(v / tokens, 3) for k, v in sorted(on_disk.items())}
    meta = max(0, file_bytes - sum(on_disk.values()))
    return {**per, "metadata": round(meta / tokens, 3), "total": round(file_bytes / tokens, 3)}


def stored_weight_diagnostics(files: list[str], wcfg) -> dict:
    """``raydc.method.weights.weight_diagnostics`` of the configured weights, recomputed from the
    stored log-probs (what training sees), over the first DIAGNOSTICS_MAX_TOKENS loss
    tokens; ``sampled`` says whether that cut anything."""
    import torch

    from raydc.method.weights import weight_diagnostics

    columns = ["student_logprobs", "teacher_logprobs", "loss_mask", "sentence_ids"]
    ws, ms, n, sampled = [], [], 0, False
    for f in files:
        if sampled:
            break
        for b in pq.ParquetFile(f).iter_batches(batch_size=256, columns=columns):
            if n >= DIAGNOSTICS_MAX_TOKENS:
                sampled = True
                break
            m_rows = b.column("loss_mask").to_pylist()
            ws += batch_weights(
                b.column("student_logprobs").to_pylist(),
                b.column("teacher_logprobs").to_pylist(),
                m_rows,
                b.column("sentence_ids").to_pylist(),
                wcfg,
            )
            ms += m_rows
            n += sum(sum(m) for m in m_rows)
    if not ws:
        return {"tokens": 0, "sampled": False}
    T = max(len(w) for w in ws)
    w_BT = torch.zeros(len(ws), T)
    m_BT = torch.zeros(len(ws), T, dtype=torch.bool)
    for b, (w, m) in enumerate(zip(ws, ms)):
        w_BT[b, : len(w)] = torch.as_tensor(w)
        m_BT[b, : len(m)] = torch.tensor(m)
    diag = weight_diagnostics(w_BT, m_BT, wcfg)
    diag["sampled"] = sampled
    if isinstance(diag.get("corr_weight_length"), float) and math.isnan(diag["corr_weight_length"]):
        diag["corr_weight_length"] = None  # JSON has no NaN
    return diag


def write_store(
    out_dir: str | os.PathLike,
    columns: dict,
    student_dir: str,
    teacher_dir: str | None = None,
    n_files: int = 1,
    logprobs: str = "float32",
    row_group_size: int | None = None,
) -> str:
    """A scored store written outside the score stage (tests, benches, hand-made data):
    ``columns`` (``row_id``, ``input_ids``, ``loss_mask``, ``student_logprobs``, and any
    other scored column; ``prompt_id``, ``sentence_ids``, ``num_tokens`` and
    ``num_loss_tokens`` are derived when absent) cast to the store's schema and written in
    ``n_files`` parts with the score stage's writer settings, plus the ``manifest.json``
    training checks (the student's fingerprint, the counts, the store's format)."""
    from raydc.infra.artifacts import fingerprint_paths
    from raydc.infra.schemas import SCORED_WRITE_ARGS

    cols = dict(columns)
    n = len(cols["row_id"])
    mask = _as_list_array(cols["loss_mask"], pa.bool_())
    lengths = np.diff(np.asarray(mask.offsets))
    cols.setdefault("prompt_id", cols["row_id"])
    cols.setdefault("num_tokens", lengths)
    if "num_loss_tokens" not in cols:
        flags = np.asarray(mask.values.to_numpy(zero_copy_only=False), np.int64)
        starts = np.asarray(mask.offsets)[:-1]
        sums = np.add.reduceat(flags, starts) if len(flags) else np.zeros(n, np.int64)
        cols["num_loss_tokens"] = np.where(lengths > 0, sums, 0)
    if "sentence_ids" not in cols:
        zeros = pa.array(np.zeros(int(lengths.sum()), np.int32))
        cols["sentence_ids"] = pa.ListArray.from_arrays(mask.offsets, zeros)
    schema = scored_schema(logprobs)
    arrays = {}
    for f in schema:
        v = cols.get(f.name)
        if v is None:
            arrays[f.name] = pa.nulls(n, f.type)
        elif pa.types.is_list(f.type):
            arrays[f.name] = _as_list_array(v, f.type.value_type).cast(f.type)
        else:
            arrays[f.name] = pa.array(np.asarray(v).tolist(), f.type)
    table = pa.table(arrays, schema=schema)
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    per = max(1, -(-n // n_files))
    for j in range(n_files):
        pq.write_table(
            table.slice(j * per, per),
            os.path.join(out, f"part-{j:05d}.parquet"),
            row_group_size=row_group_size,
            **SCORED_WRITE_ARGS,
        )
    manifest = {
        "student": {"path": str(student_dir), "fingerprint": fingerprint_paths(student_dir)},
        "tokenizer_fingerprint": fingerprint_paths(student_dir),
        "teacher": None
        if not teacher_dir
        else {"path": str(teacher_dir), "fingerprint": fingerprint_paths(teacher_dir)},
        "backend": "write_store",
        "counts": {
            "rows_in": n,
            "rows_out": n,
            "rows_rejected": 0,
            "tokens": int(sum(cols["num_tokens"])),
            "loss_tokens": int(sum(cols["num_loss_tokens"])),
        },
        "store": {"format": STORE_FORMAT, "logprobs": logprobs, "inspection": None},
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return out


def _as_list_array(values, value_type: pa.DataType) -> pa.Array:
    """A list column given as an Arrow array, or as a sequence of rows (None: a null row)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    rows = [None if v is None else np.asarray(v).tolist() for v in values]
    return pa.array(rows, pa.list_(value_type))
