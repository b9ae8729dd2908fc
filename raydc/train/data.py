"""Scored rows in, typed micro-batches out: the training stage's rows, packing and collate.

A window of scored rows is held as a ``RowBlock``: flat numpy columns plus row offsets (no
Python object per row), checked once when read, with errors naming the row and the field.
Micro-batches are planned from row *lengths* alone (``pack_rows`` / ``bucket_rows``), so
every rank can plan its whole epoch before reading a byte of it, and turned into a
``MicroBatch`` by ``collate``:

- packed (``train.packing``, the default): the rows of a micro-batch are concatenated into
  one sequence [1, T] of at most ``train.micro_batch_tokens`` tokens, bins filled
  first-fit-decreasing. ``position_ids`` restart at 0 on every row, which is how
  transformers recognises packed rows: FlashAttention-2 runs its varlen kernel on them,
  sdpa and eager get a block-diagonal causal mask (``masking_utils.create_causal_mask``),
  so no token attends across a row boundary. A row longer than the budget goes alone.
- bucketed: rows sorted by length and right-padded into [B, T] while B x T fits the budget
  (the padded slots are reported as ``padding_share``).

Targets are shifted once: every per-target tensor of a ``MicroBatch`` is [B, T-1], aligned
with ``input_ids[:, 1:]``. The weights are per *row* (prefix, sentence, sequence and
per-sequence granularities must not see a neighbour), so a packed micro-batch carries a
``RowLayout`` that views its targets as [R, L-1], one row each, and scatters per-row
weights back: a packed row weighs exactly what it weighs alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Columns of the scored schema (docs/contracts.md) that training reads.
REQUIRED_COLUMNS = ("row_id", "input_ids", "loss_mask", "student_logprobs")
# teacher_mask: False where the teacher has no value (its weight is neutral, exactly 1)
OPTIONAL_COLUMNS = ("prompt_id", "sentence_ids", "teacher_logprobs", "teacher_mask")
INDEX_COLUMN = "num_tokens"  # per-row length: lets ranks plan without reading the rows


class ScoredDataError(ValueError):
    """The scored input is missing, malformed, or was scored with another student."""


# ----------------------------------------------------------------------------- the folder


def scored_files(scored_dir: str | Path) -> list[str]:
    """The scored Parquet parts of a scoring output folder, sorted (rejects excluded)."""
    from raydc.artifacts import data_files

    d = Path(scored_dir)
    if not d.is_dir():
        raise ScoredDataError(f"scored_dir {str(d)!r} is not a folder")
    files = data_files(d)
    if not files:
        raise ScoredDataError(f"scored_dir {str(d)!r} holds no scored *.parquet files")
    return files


@dataclass(frozen=True)
class ScoredStore:
    """What training reads: the scored files, their manifest, and the row ids a selection
    kept (None: every row)."""

    folder: Path
    files: list[str]
    manifest: dict
    keep: frozenset[str] | None = None


def check_format(manifest: dict, folder: str | Path) -> int:
    """The store's format; one newer than this raydc reads is refused. Format 1 (before the
    compact store: float32 log-probs, text and weights in the rows) is read as it is."""
    from raydc.data.schema import STORE_FORMAT

    fmt = int((manifest.get("store") or {}).get("format", 1))
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

    from raydc.data.schema import SELECTION_FILE

    d = Path(folder)
    manifest = read_manifest(d)
    check_format(manifest, d)
    selection = d / SELECTION_FILE
    if not selection.exists():
        return ScoredStore(d, scored_files(d), manifest)
    sel = manifest.get("selection") or {}
    if not sel.get("source"):
        raise ScoredDataError(f"{d / 'manifest.json'}: field selection.source is missing")
    src = (d / sel["source"]).resolve()
    files = scored_files(src)
    now = {Path(f).name: Path(f).stat().st_size for f in files}
    then = sel.get("source_files") or {}
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


def check_student(
    manifest: dict, student_path: str, scored_dir: str | Path = "", fp: str | None = None
) -> str:
    """Refuse scores made by another student; return the training student's fingerprint.

    ``fp`` is the student's fingerprint when the caller has it already (a Tune sweep
    computes it once, not per trial)."""
    from raydc.models import fingerprint

    fp = fp or fingerprint(student_path)
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


# ----------------------------------------------------------------------------- rows


def _list_column(table, name: str):
    """(flat values, offsets [n+1], null mask [n]) of a list column, zero-copy where it can."""
    import pyarrow as pa

    col = table.column(name)
    col = col.combine_chunks() if col.num_chunks else pa.array([], col.type)
    if isinstance(col, pa.ChunkedArray):
        col = pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], col.type)
    nulls = col.is_null().to_numpy(zero_copy_only=False)
    offsets = col.offsets.to_numpy().astype(np.int64)
    flat = col.values.to_numpy(zero_copy_only=False)
    # A sliced array's offsets start past 0: rebase onto its own values.
    flat = flat[offsets[0] : offsets[-1]]
    return flat, offsets - offsets[0], nulls


@dataclass
class RowBlock:
    """Scored rows as flat columns: row r's tokens are ``[offsets[r], offsets[r + 1])``.

    Position t of a row holds token t and the log-probs of token t given tokens < t, so
    position 0's log-probs are 0.0 and ``loss_mask`` is False there.
    """

    row_ids: list[str]
    offsets: np.ndarray  # [R + 1] int64
    input_ids: np.ndarray  # [N] int32
    loss_mask: np.ndarray  # [N] bool
    sentence_ids: np.ndarray  # [N] int32
    student_logprobs: np.ndarray  # [N] float32
    teacher_logprobs: np.ndarray | None  # [N] float32; rows without them: see has_teacher
    has_teacher: np.ndarray  # [R] bool
    teacher_mask: np.ndarray | None = None  # [N] bool: False where the teacher said nothing

    def __len__(self) -> int:
        return len(self.row_ids)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def span(self, r: int) -> slice:
        return slice(int(self.offsets[r]), int(self.offsets[r + 1]))

    @classmethod
    def from_table(cls, table) -> RowBlock:
        """Scored rows from a pyarrow Table; errors name the row and the field."""
        row_ids = [str(x) for x in table.column("row_id").to_pylist()]
        ids, off, nulls = _list_column(table, "input_ids")
        for name in ("input_ids",):
            if nulls.any():
                bad = row_ids[int(np.argmax(nulls))]
                raise ScoredDataError(f"scored row {bad!r}: field {name} is null")
        lengths = np.diff(off)
        if len(lengths) and lengths.min() < 2:
            r = int(np.argmin(lengths))
            raise ScoredDataError(
                f"scored row {row_ids[r]!r}: field input_ids has {lengths[r]} tokens (need >= 2)"
            )

        def column(name: str, dtype, required: bool):
            if name not in table.column_names:
                return None, np.zeros(len(row_ids), bool)
            flat, o, nul = _list_column(table, name)
            if required and nul.any():
                bad = row_ids[int(np.argmax(nul))]
                raise ScoredDataError(f"scored row {bad!r}: field {name} is null")
            got = np.diff(o)
            wrong = ~nul & (got != lengths)
            if wrong.any():
                r = int(np.argmax(wrong))
                raise ScoredDataError(
                    f"scored row {row_ids[r]!r}: field {name} has {got[r]} values but "
                    f"input_ids has {lengths[r]}"
                )
            if not nul.any():
                return flat.astype(dtype, copy=False), ~nul
            out = np.zeros(int(off[-1]), dtype)
            for r in np.nonzero(~nul)[0]:
                out[off[r] : off[r + 1]] = flat[o[r] : o[r + 1]]
            return out, ~nul

        mask, _ = column("loss_mask", bool, True)
        if mask is None:
            raise ScoredDataError("scored rows: field loss_mask is missing")
        # Absent only in reads that need no log-probs (held-out rows for val_nll).
        s_lp, _ = column("student_logprobs", np.float32, True)
        if s_lp is None:
            s_lp = np.zeros(int(off[-1]), np.float32)
        sent, have_sent = column("sentence_ids", np.int32, False)
        t_lp, have_t = column("teacher_logprobs", np.float32, False)
        t_mask, have_tm = column("teacher_mask", bool, False)
        if t_mask is not None and not have_tm.all():
            t_mask[np.repeat(~have_tm, lengths)] = True  # no mask given: all known
        if sent is None or not have_sent.all():
            sent = np.zeros(int(off[-1]), np.int32) if sent is None else sent
        starts = off[:-1]
        if len(starts) and mask[starts].any():
            r = int(np.argmax(mask[starts]))
            raise ScoredDataError(
                f"scored row {row_ids[r]!r}: field loss_mask is True at position 0 "
                "(no token predicts it)"
            )
        bad = mask & ~np.isfinite(s_lp)
        if bad.any():
            r = int(np.searchsorted(off, int(np.argmax(bad)), side="right") - 1)
            raise ScoredDataError(
                f"scored row {row_ids[r]!r}: field student_logprobs is not finite on loss tokens"
            )
        return cls(
            row_ids=row_ids,
            offsets=off,
            input_ids=ids.astype(np.int32, copy=False),
            loss_mask=mask,
            sentence_ids=sent,
            student_logprobs=s_lp,
            teacher_logprobs=t_lp if have_t.any() else None,
            has_teacher=have_t,
            teacher_mask=t_mask,
        )

    def take(self, rows: list[int] | np.ndarray) -> RowBlock:
        """A block of the given rows, in that order (a copy)."""
        rows = [int(r) for r in rows]
        spans = [self.span(r) for r in rows]
        lens = [s.stop - s.start for s in spans]

        def cut(x):
            return np.concatenate([x[s] for s in spans]) if spans else x[:0]

        return RowBlock(
            row_ids=[self.row_ids[r] for r in rows],
            offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
            input_ids=cut(self.input_ids),
            loss_mask=cut(self.loss_mask),
            sentence_ids=cut(self.sentence_ids),
            student_logprobs=cut(self.student_logprobs),
            teacher_logprobs=None if self.teacher_logprobs is None else cut(self.teacher_logprobs),
            has_teacher=self.has_teacher[rows] if rows else self.has_teacher[:0],
            teacher_mask=None if self.teacher_mask is None else cut(self.teacher_mask),
        )

    @classmethod
    def concat(cls, blocks: list[RowBlock]) -> RowBlock:
        if len(blocks) == 1:
            return blocks[0]
        sizes = [int(b.offsets[-1]) for b in blocks]
        bases = np.cumsum([0, *sizes[:-1]])
        offsets = np.concatenate(
            [np.zeros(1, np.int64)] + [b.offsets[1:] + base for b, base in zip(blocks, bases)]
        )
        any_t = any(b.teacher_logprobs is not None for b in blocks)
        t_lp = None
        if any_t:
            t_lp = np.concatenate(
                [
                    b.teacher_logprobs
                    if b.teacher_logprobs is not None
                    else np.zeros(n, np.float32)
                    for b, n in zip(blocks, sizes)
                ]
            )
        t_mask = None
        if any(b.teacher_mask is not None for b in blocks):
            t_mask = np.concatenate(
                [
                    b.teacher_mask if b.teacher_mask is not None else np.ones(n, bool)
                    for b, n in zip(blocks, sizes)
                ]
            )
        return cls(
            row_ids=[r for b in blocks for r in b.row_ids],
            offsets=offsets,
            input_ids=np.concatenate([b.input_ids for b in blocks]),
            loss_mask=np.concatenate([b.loss_mask for b in blocks]),
            sentence_ids=np.concatenate([b.sentence_ids for b in blocks]),
            student_logprobs=np.concatenate([b.student_logprobs for b in blocks]),
            teacher_logprobs=t_lp,
            has_teacher=np.concatenate([b.has_teacher for b in blocks]),
            teacher_mask=t_mask,
        )


# ----------------------------------------------------------------------------- planning


def pack_rows(lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Bins of row indices whose lengths sum to at most ``budget`` (first-fit decreasing);
    a row longer than the budget gets a bin of its own. Deterministic: ties keep index
    order, bins are listed in the order they were opened."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    room = np.zeros(0, np.int64)
    bins: list[list[int]] = []
    for i in order:
        L = int(lengths[i])
        fits = np.nonzero(room >= L)[0] if L <= budget else ()
        if len(fits):
            b = int(fits[0])
            room[b] -= L
            bins[b].append(int(i))
        else:
            room = np.append(room, max(0, budget - L))
            bins.append([int(i)])
    return bins


def bucket_rows(lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Length bucketing: rows sorted by length, grouped while rows x longest <= budget
    (a row longer than the budget goes alone)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    bins: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        L = int(lengths[i])
        if cur and max(cur_max, L) * (len(cur) + 1) > budget:
            bins.append(cur)
            cur, cur_max = [], 0
        cur.append(int(i))
        cur_max = max(cur_max, L)
    if cur:
        bins.append(cur)
    return bins


def plan_bins(lengths: np.ndarray, budget: int, packing: bool) -> list[list[int]]:
    return pack_rows(lengths, budget) if packing else bucket_rows(lengths, budget)


# ----------------------------------------------------------------------------- micro-batches


@dataclass
class RowLayout:
    """Where each row's targets sit in a packed micro-batch: row r's k-th target (token
    k + 1 of the row) is flat target ``index[r, k]``, for ``valid[r, k]``."""

    index: torch.Tensor  # [R, L-1] int64 into the flattened [B * (T-1)] targets
    valid: torch.Tensor  # [R, L-1] bool

    def to_rows(self, x_BT: torch.Tensor, fill=0) -> torch.Tensor:
        """[B, T-1] -> [R, L-1]; invalid slots hold ``fill``."""
        flat = x_BT.reshape(-1)
        out = flat[self.index.clamp(min=0)]
        return torch.where(self.valid, out, torch.full_like(out, fill))

    def from_rows(self, x_RL: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """[R, L-1] -> [B, T-1]; targets of no row (row boundaries) get 0."""
        out = torch.zeros(int(np.prod(shape)), dtype=x_RL.dtype, device=x_RL.device)
        out[self.index[self.valid]] = x_RL[self.valid]
        return out.reshape(shape)


@dataclass
class MicroBatch:
    """One micro-batch, targets shifted once: per-target tensors are [B, T-1], aligned with
    ``input_ids[:, 1:]``. ``layout`` is set for packed rows (B = 1), None for right-padded
    rows (each batch row is one scored row)."""

    input_ids: torch.Tensor  # [B, T] int64
    position_ids: torch.Tensor | None  # [B, T] int64, restarting per row; None: 0..T-1
    loss_mask: torch.Tensor  # [B, T-1] bool
    student_logprobs: torch.Tensor  # [B, T-1] float32
    teacher_logprobs: torch.Tensor | None  # [B, T-1] float32
    sentence_ids: torch.Tensor  # [B, T-1] int64
    layout: RowLayout | None
    row_ids: list[str]
    tokens: int  # real (non-pad) tokens
    slots: int  # B x T
    teacher_mask: torch.Tensor | None = None  # [B, T-1] bool: False where the teacher is silent

    def to(self, device) -> MicroBatch:
        def mv(x):
            return x.to(device) if isinstance(x, torch.Tensor) else x

        layout = (
            None if self.layout is None else RowLayout(mv(self.layout.index), mv(self.layout.valid))
        )
        return MicroBatch(
            mv(self.input_ids),
            mv(self.position_ids),
            mv(self.loss_mask),
            mv(self.student_logprobs),
            mv(self.teacher_logprobs),
            mv(self.sentence_ids),
            layout,
            self.row_ids,
            self.tokens,
            self.slots,
            mv(self.teacher_mask),
        )

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def _check_teacher(block: RowBlock, rows: list[int]) -> bool:
    have = block.has_teacher[rows]
    if have.any() and not have.all():
        rid = block.row_ids[rows[int(np.argmin(have))]]
        raise ScoredDataError(
            f"scored row {rid!r}: field teacher_logprobs is null while other rows have it; "
            "score all rows with the teacher or none"
        )
    return bool(have.all()) and block.teacher_logprobs is not None


def collate(
    block: RowBlock,
    rows: list[int],
    packed: bool,
    pad_id: int = 0,
    student_logprobs: dict[int, np.ndarray] | None = None,
) -> MicroBatch:
    """The micro-batch of ``block``'s rows ``rows``: one packed sequence, or right-padded.

    ``student_logprobs`` replaces the stored column for the rows it names (re-scored rows).
    A micro-batch mixing rows with and without teacher log-probs is refused.
    """
    with_t = _check_teacher(block, rows)
    spans = [block.span(r) for r in rows]
    lens = [s.stop - s.start for s in spans]

    def s_lp(k: int, r: int) -> np.ndarray:
        if student_logprobs is not None and r in student_logprobs:
            return student_logprobs[r]
        return block.student_logprobs[spans[k]]

    if packed:
        cat = np.concatenate
        ids = cat([block.input_ids[s] for s in spans]).astype(np.int64)
        pos = cat([np.arange(n) for n in lens]).astype(np.int64)
        mask = cat([block.loss_mask[s] for s in spans])[1:]
        sent = cat([block.sentence_ids[s] for s in spans]).astype(np.int64)[1:]
        slp = cat([s_lp(k, r) for k, r in enumerate(rows)]).astype(np.float32)[1:]
        tlp = cat([block.teacher_logprobs[s] for s in spans])[1:] if with_t else None
        tm = None
        if with_t and block.teacher_mask is not None:
            tm = torch.from_numpy(cat([block.teacher_mask[s] for s in spans])[1:])[None]
        starts = np.cumsum([0, *lens[:-1]])
        L = max(lens) - 1
        k = np.arange(L)
        index = starts[:, None] + k[None, :]
        valid = k[None, :] < (np.asarray(lens)[:, None] - 1)
        layout = RowLayout(torch.from_numpy(np.where(valid, index, -1)), torch.from_numpy(valid))
        T = int(ids.shape[0])
        return MicroBatch(
            input_ids=torch.from_numpy(ids)[None],
            position_ids=torch.from_numpy(pos)[None],
            loss_mask=torch.from_numpy(mask)[None],
            student_logprobs=torch.from_numpy(slp)[None],
            teacher_logprobs=None
            if tlp is None
            else torch.from_numpy(tlp.astype(np.float32))[None],
            sentence_ids=torch.from_numpy(sent)[None],
            layout=layout,
            row_ids=[block.row_ids[r] for r in rows],
            tokens=T,
            slots=T,
            teacher_mask=tm,
        )
    B, T = len(rows), max(lens)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    sent = np.zeros((B, T), dtype=np.int64)
    slp = np.zeros((B, T), dtype=np.float32)
    tlp = np.zeros((B, T), dtype=np.float32) if with_t else None
    tm = np.ones((B, T), dtype=bool) if with_t and block.teacher_mask is not None else None
    for b, (r, s) in enumerate(zip(rows, spans)):
        n = s.stop - s.start
        ids[b, :n] = block.input_ids[s]
        mask[b, :n] = block.loss_mask[s]
        sent[b, :n] = block.sentence_ids[s]
        slp[b, :n] = s_lp(b, r)
        if tlp is not None:
            tlp[b, :n] = block.teacher_logprobs[s]
        if tm is not None:
            tm[b, :n] = block.teacher_mask[s]
    return MicroBatch(
        input_ids=torch.from_numpy(ids),
        position_ids=None,
        loss_mask=torch.from_numpy(mask[:, 1:]),
        student_logprobs=torch.from_numpy(slp[:, 1:]),
        teacher_logprobs=None if tlp is None else torch.from_numpy(tlp[:, 1:]),
        sentence_ids=torch.from_numpy(sent[:, 1:]),
        layout=None,
        row_ids=[block.row_ids[r] for r in rows],
        tokens=int(sum(lens)),
        slots=B * T,
        teacher_mask=None if tm is None else torch.from_numpy(tm[:, 1:]),
    )
