"""Teacher log-probs from a file of their own, joined to the traces by an id (Ray Data).

A public teacher-log-prob set (DASD's ``-Logprob`` sets) ships the teacher's ``token_ids``
and ``logprobs`` per sample in one file and the text in another, both keyed by
``sample_uuid``. ``join_teacher_logprobs`` adds the two columns to the trace rows with
Ray Data's hash-shuffle ``Dataset.join`` (a left outer join: every trace row stays; one
without a match is rejected later by the prepare map, naming the key). Neither side is
ever held in one process. JSONL lines of either file stay raw until a worker decodes
them, as the trace reader does, so a malformed line is counted, never a crash.

Counts go to the prepare stage's parts: ``source_rows`` (trace rows before the join),
``teacher_logprob_rows`` and ``teacher_logprob_rows_bad`` (log-prob lines without the key,
ids or log-probs). A log-prob file with two rows of one key would duplicate trace rows:
the stage fails when the join returns more rows than went in.
"""

from __future__ import annotations

import json
import uuid

import pyarrow as pa

from raydc.infra.artifacts import write_parts

JOIN = "_join_key"  # the key column both sides carry into the join
IDS = "_teacher_token_ids"
LOGPROBS = "_teacher_logprobs"


def _row(raw) -> dict | None:
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return row if isinstance(row, dict) else None


def _rows(batch: pa.Table) -> list[dict | None]:
    if "_raw" in batch.column_names:
        return [_row(r) for r in batch.column("_raw").to_pylist()]
    return batch.to_pylist()


def _key(row: dict | None, key: str) -> str | None:
    v = None if row is None else row.get(key)
    return None if v is None else str(v)


def keyed_traces(batch: pa.Table, key: str, parts_dir: str) -> pa.Table:
    """Trace rows as they were read, plus the join key (null when the row has none or
    cannot be decoded: it stays, unmatched, and the prepare map rejects it)."""
    keys = [_key(r, key) for r in _rows(batch)]
    write_parts(parts_dir, f"src-{uuid.uuid4().hex}", "prepare", [], {"source_rows": len(keys)})
    return batch.append_column(JOIN, pa.array(keys, pa.string()))


def keyed_logprobs(batch: pa.Table, dcfg, parts_dir: str) -> pa.Table:
    """Log-prob rows -> (key, token ids, log-probs); rows missing one of them are dropped
    and counted."""
    keys, ids, lps = [], [], []
    bad = 0
    for row in _rows(batch):
        k = _key(row, dcfg.join_key)
        t = None if row is None else row.get(dcfg.teacher_token_ids_key)
        v = None if row is None else row.get(dcfg.teacher_logprobs_key)
        if k is None or not isinstance(t, list) or not isinstance(v, list):
            bad += 1
            continue
        keys.append(k)
        ids.append([int(x) for x in t])
        lps.append([float(x) for x in v])
    stats = {"teacher_logprob_rows": len(keys) + bad, "teacher_logprob_rows_bad": bad}
    write_parts(parts_dir, f"lp-{uuid.uuid4().hex}", "prepare", [], stats)
    return pa.table(
        {
            JOIN: pa.array(keys, pa.string()),
            IDS: pa.array(ids, pa.list_(pa.int64())),
            LOGPROBS: pa.array(lps, pa.list_(pa.float64())),
        }
    )


def join_teacher_logprobs(ds, dcfg, parts_dir: str, read):
    """``ds`` (raw trace rows) left-joined with the rows of ``dcfg.teacher_logprobs_path``
    (read with ``read(path, format)``) on ``dcfg.join_key``."""
    import ray

    partitions = dcfg.join_partitions or max(1, int(ray.cluster_resources().get("CPU", 1)))
    left = ds.map_batches(
        keyed_traces,
        batch_format="pyarrow",
        fn_kwargs=dict(key=dcfg.join_key, parts_dir=parts_dir),
    )
    right = read(dcfg.teacher_logprobs_path, "auto").map_batches(
        keyed_logprobs, batch_format="pyarrow", fn_kwargs=dict(dcfg=dcfg, parts_dir=parts_dir)
    )
    return left.join(right, join_type="left_outer", num_partitions=partitions, on=(JOIN,))


def merge_joined(row: dict, dcfg) -> dict:
    """Move a joined row's teacher columns under the data config's keys; a row the join
    found nothing for raises a reject naming its key."""
    from raydc.prepare.parse import RowReject

    key, ids, lps = row.pop(JOIN, None), row.pop(IDS, None), row.pop(LOGPROBS, None)
    if ids is None or lps is None:
        where = f"{dcfg.join_key}={key!r}" if key is not None else f"no {dcfg.join_key}"
        raise RowReject(
            dcfg.join_key,
            "no_teacher_logprobs",
            f"{where}: no row for it in data.teacher_logprobs_path",
        )
    row[dcfg.teacher_token_ids_key] = ids
    row[dcfg.teacher_logprobs_key] = lps
    return row
