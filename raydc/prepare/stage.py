"""The prepare stage: teacher traces in, tokenised rows with loss masks out (Ray Data).

Sources: JSONL, Parquet, or a folder written by ``datasets.Dataset.save_to_disk``. One
Ray Data datasource reads all three and tags each row with its file and index, so a row
without an id gets ``"{file}:{index}"``. JSONL lines travel as raw bytes and are decoded
inside the workers, so an undecodable or malformed line becomes a reject with its row id
instead of failing the read. Blocks stream through ``map_batches`` (tokenise, mask,
align) into Parquet shards; rejects and counts are written beside them per batch
(``raydc.infra.schemas``) and merged at the end. The driver never holds the rows.

Counting: rows_in counts candidates (a source row with a list of responses contributes
one per response; a source row rejected before it is split counts once). A Parquet string
cell that is not UTF-8 is its row's reject (``parse.table_rows``), not the batch's crash.
The stage fails when it keeps no row, or when a row id repeats (``check_unique_ids``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from raydc.config import roles
from raydc.infra.artifacts import (
    PARTS_DIR,
    REJECTS_FILE,
    batch_key,
    check_reject_share,
    fingerprint_paths,
    prepare_out_dir,
    summarize_parts,
    tokenizer_fingerprint,
    write_json,
    write_parts,
)
from raydc.infra.models import check_input, check_model
from raydc.infra.runtime import connect_ray
from raydc.infra.schemas import PREPARED_SCHEMA
from raydc.infra.stage import Stage
from raydc.prepare.join import JOIN, JOINED_COLUMNS, merge_joined, teacher_key
from raydc.prepare.parse import MISSING_KINDS, RowReject, parse_row, row_id_of, table_rows
from raydc.prepare.render import (
    TeacherCoverageReject,
    prepare_candidate,
    special_ids,
    teacher_ids_to_offsets,
)

if TYPE_CHECKING:
    from raydc.config import DataConfig, RaydcConfig

READ_CHUNK_ROWS = 1024


class PrepareError(RuntimeError):
    """The prepare stage refused its input (e.g. too many rejects)."""


# ----------------------------------------------------------------------------- reading


def resolve_source(path: str, fmt: str = "auto") -> tuple[str, list[str]]:
    """(format, files) for a JSONL/Parquet file or folder, or a saved HF datasets folder."""
    if not path:
        raise PrepareError("data.path is empty: set it to a JSONL/Parquet file or folder")
    p = Path(path)
    if not p.exists():
        raise PrepareError(f"data.path={path!r} does not exist")
    if p.is_dir() and (fmt == "hf" or (fmt == "auto" and (p / "state.json").exists())):
        state = json.loads((p / "state.json").read_text())
        files = [str(p / f["filename"]) for f in state.get("_data_files", [])]
        if not files:
            raise PrepareError(f"{path}: state.json lists no data files")
        return "hf", files
    files = sorted(str(f) for f in p.iterdir() if f.is_file()) if p.is_dir() else [str(p)]
    by_ext = {
        "jsonl": [f for f in files if f.endswith((".jsonl", ".json", ".jsonl.gz"))],
        "parquet": [f for f in files if f.endswith(".parquet")],
    }
    if fmt == "auto":
        found = [k for k, v in by_ext.items() if v]
        if len(found) != 1:
            raise PrepareError(
                f"data.path={path!r}: cannot tell the format (found {found or 'no'} JSONL/"
                "Parquet files); set data.format"
            )
        fmt = found[0]
    chosen = by_ext.get(fmt) if p.is_dir() else files
    if not chosen:
        raise PrepareError(f"data.path={path!r}: no {fmt} files")
    return fmt, chosen


def _tag(table: pa.Table, name: str, start: int) -> pa.Table:
    n = table.num_rows
    table = table.append_column("_source", pa.array([name] * n, pa.string()))
    return table.append_column("_index", pa.array(range(start, start + n), pa.int64()))


def _datasource(fmt: str, files: list[str]):
    from ray.data.datasource import FileBasedDatasource

    class TracesDatasource(FileBasedDatasource):
        """Rows of JSONL (raw bytes), Parquet or Arrow-stream files, tagged with file/index."""

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            name = os.path.basename(path)
            if fmt == "jsonl":
                data = f.readall()
                if path.endswith(".gz"):
                    import gzip

                    data = gzip.decompress(data)
                raw, idx = [], []
                for i, line in enumerate(data.split(b"\n")):
                    if line.strip():
                        raw.append(line.rstrip(b"\r"))
                        idx.append(i)
                for s in range(0, len(raw), READ_CHUNK_ROWS):
                    yield pa.table(
                        {
                            "_raw": pa.array(raw[s : s + READ_CHUNK_ROWS], pa.binary()),
                            "_source": pa.array([name] * len(idx[s : s + READ_CHUNK_ROWS])),
                            "_index": pa.array(idx[s : s + READ_CHUNK_ROWS], pa.int64()),
                        }
                    )
            elif fmt == "parquet":
                import pyarrow.parquet as pq

                start = 0
                # Parquet needs random access; the stream Ray hands us is sequential.
                source = pq.ParquetFile(pa.BufferReader(f.readall()))
                for batch in source.iter_batches(batch_size=READ_CHUNK_ROWS):
                    yield _tag(pa.Table.from_batches([batch]), name, start)
                    start += batch.num_rows
            else:  # hf: Arrow IPC stream files written by datasets' save_to_disk
                reader = pa.ipc.open_stream(f)
                start = 0
                for batch in reader:
                    yield _tag(pa.Table.from_batches([batch]), name, start)
                    start += batch.num_rows

    return TracesDatasource(files)


def read_rows(path: str, fmt: str = "auto"):
    """A Ray Dataset of the raw rows of a JSONL / Parquet / HF folder (``_source``,
    ``_index`` and the row's fields; a JSONL line as ``_raw`` bytes)."""
    import ray

    fmt, files = resolve_source(path, fmt)
    return ray.data.read_datasource(_datasource(fmt, files))


def read_traces(dcfg, parts_dir: str | None = None):
    """The trace rows; with ``data.teacher_logprobs_path``, joined to their teacher
    log-probs by ``data.join_key`` (``raydc.prepare.join``; ``parts_dir`` takes its counts)."""
    ds = read_rows(dcfg.path, dcfg.format)
    if dcfg.limit:
        ds = ds.limit(dcfg.limit)
    if dcfg.teacher_logprobs_path:
        from raydc.prepare.join import join_teacher_logprobs

        ds = join_teacher_logprobs(ds, dcfg, str(parts_dir), read_rows)
    return ds


# ----------------------------------------------------------------------------- the map


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from raydc.infra.models import load_tokenizer

    tok = load_tokenizer(path)
    return tok, special_ids(tok)


def _decode_raw(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowReject(
            "line", "undecodable", f"not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowReject("line", "invalid_json", str(e)) from None
    if not isinstance(row, dict):
        raise RowReject("line", "invalid_json", f"a JSON {type(row).__name__}, not an object")
    return row


def prepare_batch(batch: pa.Table, tokenizer: str, dcfg: DataConfig, parts_dir: str) -> pa.Table:
    """Raw rows -> prepared rows (PREPARED_SCHEMA); rejects and counts go to parts_dir."""
    tok, specials = _tokenizer(tokenizer)
    teacher_tok = _tokenizer(dcfg.teacher_tokenizer) if dcfg.teacher_tokenizer else None
    good: list[dict] = []
    rejects: list[dict] = []
    stats = {
        "rows_in": 0,
        "rows_out": 0,
        "rows_rejected": 0,
        "truncated": 0,
        "tokens": 0,
        "loss_tokens": 0,
        "given_teacher_rows": 0,
        "rows_read": batch.num_rows,  # source rows, or joined rows after a join
        # given teacher log-probs of the kept rows that are missing, by why (parse.py)
        "teacher_logprobs_missing": dict.fromkeys(MISSING_KINDS, 0),
        # rows whose teacher log-probs came with the teacher's text: how it met the response
        "teacher_coverage": dict.fromkeys(COVERAGE_COUNTS, 0),
        "teacher_coverage_permille": {},  # floor(coverage * 1000) -> rows
    }
    default_ids = []
    for row in table_rows(batch):
        default_id = f"{row.pop('_source')}:{row.pop('_index')}"
        default_ids.append(default_id)
        try:
            if "_raw" in row:
                joined = {k: row.pop(k) for k in JOINED_COLUMNS if k in row}
                row = {**_decode_raw(row.pop("_raw")), **joined}
            if JOIN in row:
                row = merge_joined(row, dcfg)
                stats["joined_rows"] = stats.get("joined_rows", 0) + 1
            cands = parse_row(row, dcfg, default_id)
        except RowReject as e:
            rid = default_id
            if isinstance(row, dict) and "_raw" not in row:
                try:
                    rid = row_id_of(row, dcfg.id_key) or default_id
                except RowReject:
                    pass  # an undecodable id: the position names the row
            rejects.append({"row_id": rid, "field": e.field, "reason": e.reason})
            stats["rows_in"] += 1
            continue
        for cand in cands:
            stats["rows_in"] += 1
            try:
                if teacher_tok is not None:
                    cand = teacher_ids_to_offsets(cand, *teacher_tok)
                prep = prepare_candidate(tok, cand, dcfg, specials)
            except RowReject as e:
                rejects.append({"row_id": cand.row_id, "field": e.field, "reason": e.reason})
                if isinstance(e, TeacherCoverageReject):
                    _count_coverage(stats, e.coverage, "rejected")
                continue
            good.append(prep.to_row())
            stats["truncated"] += int(prep.truncated)
            stats["tokens"] += len(prep.input_ids)
            stats["loss_tokens"] += int(sum(prep.loss_mask))
            stats["given_teacher_rows"] += int(prep.teacher_logprobs is not None)
            for kind, n in (cand.teacher or {}).get("missing", {}).items():
                stats["teacher_logprobs_missing"][kind] += n
            match = prep.teacher_match
            if match is not None:
                _count_coverage(stats, match.coverage, "exact" if match.exact else "partial")
                stats["teacher_coverage"]["outside_logprob"] += match.outside_logprob
                stats["teacher_coverage"]["outside_tokens"] += match.outside_tokens
    stats["rows_out"], stats["rows_rejected"] = len(good), len(rejects)
    write_parts(parts_dir, batch_key(default_ids), "prepare", rejects, stats)
    return pa.Table.from_pylist(good, schema=PREPARED_SCHEMA)


COVERAGE_COUNTS = (
    "rows",
    "exact",
    "partial",
    "rejected",
    "sum",
    "outside_logprob",
    "outside_tokens",
)


def _count_coverage(stats: dict, coverage: float, kind: str) -> None:
    counts, hist = stats["teacher_coverage"], stats["teacher_coverage_permille"]
    counts["rows"] += 1
    counts[kind] += 1
    counts["sum"] += coverage
    key = str(min(1000, math.floor(coverage * 1000 + 1e-9)))
    hist[key] = hist.get(key, 0) + 1


def coverage_summary(totals: dict) -> dict:
    """The summary's ``teacher_coverage``: over the rows whose teacher log-probs came with
    the teacher's text (token strings, bytes or ids; rejected ones included), how many
    spelt the response (``exact``), were aligned on the text both share (``partial``: kept)
    or covered too little (``rejected``); the share of response characters matched (min,
    p10, median: nearest rank, floored to 0.001; mean), and the teacher log-probs the kept
    partial rows could not place (their sum and count: text the response lacks)."""
    counts = totals.get("teacher_coverage", {})
    hist = sorted((int(k), n) for k, n in totals.get("teacher_coverage_permille", {}).items())
    rows = int(counts.get("rows", 0))

    def quantile(q: float) -> float | None:
        need, seen = max(1, math.ceil(q * rows)), 0
        for bin_, n in hist:
            seen += n
            if seen >= need:
                return bin_ / 1000
        return None

    return {
        "rows": rows,
        "exact": int(counts.get("exact", 0)),
        "partial": int(counts.get("partial", 0)),
        "rejected": int(counts.get("rejected", 0)),
        "min": quantile(0.0),
        "p10": quantile(0.1),
        "median": quantile(0.5),
        "mean": round(counts.get("sum", 0.0) / rows, 6) if rows else None,
        "outside_logprob": float(counts.get("outside_logprob", 0.0)),
        "outside_tokens": int(counts.get("outside_tokens", 0)),
    }


# ----------------------------------------------------------------------------- the stage


def _join_counts(dcfg, totals: dict) -> dict:
    """What the join of ``data.teacher_logprobs_path`` matched; refuses a log-prob file
    whose repeated keys duplicated trace rows."""
    if not dcfg.teacher_logprobs_path:
        return {}
    source, joined = int(totals.get("source_rows", 0)), int(totals.get("rows_read", 0))
    if joined != source:
        raise PrepareError(
            f"data.teacher_logprobs_path={dcfg.teacher_logprobs_path!r}: the join on "
            f"{dcfg.join_key!r} returned {joined} rows for {source} trace rows; a key appears "
            f"in more than one log-prob row ({teacher_key(dcfg)!r})"
        )
    rows, bad = (
        int(totals.get("teacher_logprob_rows", 0)),
        int(totals.get("teacher_logprob_rows_bad", 0)),
    )
    return {
        "teacher_logprobs_join": {
            "path": dcfg.teacher_logprobs_path,
            "key": dcfg.join_key,
            "teacher_key": teacher_key(dcfg),
            "logprob_rows": rows,
            "logprob_rows_bad": bad,  # not a JSON object, or no key: not joinable
            "matched_rows": int(totals.get("joined_rows", 0)),
        }
    }


def run_prepare(cfg, out_dir: str | os.PathLike) -> dict:
    """Read ``cfg.data.path``, write prepared Parquet, ``rejects.parquet`` and
    ``summary.json`` to ``out_dir``; return the summary (rows_in == rows_out +
    rows_rejected). The tokenizer is ``cfg.data.tokenizer`` or the student's."""
    t0 = time.time()
    dcfg = cfg.data
    tokenizer = roles(cfg).tokenizer
    if not tokenizer:
        raise PrepareError("no tokenizer: set data.tokenizer or score.student")
    from raydc.infra.models import tokenizer_path

    tokenizer = tokenizer_path(tokenizer)
    connect_ray(cfg.run.ray_address)
    out = prepare_out_dir(out_dir)
    ds = read_traces(dcfg, str(out / PARTS_DIR)).map_batches(
        prepare_batch,
        batch_format="pyarrow",
        batch_size=256,
        fn_kwargs=dict(tokenizer=tokenizer, dcfg=dcfg, parts_dir=str(out / PARTS_DIR)),
    )
    ds.write_parquet(str(out))
    head, totals = summarize_parts(out, "prepare", error=PrepareError)
    summary = {
        **head,
        "truncated": int(totals.get("truncated", 0)),
        "tokens": int(totals.get("tokens", 0)),
        "loss_tokens": int(totals.get("loss_tokens", 0)),
        "given_teacher_rows": int(totals.get("given_teacher_rows", 0)),
        "teacher_logprobs_missing": {
            k: int(totals.get("teacher_logprobs_missing", {}).get(k, 0)) for k in MISSING_KINDS
        },
        "teacher_coverage": coverage_summary(totals),
        **_join_counts(dcfg, totals),
        "source": str(dcfg.path),
        "tokenizer": tokenizer,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "config": dataclasses.asdict(dcfg),
        "paths": {"data": str(out), "rejects": str(out / REJECTS_FILE)},
        "seconds": round(time.time() - t0, 3),
    }
    write_json(out / "summary.json", summary)
    check_reject_share(
        "prepare", summary, dcfg.max_reject_share, out / REJECTS_FILE, error=PrepareError
    )
    if summary["rows_out"] == 0:  # rows that came in were all rejected: raised above
        raise PrepareError(
            f"prepare kept no rows: {summary['rows_in']} in, {summary['rows_rejected']} "
            f"rejected; data.path={dcfg.path!r} holds no trace rows (see "
            f"{out / 'summary.json'} and {out / REJECTS_FILE}): nothing to score or train on"
        )
    check_unique_ids(out, dcfg)
    return summary


def check_unique_ids(out: Path, dcfg) -> None:
    """Refuse prepared rows whose ids repeat: the scored store, the selection and the
    training data address rows by id, so a repeat would make select refuse the store after
    a whole scoring pass, or train on both rows silently. A stage failure, not a reject of
    the later rows: the rows stream through many workers with no order between them, so
    no worker can tell which one came first; and a repeated id means ``data.id_key`` is
    not an id column or the file holds rows twice, which the user fixes, not raydc.
    Reads only the ``row_id`` column, as 64-bit hashes (exact: a repeated hash is
    checked on the ids themselves)."""
    import numpy as np
    import pyarrow.parquet as pq

    from raydc.infra.artifacts import data_files

    def ids(f):
        return pq.read_table(f, columns=["row_id"]).column(0).to_pylist()

    files = data_files(out)
    hashes = np.concatenate(
        [np.fromiter((hash(i) for i in ids(f)), np.int64) for f in files] or [np.zeros(0, np.int64)]
    )
    values, counts = np.unique(hashes, return_counts=True)
    suspects = set(values[counts > 1].tolist())
    if not suspects:
        return
    seen: dict[str, int] = {}
    for f in files:
        for i in ids(f):
            if hash(i) in suspects:
                seen[i] = seen.get(i, 0) + 1
    repeated = {i: n for i, n in seen.items() if n > 1}
    if not repeated:
        return
    first = min(repeated)
    more = (
        f" ({len(repeated)} ids repeat, e.g. {sorted(repeated)[:5]})" if len(repeated) > 1 else ""
    )
    raise PrepareError(
        f"prepare: row id {first!r} appears {repeated[first]} times{more}: row ids must be "
        f"unique (the scored store, the selection and training address rows by id). "
        f"data.id_key={dcfg.id_key!r}: make it a column of unique ids, or remove the repeated "
        "rows from data.path"
    )


# ----------------------------------------------------------------------------- the stage


def _needs(cfg) -> tuple[str, ...]:
    """The traces prepare reads: the mixed-policy or generated ones when that stage is on."""
    if cfg.mixed_policy.enabled:
        return ("mixed_policy",)
    return ("generate",) if cfg.generate.enabled else ()


def _traces(cfg, up) -> tuple[RaydcConfig, str]:
    """The config prepare runs with (``data.path``: the traces it reads) and those
    traces' fingerprint."""
    if up:
        (made,) = up.values()
        path, fp = str(made.out_dir / "traces.parquet"), made.fingerprint
    else:
        path, fp = cfg.data.path, fingerprint_paths(cfg.data.path)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path)), fp


def _reads(cfg, up) -> dict:
    cfg, data_files = _traces(cfg, up)
    parts = {
        "data": dataclasses.asdict(cfg.data),
        "data_files": data_files,
        "tokenizer": tokenizer_fingerprint(roles(cfg).tokenizer),
    }
    if cfg.data.teacher_tokenizer:
        parts["teacher_tokenizer"] = tokenizer_fingerprint(cfg.data.teacher_tokenizer)
    if cfg.data.teacher_logprobs_path:
        parts["teacher_logprobs"] = fingerprint_paths(cfg.data.teacher_logprobs_path)
    return parts


def _check(cfg) -> None:
    dcfg = cfg.data
    if not (cfg.generate.enabled or cfg.mixed_policy.enabled):
        check_input("data.path", dcfg.path)
    check_input("data.teacher_logprobs_path", dcfg.teacher_logprobs_path)
    check_model("score.student", cfg.score.student)
    check_model("data.tokenizer", dcfg.tokenizer, tokenizer_only=True)
    check_model("data.teacher_tokenizer", dcfg.teacher_tokenizer, tokenizer_only=True)


PREPARE = Stage(
    "prepare",
    help="read and tokenize the traces (rejects with reasons)",
    needs=_needs,
    check=_check,
    reads=_reads,
    run=lambda cfg, up, out: run_prepare(_traces(cfg, up)[0], out),
)
