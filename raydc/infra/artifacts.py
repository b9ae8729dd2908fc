"""The stage-folder contract: what every stage writes beside its data, and how.

A stage folder holds data shards (``*.parquet``), ``rejects.parquet`` (one row per
rejected input row: row_id, stage, field, reason), a ``summary.json`` or ``manifest.json``,
and while it runs ``_parts/`` (each batch's rejects and counts, merged at the end, so a
retried batch overwrites its own part instead of counting twice). ``OWNED`` marks a folder
raydc created and may clear. When a stage finishes, the stage runner (``raydc.pipeline``)
writes its marker (``MARKER``): the fingerprint of its inputs, its summary and a record of
its outputs (each file's size, digest and, for Parquet, row count), and appends a line to
the run's history (``HISTORY``). One job at a time owns an output folder (``LOCK``).

One hashing rule lives here too (``file_digest``): a file's whole content up to
``HASH_WHOLE_LIMIT``, beyond it its size, header and sampled blocks, so a 15 GB checkpoint
is never read whole. Stage fingerprints, model and tokenizer identities, score inputs and
output records all use it. The Arrow schemas of the data itself are in ``raydc.infra.schemas``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydc.infra.schemas import INSPECT_DIR, SELECTION_FILE

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
MARKER = "_raydc_stage.json"  # in a stage folder: the stage finished
HISTORY = "stages.jsonl"  # in the run folder: one line per stage that ran
LOCK = ".raydc.lock"  # in the run folder: the job that owns it


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


def summarize_parts(out: Path, stage: str, error: type[Exception]) -> tuple[dict, dict]:
    """Merge a stage's parts (``collect_parts``) into the head every stage summary starts
    with (stage, rows_in, rows_out, rows_rejected, reasons), and return it with the summed
    per-batch counts. Raises ``error`` when rows_in != rows_out + rows_rejected."""
    totals, rejects = collect_parts(out, stage)
    rows_out = count_rows(data_files(out))
    head = {
        "stage": stage,
        "rows_in": int(totals.get("rows_in", 0)),
        "rows_out": rows_out,
        "rows_rejected": rejects.num_rows,
        "reasons": reason_counts(rejects),
    }
    if head["rows_in"] != rows_out + rejects.num_rows:
        raise error(
            f"{stage} lost rows: {head['rows_in']} in != {rows_out} out + "
            f"{rejects.num_rows} rejected (a bug; please report)"
        )
    return head, totals


def write_json(path: str | os.PathLike, obj: dict) -> None:
    tmp = f"{path}.tmp"
    write_private(tmp, json.dumps(obj, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


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


# ----------------------------------------------------------------------------- rejects


class RowReject(Exception):
    """A row that cannot be used; ``field`` names the offending input key, ``code`` is a
    stable reason code (``missing_key``, ``wrong_type``...), ``detail`` says more."""

    def __init__(self, field: str, code: str, detail: str = ""):
        self.field, self.code, self.detail = field, code, detail
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


# ----------------------------------------------------------------------------- finished stages


class StageError(RuntimeError):
    """A stage failed; the message names the stage and where its partial output is."""


# ----------------------------------------------------------------------------- no links

# The files raydc writes into a run folder it does not own the whole of (the lock, the
# history, the pending markers, the log) are opened without following a symbolic link in
# their place: a link planted as <output_dir>/.raydc.lock used to have its target truncated
# and overwritten, by any job pointed at that folder.


class LinkRefused(StageError, OSError):
    """A file raydc writes is a symbolic link: refused, the link's target left untouched.
    A StageError (the command's one-line error) and an OSError (a write that failed)."""


def _refuse_link(path: str | os.PathLike) -> LinkRefused:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return LinkRefused(
        f"{path} is a symbolic link{target}: raydc writes this file itself and does not "
        f"follow a link there (it would overwrite the link's target); remove the link"
    )


def open_private(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags)`` that refuses a symbolic link at ``path`` (LinkRefused)
    instead of following it: ``O_NOFOLLOW`` where the OS has it, else a check first."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    if not nofollow and os.path.islink(path):
        raise _refuse_link(path)
    try:
        return os.open(path, flags | nofollow | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        # Linux and macOS say ELOOP for a link under O_NOFOLLOW, FreeBSD EMLINK.
        if e.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(path):
            raise _refuse_link(path) from None
        raise


def write_private(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as the whole of ``path``, refusing to follow a symbolic link there
    (LinkRefused names the path; the link's target is not touched)."""
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def append_private(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path``, refusing to follow a symbolic link there."""
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(text)


@dataclass
class StageResult:
    name: str
    out_dir: Path
    fingerprint: str
    summary: dict
    skipped: bool


def read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_marker(out_dir: Path, record: dict) -> None:
    """Write the marker whole or not at all (a full disk must not leave one that says done)."""
    tmp = out_dir / (MARKER + ".tmp")
    write_private(tmp, json.dumps(record, indent=2, default=str))
    tmp.replace(out_dir / MARKER)


def append_history(root: Path, record: dict) -> None:
    """One line of ``root/HISTORY`` for a stage that ran (never through a symbolic link)."""
    line = {k: record[k] for k in ("stage", "fingerprint", "seconds", "finished")}
    append_private(root / HISTORY, json.dumps(line) + "\n")


def output_record(out: Path, paths: list[Path] | None = None) -> dict[str, dict]:
    """What a marker vouches for: rel path -> size, digest, rows (Parquet), for every file
    under ``paths`` (default: the whole stage folder), bookkeeping files left out."""
    record: dict[str, dict] = {}
    for root in [out] if paths is None else paths:
        files = [root] if root.is_file() else sorted(x for x in root.rglob("*") if x.is_file())
        for f in files:
            rel = f.relative_to(out).as_posix()
            if f.name in (MARKER, MARKER + ".tmp", OWNED) or rel.startswith("."):
                continue
            entry = {"bytes": f.stat().st_size, "digest": file_digest(f)}
            if f.suffix == ".parquet":
                entry["rows"] = _parquet_rows(f)
            record[rel] = entry
    return record


def _parquet_rows(path: Path) -> int | None:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # truncated or not Parquet: no count, the check below reports it
        return None


def changed_outputs(out: Path, record: dict[str, dict]) -> list[str]:
    """The recorded outputs that are missing or differ now (empty: all vouched for)."""
    bad = []
    for rel, want in record.items():
        f = out / rel
        if not f.is_file():
            bad.append(f"{rel} is missing")
        elif f.stat().st_size != want["bytes"] or file_digest(f) != want["digest"]:
            bad.append(f"{rel} changed ({f.stat().st_size:,} bytes, recorded {want['bytes']:,})")
        elif "rows" in want and _parquet_rows(f) != want["rows"]:
            bad.append(f"{rel} holds {_parquet_rows(f)} rows, recorded {want['rows']}")
    return bad


# ----------------------------------------------------------------------------- the lock


class OutputDirBusy(StageError):
    """Another live process holds the output folder's lock."""


# Output folder -> the open lock file of this process. A process takes a folder's lock
# once and keeps it until it exits (or ``release_output_dir``): pipelines built one after
# another in one process (tests, notebooks) share it; another process is refused.
_LOCKS: dict[str, Any] = {}


def lock_output_dir(root: Path) -> None:
    """Take ``<root>/.raydc.lock`` for this process or raise OutputDirBusy naming the
    holder. ``fcntl.flock`` is dropped by the kernel when its process dies, so a SIGKILLed
    job never leaves a stale lock (on NFS, flock is only as good as the mount's locking).
    A symbolic link in the lock's place is refused (LinkRefused), its target untouched."""
    import fcntl
    import socket

    key = str(root)
    if key in _LOCKS:
        return
    fh = os.fdopen(open_private(root / LOCK, os.O_RDWR | os.O_CREAT), "r+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise OutputDirBusy(
            f"run.output_dir={root} is in use by another raydc job ({holder}); wait for it "
            f"or give this job another run.output_dir"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}")
    fh.flush()
    _LOCKS[key] = fh


def release_output_dir(root: Path) -> None:
    fh = _LOCKS.pop(str(root), None)
    if fh is not None:
        fh.close()


# ----------------------------------------------------------------------------- one hashing rule

# Files up to HASH_WHOLE_LIMIT are hashed whole. A bigger one is hashed by its name, size,
# header (safetensors: the JSON of tensor names, dtypes, shapes and offsets) and sampled
# blocks of its data (the first and last MiB and 8 blocks between them): 10 MiB read
# whatever the size, so a 15 GB student costs what a small file does. Training changes
# every tensor, so two checkpoints of one architecture differ in every sampled block; an
# edit of a big data file that keeps its size and misses every block goes unseen.
HASH_WHOLE_LIMIT = 64 << 20
SAMPLE_BLOCK = 1 << 20
SAMPLE_INNER = 8


def _safetensors_header(fh) -> bytes:
    head = fh.read(8)
    if len(head) < 8:
        return head
    n = int.from_bytes(head, "little")
    return head + fh.read(min(n, 100 << 20))


def file_digest(path: str | os.PathLike) -> str:
    """A short digest of one file: its whole content up to HASH_WHOLE_LIMIT, else its
    size, header and sampled blocks."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(f"{p.name}:{size}".encode())
    with open(p, "rb") as fh:
        if size <= HASH_WHOLE_LIMIT:
            for block in iter(lambda: fh.read(SAMPLE_BLOCK), b""):
                h.update(block)
            return h.hexdigest()[:16]
        if p.suffix == ".safetensors":
            h.update(_safetensors_header(fh))
        step = (size - SAMPLE_BLOCK) / (SAMPLE_INNER + 1)
        for k in range(SAMPLE_INNER + 2):
            fh.seek(int(k * step) if k <= SAMPLE_INNER else size - SAMPLE_BLOCK)
            h.update(fh.read(SAMPLE_BLOCK))
    return h.hexdigest()[:16]


def fingerprint_paths(
    *paths: str | os.PathLike | None, names: tuple[str, ...] | None = None
) -> str | None:
    """One short hash of files and folders (a model, a tokenizer, data files): each file's
    path (in its folder) and ``file_digest``. Folders are walked recursively, hidden files
    and stage markers left out; ``names`` keeps only the files of those names. A path with
    nothing here to hash (a hub name) hashes its name; no path at all gives None."""
    given = [p for p in paths if p]
    if not given:
        return None
    h = hashlib.sha256()
    for path in given:
        p = Path(path)
        files = [(p.name, p)] if p.is_file() else _folder_files(p, names) if p.is_dir() else []
        if not files:
            h.update(f"name:{path}".encode())
        for rel, f in files:
            h.update(f"{rel}:{file_digest(f)}".encode())
    return h.hexdigest()[:16]


def _folder_files(folder: Path, names: tuple[str, ...] | None) -> list[tuple[str, Path]]:
    out = []
    for f in sorted(x for x in folder.rglob("*") if x.is_file()):
        rel = f.relative_to(folder).as_posix()
        if names is not None and f.name not in names:
            continue
        if rel.startswith(".") or "/." in rel or f.name == MARKER:
            continue
        out.append((rel, f))
    return out


def tokenizer_fingerprint(path: str | os.PathLike | None) -> str | None:
    """The identity of a folder's tokenizer files only (vocab, merges, config, chat
    template), so prepared data can be matched to a student whose weights differ but
    tokenizer does not."""
    return fingerprint_paths(path, names=TOKENIZER_FILES)


def fingerprint_parts(parts: dict) -> str:
    """A short hash of a dict of inputs (config sections, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
