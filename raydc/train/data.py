"""Scored Parquet in, padded micro-batches out: the training stage's data side.

The driver checks the scored folder (files, manifest, the student's fingerprint) and
builds the Ray Data datasets; each Ray Train worker reads its shard with
``get_dataset_shard`` into compact numpy rows, then plans micro-batches by *length
bucketing*: rows are shuffled per epoch, cut into buffers, sorted by length inside each
buffer and packed greedily up to ``micro_batch_tokens`` padded slots, so rows of similar
length share a micro-batch and padding stays small (the padding share is reported).

Which rows a worker holds is decided by a hash of the row id (``owner_rank``), not by Ray
Data's split, whose assignment of blocks to workers can change from run to run: a restarted
worker must see exactly the micro-batches it would have seen (resume "where it stopped",
data position included). Every worker therefore reads the whole dataset and keeps its rows.
The shard is held in memory (~17 bytes a token: ids, mask, sentence ids, two log-probs)
because every worker must agree on the number of steps in an epoch before the first
collective, and re-scoring rounds revisit every row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Columns of the scored schema (docs/contracts.md) that training reads.
REQUIRED_COLUMNS = ("row_id", "input_ids", "loss_mask", "student_logprobs")
OPTIONAL_COLUMNS = ("prompt_id", "sentence_ids", "teacher_logprobs")
# Rows sorted by length within a buffer of this many (shuffled) rows.
BUCKET_BUFFER_ROWS = 1024


class ScoredDataError(ValueError):
    """The scored input is missing, malformed, or was scored with another student."""


def scored_files(scored_dir: str | Path) -> list[str]:
    """The scored Parquet parts of a scoring output folder, sorted (rejects excluded)."""
    d = Path(scored_dir)
    if not d.is_dir():
        raise ScoredDataError(f"scored_dir {str(d)!r} is not a folder")
    files = sorted(str(p) for p in d.glob("*.parquet") if p.name != "rejects.parquet")
    if not files:
        raise ScoredDataError(f"scored_dir {str(d)!r} holds no scored *.parquet files")
    return files


def read_manifest(scored_dir: str | Path) -> dict:
    path = Path(scored_dir) / "manifest.json"
    if not path.exists():
        raise ScoredDataError(
            f"{path} is missing: training needs the scoring manifest to check which student "
            "made the scores"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ScoredDataError(f"{path}: not valid JSON ({e})") from e


def check_student(manifest: dict, student_path: str, scored_dir: str | Path = "") -> str:
    """Refuse scores made by another student; return the training student's fingerprint."""
    from raydc.models import fingerprint

    fp = fingerprint(student_path)
    scored = (manifest.get("student") or {}).get("fingerprint")
    if not scored:
        raise ScoredDataError(
            f"{Path(scored_dir) / 'manifest.json'}: field student.fingerprint is missing"
        )
    if scored != fp:
        raise ScoredDataError(
            f"the scores in {str(scored_dir)!r} were made with student "
            f"{(manifest.get('student') or {}).get('path')!r} (fingerprint {scored}), but "
            f"training would start from {student_path!r} (fingerprint {fp}). Their stored "
            "student log-probs do not describe this model: re-score with this student, or "
            "train the student that was scored."
        )
    return fp


def check_schema(files: list[str]) -> list[str]:
    """The columns to read; a clear error naming the file and the missing field."""
    import pyarrow.parquet as pq

    names = set(pq.read_schema(files[0]).names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
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


def owner_rank(row_id: str, world: int) -> int:
    """The training rank that holds a row: a hash of its id, independent of file order."""
    h = hashlib.sha1(f"rank:{row_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") % world


@dataclass
class Row:
    """One scored trace as numpy arrays (position t: token t given tokens < t)."""

    row_id: str
    input_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] bool
    sentence_ids: np.ndarray  # [T] int32
    student_logprobs: np.ndarray  # [T] float32
    teacher_logprobs: np.ndarray | None  # [T] float32 or None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _list_column(table, name: str):
    """(flat values, offsets, null mask) of a list column, without per-row Python objects."""
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    if isinstance(col, pa.ChunkedArray):  # empty table
        col = pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], col.type)
    nulls = col.is_null().to_numpy(zero_copy_only=False)
    offsets = col.offsets.to_numpy()
    flat = col.values.to_numpy(zero_copy_only=False)
    return flat, offsets, nulls


def rows_from_table(table) -> list[Row]:
    """Scored rows from a pyarrow Table; errors name the row and the field."""
    n = table.num_rows
    row_ids = [str(x) for x in table.column("row_id").to_pylist()]
    cols = {}
    for name in ("input_ids", "loss_mask", "student_logprobs", "sentence_ids", "teacher_logprobs"):
        if name in table.column_names:
            cols[name] = _list_column(table, name)

    def get(i: int, name: str, dtype, required: bool = True):
        if name not in cols:
            return None
        flat, off, nulls = cols[name]
        if nulls[i]:
            if required:
                raise ScoredDataError(f"scored row {row_ids[i]!r}: field {name} is null")
            return None
        return np.asarray(flat[off[i] : off[i + 1]], dtype=dtype)

    rows = []
    for i in range(n):
        rid = row_ids[i]

        ids = get(i, "input_ids", np.int32)
        T = ids.shape[0]
        if T < 2:
            raise ScoredDataError(f"scored row {rid!r}: field input_ids has {T} tokens (need >= 2)")
        mask = get(i, "loss_mask", bool)
        s_lp = get(i, "student_logprobs", np.float32)
        sent = get(i, "sentence_ids", np.int32, required=False)
        t_lp = get(i, "teacher_logprobs", np.float32, required=False)
        if sent is None:
            sent = np.zeros(T, dtype=np.int32)
        for name, arr in (
            ("loss_mask", mask),
            ("student_logprobs", s_lp),
            ("sentence_ids", sent),
            ("teacher_logprobs", t_lp),
        ):
            if arr is not None and arr.shape[0] != T:
                raise ScoredDataError(
                    f"scored row {rid!r}: field {name} has {arr.shape[0]} values but input_ids "
                    f"has {T}"
                )
        if mask[0]:
            raise ScoredDataError(
                f"scored row {rid!r}: field loss_mask is True at position 0 (no token predicts it)"
            )
        if not np.isfinite(s_lp[mask]).all():
            raise ScoredDataError(
                f"scored row {rid!r}: field student_logprobs is not finite on loss tokens"
            )
        rows.append(Row(rid, ids, mask, sent, s_lp, t_lp))
    return rows


def plan_micro_batches(
    lengths: list[int] | np.ndarray,
    micro_batch_tokens: int,
    rng: np.random.Generator | None,
    buffer_rows: int = BUCKET_BUFFER_ROWS,
) -> list[list[int]]:
    """Row indices of each micro-batch for one epoch (length bucketing).

    Rows are permuted (``rng`` None keeps the order), cut into buffers of ``buffer_rows``,
    sorted by length inside a buffer and grouped greedily while rows x longest row <=
    ``micro_batch_tokens`` (a row longer than that goes alone). The micro-batches are then
    shuffled so an epoch does not run from short rows to long ones.
    """
    n = len(lengths)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    batches: list[list[int]] = []
    for start in range(0, n, buffer_rows):
        chunk = sorted(order[start : start + buffer_rows].tolist(), key=lambda i: (lengths[i], i))
        cur: list[int] = []
        cur_max = 0
        for i in chunk:
            L = int(lengths[i])
            if cur and max(cur_max, L) * (len(cur) + 1) > micro_batch_tokens:
                batches.append(cur)
                cur, cur_max = [], 0
            cur.append(i)
            cur_max = max(cur_max, L)
        if cur:
            batches.append(cur)
    if rng is not None:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


def epoch_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank])


def collate(
    rows: list[Row], pad_id: int = 0, student_logprobs: list[np.ndarray] | None = None
) -> dict:
    """Right-padded [B, T] tensors of the given rows.

    ``student_logprobs`` replaces the stored column (re-scored rows). ``teacher_logprobs`` is
    None when no row has them; a micro-batch mixing rows with and without them is refused.
    """
    import torch

    B = len(rows)
    T = max(len(r) for r in rows)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    attn = np.zeros((B, T), dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    sent = np.zeros((B, T), dtype=np.int64)
    s_lp = np.zeros((B, T), dtype=np.float32)
    have_t = [r.teacher_logprobs is not None for r in rows]
    if any(have_t) and not all(have_t):
        rid = rows[have_t.index(False)].row_id
        raise ScoredDataError(
            f"scored row {rid!r}: field teacher_logprobs is null while other rows have it; "
            "score all rows with the teacher or none"
        )
    t_lp = np.zeros((B, T), dtype=np.float32) if all(have_t) else None
    for b, r in enumerate(rows):
        L = len(r)
        ids[b, :L] = r.input_ids
        attn[b, :L] = 1
        mask[b, :L] = r.loss_mask
        sent[b, :L] = r.sentence_ids
        s_lp[b, :L] = r.student_logprobs if student_logprobs is None else student_logprobs[b]
        if t_lp is not None:
            t_lp[b, :L] = r.teacher_logprobs
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(attn),
        "loss_mask": torch.from_numpy(mask),
        "sentence_ids": torch.from_numpy(sent),
        "student_logprobs": torch.from_numpy(s_lp),
        "teacher_logprobs": None if t_lp is None else torch.from_numpy(t_lp),
        "tokens": int(attn.sum()),
        "slots": B * T,
    }
