"""Teacher log-probs from a file of their own, joined to the traces by an id (Ray Data).

A public teacher-log-prob set (DASD's ``-Logprob`` sets) ships the teacher's ``token_ids``
and ``logprobs`` per sample in one file and the text in another: the traces carry the
key as ``data.join_key`` (DASD's text set: ``uuid``), the log-prob file as
``data.teacher_join_key`` (DASD: ``sample_uuid``; default: the same name).
``join_teacher_logprobs`` adds the teacher's columns to the trace rows with Ray Data's
hash-shuffle ``Dataset.join`` (a left outer join: every trace row stays; one without a
match is rejected later by the prepare map, naming the key). Neither side is ever held
in one process. JSONL lines of either file stay raw until a worker decodes them, as the
trace reader does, so a malformed line is counted, never a crash.

Each log-prob row is read where it lies, by the same rules as log-probs inside a trace
row (``raydc.prepare.parse.read_teacher``, in any ``data.teacher_logprobs_format``), into
typed columns: the log-probs (NaN: missing), token ids, token strings, offsets, and a
small JSON ``meta`` with the missing counts and the keys a reject names. A row whose
cells cannot be read (a token id ``"abc"``, log-probs null) travels as its reason, so
the trace it joins is rejected naming the field, not the whole stage.

Counts go to the prepare stage's parts: ``source_rows`` (trace rows before the join),
``teacher_logprob_rows`` and ``teacher_logprob_rows_bad`` (log-prob lines that are not a
JSON object or have no key: nothing to join). A log-prob file with two rows of one key
would duplicate trace rows: the stage fails when the join returns more rows than went in.
"""

from __future__ import annotations

import json
import uuid

import pyarrow as pa

from raydc.infra.artifacts import write_parts
from raydc.method.align import NAN
from raydc.prepare.parse import JOINED, RowReject, as_text, read_teacher, table_rows

JOIN = "_join_key"  # the key column both sides carry into the join
LOGPROBS = "_teacher_logprobs"
IDS = "_teacher_token_ids"
TOKENS = "_teacher_tokens"
OFFSETS = "_teacher_offsets"  # interleaved (start, end)
TEXT = "_teacher_text"
META = "_teacher_meta"  # JSON: fields and missing counts, or {"error": [field, code, detail]}
TEACHER_COLUMNS = {
    LOGPROBS: pa.list_(pa.float64()),
    IDS: pa.list_(pa.int64()),
    TOKENS: pa.list_(pa.string()),
    OFFSETS: pa.list_(pa.int64()),
    TEXT: pa.string(),
    META: pa.string(),
}
JOINED_COLUMNS = (JOIN, *TEACHER_COLUMNS)  # what a joined trace row carries beside its own


def _row(raw) -> dict | None:
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return row if isinstance(row, dict) else None


def _rows(batch: pa.Table, columns: list[str] | None = None) -> list[dict | None]:
    if "_raw" in batch.column_names:
        return [_row(r) for r in batch.column("_raw").to_pylist()]
    if columns is not None:
        batch = batch.select([c for c in columns if c in batch.column_names])
        if not batch.column_names:
            return [{}] * batch.num_rows
    return table_rows(batch)


def _key(row: dict | None, key: str) -> str | None:
    v = None if row is None else row.get(key)
    if isinstance(v, (bytes, bytearray)):  # a string cell that is not UTF-8
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None if v is None else str(v)


def teacher_key(dcfg) -> str:
    """The key's name in the log-prob file."""
    return dcfg.teacher_join_key or dcfg.join_key


def keyed_traces(batch: pa.Table, key: str, parts_dir: str) -> pa.Table:
    """Trace rows as they were read, plus the join key (null when the row has none or
    cannot be decoded: it stays, unmatched, and the prepare map rejects it)."""
    keys = [_key(r, key) for r in _rows(batch, [key])]
    write_parts(parts_dir, f"src-{uuid.uuid4().hex}", "prepare", [], {"source_rows": len(keys)})
    return batch.append_column(JOIN, pa.array(keys, pa.string()))


def keyed_logprobs(batch: pa.Table, dcfg, parts_dir: str) -> pa.Table:
    """Log-prob rows -> the key and the teacher's columns (``TEACHER_COLUMNS``), read by
    ``read_teacher``; a row that cannot be read keeps its key and its reason. Rows with no
    key are dropped and counted."""
    tkey = teacher_key(dcfg)
    cols: dict[str, list] = {c: [] for c in JOINED_COLUMNS}
    bad = 0
    for row in _rows(batch):
        k = _key(row, tkey)
        if k is None:
            bad += 1
            continue
        for c, v in zip(JOINED_COLUMNS, (k, *_teacher_cells(row, dcfg, tkey, k))):
            cols[c].append(v)
    stats = {"teacher_logprob_rows": len(cols[JOIN]) + bad, "teacher_logprob_rows_bad": bad}
    write_parts(parts_dir, f"lp-{uuid.uuid4().hex}", "prepare", [], stats)
    types = {JOIN: pa.string(), **TEACHER_COLUMNS}
    return pa.table({c: pa.array(v, types[c]) for c, v in cols.items()})


def _teacher_cells(row: dict, dcfg, tkey: str, k: str) -> tuple:
    """One log-prob row's cells of ``TEACHER_COLUMNS``."""
    lk = dcfg.teacher_logprobs_key
    try:
        t = read_teacher(row, dcfg)
        if t is None:
            raise RowReject(lk, "missing_key", f"{lk!r} is missing or null")
    except RowReject as e:
        where = f"in data.teacher_logprobs_path, {tkey}={k!r}"
        error = [e.field, e.code, f"{e.detail} ({where})" if e.detail else where]
        return None, None, None, None, None, json.dumps({"error": error})
    meta = {f: t[f] for f in ("field", "tokens_field", "token_ids_field", "missing")}
    offsets = None if t["offsets"] is None else [x for se in t["offsets"] for x in se]
    return t["logprobs"], t["token_ids"], t["tokens"], offsets, t["text"], json.dumps(meta)


def join_teacher_logprobs(ds, dcfg, parts_dir: str, read):
    """``ds`` (raw trace rows) left-joined with the rows of ``dcfg.teacher_logprobs_path``
    (read with ``read(path, format)``) on ``dcfg.join_key`` == ``teacher_key(dcfg)``."""
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
    """Put a joined row's teacher under ``parse.JOINED`` (its columns, or the reject its
    log-prob row earned); a row the join found nothing for raises a reject naming its key."""
    key = row.pop(JOIN, None)
    cells = {c: row.pop(c, None) for c in TEACHER_COLUMNS}
    jk, tkey = dcfg.join_key, teacher_key(dcfg)
    if cells[META] is None:
        if key is None:
            if row.get(jk) is not None:
                as_text(row[jk], jk)  # an undecodable key says so
            raise RowReject(jk, "no_teacher_logprobs", f"no {jk}: nothing to join on")
        raise RowReject(
            jk,
            "no_teacher_logprobs",
            f"{jk}={key!r}: no row with {tkey}={key!r} in data.teacher_logprobs_path",
        )
    meta = json.loads(cells[META])
    if "error" in meta:
        row[JOINED] = RowReject(*meta["error"])
        return row
    flat = cells[OFFSETS]
    row[JOINED] = {
        "logprobs": [NAN if v is None else float(v) for v in cells[LOGPROBS]],
        "tokens": cells[TOKENS],
        "offsets": None if flat is None else list(zip(flat[::2], flat[1::2])),
        "token_ids": cells[IDS],
        "text": cells[TEXT],
        **meta,
    }
    return row
