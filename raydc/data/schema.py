"""The Parquet schemas of prepared and scored rows (docs/contracts.md) and the small file
helpers every stage shares: listing a stage's data shards, collecting rejects and counts
that streaming workers write beside the data, and a stage's summary.

Workers write their rejects and per-batch counts to ``out_dir/_parts/`` under a name derived
from the batch's row ids, so a retried batch overwrites its own file instead of counting
twice; the driver merges them into ``rejects.parquet`` at the end and checks
rows_in == rows_out + rows_rejected. The driver never holds the data itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REJECTS_FILE = "rejects.parquet"
PARTS_DIR = "_parts"
# Files a stage owns in its output folder; anything else there is not ours to delete.
STAGE_FILES = ("summary.json", "manifest.json", REJECTS_FILE, "selection.parquet")

PREPARED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("prompt_id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.bool_())),
        ("sentence_ids", pa.list_(pa.int32())),
        # Given teacher log-probs on student positions (0.0 off the loss mask, NaN where
        # the teacher's tokens say nothing); null when the row has none.
        ("teacher_logprobs", pa.list_(pa.float32())),
        ("num_tokens", pa.int32()),
        ("num_loss_tokens", pa.int32()),
        # Beyond the contract's columns: what a teacher with another tokenizer needs.
        ("text", pa.string()),  # the rendered conversation (student chat template)
        ("offsets", pa.list_(pa.int32())),  # [2T] interleaved (start, end) in `text`
        ("response_spans", pa.list_(pa.int32())),  # [2K] assistant content spans in `text`
        ("conversation", pa.string()),  # the messages as JSON
    ]
)

# The scored store (format 2): only what training and selection read. Log-probs are
# float16 by default (score.logprobs; Parquet FLOAT16, byte-stream-split, zstd): ~2 B a token
# each at most, round-to-nearest error <= 2**-11 of the value (docs/contracts.md). What only
# a human inspects (text, offsets, spans, conversation, weights) goes to the side table
# ``inspect/`` when score.inspection is on; training never reads it.
STORE_FORMAT = 2
SCORED_COLUMNS = (
    "row_id",
    "prompt_id",
    "input_ids",
    "loss_mask",
    "sentence_ids",
    "teacher_logprobs",
    "num_tokens",
    "num_loss_tokens",
    "student_logprobs",
)
LOGPROB_COLUMNS = ("student_logprobs", "teacher_logprobs")
LOGPROB_TYPES = {"float16": pa.float16(), "float32": pa.float32()}
INSPECT_DIR = "inspect"
INSPECT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("text", pa.string()),
        ("offsets", pa.list_(pa.int32())),
        ("response_spans", pa.list_(pa.int32())),
        ("conversation", pa.string()),
        ("weights", pa.list_(pa.float32())),  # the configured weights, from fp32 log-probs
    ]
)


def scored_schema(logprobs: str = "float16") -> pa.Schema:
    """The scored store's schema with log-probs as ``logprobs`` (float16 | float32)."""
    fields = {f.name: f for f in PREPARED_SCHEMA}
    lp = pa.list_(LOGPROB_TYPES[logprobs])
    fields["student_logprobs"] = pa.field("student_logprobs", lp)
    fields["teacher_logprobs"] = pa.field("teacher_logprobs", lp)
    return pa.schema([fields[n] for n in SCORED_COLUMNS])


SCORED_SCHEMA = scored_schema("float16")

# Parquet writer settings of the scored store: zstd; dictionaries only on the id strings
# (on token ids and floats they cost more than they save); float columns byte-stream-split.
SCORED_WRITE_ARGS = {
    "compression": "zstd",
    "use_dictionary": ["row_id", "prompt_id"],
    "use_byte_stream_split": [f"{c}.list.element" for c in LOGPROB_COLUMNS],
}

# What the select stage writes instead of a second copy of the rows: the kept row ids (with
# their prompt and score, for people); training reads the scored store through it.
SELECTION_FILE = "selection.parquet"
SELECTION_SCHEMA = pa.schema(
    [("row_id", pa.string()), ("prompt_id", pa.string()), ("score", pa.float64())]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("stage", pa.string()),
        ("field", pa.string()),
        ("reason", pa.string()),
    ]
)


def data_files(folder: str | os.PathLike) -> list[str]:
    """The data shards of a stage's output folder (every ``*.parquet`` but the rejects and
    a selection's row-id list)."""
    p = Path(folder)
    return sorted(
        str(f) for f in p.glob("*.parquet") if f.name not in (REJECTS_FILE, SELECTION_FILE)
    )


# Written by the stage runner (raydc.pipeline) into every stage folder it creates: the
# folder is raydc's to clear.
OWNED = ".raydc_stage_dir"


def count_rows(files: Iterable[str]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def column_bytes(files: Iterable[str]) -> dict[str, int]:
    """Bytes on disk per top-level column (compressed column chunks, from the footers)."""
    out: dict[str, int] = {}
    for f in files:
        md = pq.ParquetFile(f).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """Make ``out_dir`` ready for a stage: create it, or clear a previous run's outputs.

    A non-empty folder that holds no stage summary/manifest is refused: it is not ours.
    """
    out = Path(out_dir)
    if out.exists() and any(p.name != OWNED for p in out.iterdir()):
        ours = (out / OWNED).exists() or (out / PARTS_DIR).exists()
        if not ours and not any((out / f).exists() for f in STAGE_FILES):
            raise FileExistsError(
                f"{out} is not empty and holds no previous raydc stage output; "
                "choose an empty or new folder"
            )
        for f in data_files(out):
            os.remove(f)
        for name in STAGE_FILES:
            if (out / name).exists():
                os.remove(out / name)
        shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
        shutil.rmtree(out / INSPECT_DIR, ignore_errors=True)
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    return out


def batch_key(ids: Iterable[str]) -> str:
    h = hashlib.sha1()
    for i in ids:
        h.update(str(i).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:20]


def write_parts(parts_dir: str, key: str, stage: str, rejects: list[dict], stats: dict) -> None:
    """A batch's rejects and counts, beside the data (idempotent under retries)."""
    if rejects:
        table = pa.Table.from_pylist(
            [{"stage": stage, **r} for r in rejects], schema=REJECTS_SCHEMA
        )
        pq.write_table(table, os.path.join(parts_dir, f"rejects-{stage}-{key}.parquet"))
    tmp = os.path.join(parts_dir, f".stats-{stage}-{key}.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(stats, fh)
    os.replace(tmp, os.path.join(parts_dir, f"stats-{stage}-{key}.json"))


def collect_parts(
    out: Path, stage: str, extra_rejects: pa.Table | None = None
) -> tuple[dict, pa.Table]:
    """Sum the per-batch counts and merge the rejects into ``out/rejects.parquet``."""
    parts = out / PARTS_DIR
    totals: dict = {}
    for f in sorted(parts.glob(f"stats-{stage}-*.json")):
        for k, v in json.loads(f.read_text()).items():
            if isinstance(v, dict):
                sub = totals.setdefault(k, {})
                for kk, vv in v.items():
                    sub[kk] = sub.get(kk, 0) + vv
            else:
                totals[k] = totals.get(k, 0) + v
    tables = [pq.read_table(f) for f in sorted(parts.glob(f"rejects-{stage}-*.parquet"))]
    if extra_rejects is not None:
        tables.insert(0, extra_rejects)
    rejects = (
        pa.concat_tables([t.cast(REJECTS_SCHEMA) for t in tables])
        if tables
        else REJECTS_SCHEMA.empty_table()
    )
    pq.write_table(rejects, out / REJECTS_FILE)
    shutil.rmtree(parts, ignore_errors=True)
    return totals, rejects


def reason_counts(rejects: pa.Table) -> dict:
    counts: dict = {}
    for r in rejects.column("reason").to_pylist():
        code = r.split(":", 1)[0]
        counts[code] = counts.get(code, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def write_json(path: str | os.PathLike, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
    os.replace(tmp, path)


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """A hash of a folder's tokenizer files only (vocab, merges, config, chat template), so
    prepared data can be matched to a student whose weights differ but tokenizer does not."""
    p = Path(path)
    names = (
        sorted(
            f.name
            for f in p.iterdir()
            if f.name
            in (
                "tokenizer.json",
                "tokenizer_config.json",
                "vocab.json",
                "merges.txt",
                "special_tokens_map.json",
                "chat_template.jinja",
                "chat_template.json",
                "tokenizer.model",
                "added_tokens.json",
                "vocab.txt",
            )
        )
        if p.is_dir()
        else []
    )
    h = hashlib.sha256()
    if not names:
        h.update(str(path).encode())
    for name in names:
        h.update(name.encode())
        h.update((p / name).read_bytes())
    return h.hexdigest()[:16]
