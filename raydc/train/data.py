"""The scored store training reads: its files, manifest, format and student checks.

``open_store`` opens a score stage's folder, or a select stage's (its kept row ids over the
scored store it names); ``check_student`` refuses scores made by another student, and
``is_val_key`` holds out a deterministic share of prompts. The rows themselves, their
packing and the typed micro-batches are in ``raydc.train.batch``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# Columns of the scored schema (docs/contracts.md) that training reads.
REQUIRED_COLUMNS = ("row_id", "input_ids", "loss_mask", "student_logprobs")
# teacher_mask: False where the teacher has no value (its weight is neutral, exactly 1)
OPTIONAL_COLUMNS = (
    "prompt_id",
    "sentence_ids",
    "teacher_logprobs",
    "teacher_mask",
    "student_entropy",  # an entropy gate under student_ref=init reads it
)
INDEX_COLUMN = "num_tokens"  # per-row length: lets ranks plan without reading the rows


class ScoredDataError(ValueError):
    """The scored input is missing, malformed, or was scored with another student."""


# ----------------------------------------------------------------------------- the folder


def scored_files(scored_dir: str | Path) -> list[str]:
    """The scored Parquet parts of a scoring output folder, sorted (rejects excluded)."""
    from raydc.infra.artifacts import data_files

    d = Path(scored_dir)
    if not d.is_dir():
        raise ScoredDataError(f"scored_dir {str(d)!r} is not a folder")
    files = data_files(d)
    if not files:
        raise ScoredDataError(f"scored_dir {str(d)!r} holds no scored *.parquet files")
    return files


@dataclass(frozen=True)
class StoreManifest:
    """What training reads of a score (or select) stage's ``manifest.json``: which student
    made the scores, the store's format, the row count and, for a selection, its source."""

    file: Path
    student_path: str | None
    student_fingerprint: str | None
    format: int  # 1: written before the store had a format (float32, text in the rows)
    rows: int | None
    selection_source: str | None = None  # the scored folder, relative to the select folder
    selection_files: dict[str, int] | None = None  # its files' sizes at selection time

    @classmethod
    def parse(cls, data: dict, file: str | Path) -> StoreManifest:
        student = data.get("student") or {}
        sel = data.get("selection")
        return cls(
            file=Path(file),
            student_path=student.get("path"),
            student_fingerprint=student.get("fingerprint"),
            format=int((data.get("store") or {}).get("format", 1)),
            rows=(data.get("counts") or {}).get("rows_out"),
            selection_source=sel.get("source") if isinstance(sel, dict) else None,
            selection_files=sel.get("source_files") if isinstance(sel, dict) else None,
        )

    @property
    def is_selection(self) -> bool:
        return self.selection_files is not None or self.selection_source is not None


@dataclass(frozen=True)
class ScoredStore:
    """What training reads: the scored files, their manifest, and the row ids a selection
    kept (None: every row)."""

    folder: Path
    files: list[str]
    manifest: StoreManifest
    keep: frozenset[str] | None = None


def check_format(manifest: StoreManifest, folder: str | Path) -> int:
    """The store's format; one newer than this raydc reads is refused. Format 1 (before the
    compact store: float32 log-probs, text and weights in the rows) is read as it is."""
    from raydc.infra.schemas import STORE_FORMAT

    fmt = manifest.format
    if fmt > STORE_FORMAT:
        raise ScoredDataError(
            f"{folder}: scored store format {fmt} is newer than this raydc reads "
            f"(<= {STORE_FORMAT}); upgrade raydc, or re-score with this one "
            "(`raydc score`, or delete the score folder and rerun the job)"
        )
    return fmt


def open_store(folder: str | Path) -> ScoredStore:
    """A score stage's folder, or a select stage's (its kept row ids over the scored store
    it names; refused when that store changed since the selection)."""
    import pyarrow.parquet as pq

    from raydc.infra.schemas import SELECTION_FILE

    d = Path(folder)
    manifest = read_manifest(d)
    check_format(manifest, d)
    selection = d / SELECTION_FILE
    if not selection.exists():
        return ScoredStore(d, scored_files(d), manifest)
    if not manifest.selection_source:
        raise ScoredDataError(f"{d / 'manifest.json'}: field selection.source is missing")
    src = (d / manifest.selection_source).resolve()
    files = scored_files(src)
    now = {Path(f).name: Path(f).stat().st_size for f in files}
    then = manifest.selection_files or {}
    changed = sorted(n for n in now.keys() | then.keys() if now.get(n) != then.get(n))
    if changed:
        shown = ", ".join(
            f"{n} ({then.get(n, 'absent')} -> {now.get(n, 'absent')} bytes)" for n in changed[:5]
        )
        raise ScoredDataError(
            f"the scored store {str(src)!r} changed since {str(d)!r} selected from it: "
            f"{len(changed)} file(s) differ, {shown}; run the select stage again"
        )
    kept = pq.read_table(selection, columns=["row_id"]).column(0).to_pylist()
    return ScoredStore(d, files, manifest, frozenset(kept))


def read_manifest(scored_dir: str | Path) -> StoreManifest:
    path = Path(scored_dir) / "manifest.json"
    if not path.exists():
        raise ScoredDataError(
            f"{path} is missing: training needs the scoring manifest to check which student "
            "made the scores"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ScoredDataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ScoredDataError(f"{path}: not a JSON object")
    return StoreManifest.parse(data, path)


def check_student(
    manifest: StoreManifest, student_path: str, scored_dir: str | Path = "", fp: str | None = None
) -> str:
    """Refuse scores made by another student; return the training student's fingerprint.

    ``fp`` is the student's fingerprint when the caller has it already (a Tune sweep
    computes it once, not per trial)."""
    from raydc.infra.artifacts import fingerprint_paths

    fp = fp or fingerprint_paths(student_path)
    scored = manifest.student_fingerprint
    if not scored:
        raise ScoredDataError(f"{manifest.file}: field student.fingerprint is missing")
    if scored != fp:
        raise ScoredDataError(
            f"the scores in {str(scored_dir)!r} were made with student "
            f"{manifest.student_path!r} (fingerprint {scored}), but "
            f"training would start from {student_path!r} (fingerprint {fp}). Their stored "
            "student log-probs do not describe this model: re-score with this student, or "
            "train the student that was scored."
        )
    return fp


def check_schema(files: list[str]) -> list[str]:
    """The columns to read; a clear error naming the file and the missing field."""
    import pyarrow.parquet as pq

    names = set(pq.read_schema(files[0]).names)
    missing = [c for c in (*REQUIRED_COLUMNS, INDEX_COLUMN) if c not in names]
    if missing:
        raise ScoredDataError(
            f"{files[0]}: scored column(s) {missing} missing (have {sorted(names)})"
        )
    return list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in names]


def is_val_key(key: str, share: float, seed: int) -> bool:
    """Deterministic held-out membership by hash of the prompt id (a prompt's candidates
    stay together, whatever the order or number of files)."""
    if share <= 0:
        return False
    h = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < share
