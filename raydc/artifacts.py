"""The stage-folder contract: what every stage writes beside its data, and how.

A stage folder holds data shards (``*.parquet``), ``rejects.parquet`` (one row per
rejected input row: row_id, stage, field, reason), a ``summary.json`` or ``manifest.json``,
and while it runs ``_parts/`` (each batch's rejects and counts, merged at the end, so a
retried batch overwrites its own part instead of counting twice). ``OWNED`` marks a folder
raydc created and may clear. One hashing rule for tokenizers lives here too. The Arrow
schemas of the data itself are in ``raydc.data.schema``.
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

from raydc.data.schema import INSPECT_DIR, SELECTION_FILE

# The files that make a tokenizer (what a tokenizer fingerprint hashes, what an export copies).
TOKENIZER_FILES = (
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


REJECTS_FILE = "rejects.parquet"


PARTS_DIR = "_parts"


# Files a stage owns in its output folder; anything else there is not ours to delete.
STAGE_FILES = ("summary.json", "manifest.json", REJECTS_FILE, "selection.parquet")


# Written by the stage runner (raydc.pipeline) into every stage folder it creates: the
# folder is raydc's to clear.
OWNED = ".raydc_stage_dir"


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


def count_rows(files: Iterable[str]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


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
    names = sorted(f.name for f in p.iterdir() if f.name in TOKENIZER_FILES) if p.is_dir() else []
    h = hashlib.sha256()
    if not names:
        h.update(str(path).encode())
    for name in names:
        h.update(name.encode())
        h.update((p / name).read_bytes())
    return h.hexdigest()[:16]


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


def check_reject_share(
    stage: str, summary: dict, max_share: float, rejects_path: Path, error: type[Exception]
) -> None:
    """Raise ``error`` (the stage's own) when more than ``max_share`` of the rows, or all of
    them, were rejected; the message gives the share, the reasons and the rejects file."""
    n_in, n_rej = summary["rows_in"], summary["rows_rejected"]
    if n_in and n_rej / n_in > max_share:
        raise error(
            f"{stage}: {n_rej} of {n_in} rows rejected ({n_rej / n_in:.1%}) > "
            f"data.max_reject_share={max_share:.1%}; reasons {summary.get('reasons')}; "
            f"see {rejects_path}"
        )
    if n_in and n_rej == n_in:
        raise error(
            f"{stage}: every row was rejected; reasons {summary.get('reasons')}; see {rejects_path}"
        )
