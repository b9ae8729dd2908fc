"""Scored rows in, typed micro-batches out: the row block, packing and collate.

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

``student_entropy`` (the student's predictive entropy in nats per position, for the entropy
gates of ``raydc.method.weights``) is optional all the way: read when the scored table has
the column, carried through ``take`` / ``concat`` / ``collate`` like the log-probs, None
otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raydc.train.data import ScoredDataError

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


def _refuse_nulls(row_ids: list[str], nulls: np.ndarray, name: str) -> None:
    if nulls.any():
        bad = row_ids[int(np.argmax(nulls))]
        raise ScoredDataError(f"scored row {bad!r}: field {name} is null")


def _token_column(table, name: str, dtype, required: bool, row_ids: list[str], offsets):
    """(values [N], present [R]) of a per-token column laid out like input_ids (``offsets``);
    null rows hold zeros, and a column the table lacks is (None, all False)."""
    if name not in table.column_names:
        return None, np.zeros(len(row_ids), bool)
    flat, own, nulls = _list_column(table, name)
    if required:
        _refuse_nulls(row_ids, nulls, name)
    got, want = np.diff(own), np.diff(offsets)
    wrong = ~nulls & (got != want)
    if wrong.any():
        r = int(np.argmax(wrong))
        raise ScoredDataError(
            f"scored row {row_ids[r]!r}: field {name} has {got[r]} values but "
            f"input_ids has {want[r]}"
        )
    if not nulls.any():
        return flat.astype(dtype, copy=False), ~nulls
    out = np.zeros(int(offsets[-1]), dtype)
    for r in np.nonzero(~nulls)[0]:
        out[offsets[r] : offsets[r + 1]] = flat[own[r] : own[r + 1]]
    return out, ~nulls


def _check_loss_tokens(
    row_ids: list[str], offsets, mask: np.ndarray, s_lp: np.ndarray, ent: np.ndarray | None
) -> None:
    """No loss on a row's first token (nothing predicts it); finite log-probs (and a finite,
    non-negative entropy where the column exists) on the rest."""
    starts = offsets[:-1]
    if len(starts) and mask[starts].any():
        r = int(np.argmax(mask[starts]))
        raise ScoredDataError(
            f"scored row {row_ids[r]!r}: field loss_mask is True at position 0 "
            "(no token predicts it)"
        )
    bad = mask & ~np.isfinite(s_lp)
    if bad.any():
        r = int(np.searchsorted(offsets, int(np.argmax(bad)), side="right") - 1)
        raise ScoredDataError(
            f"scored row {row_ids[r]!r}: field student_logprobs is not finite on loss tokens"
        )
    if ent is not None:
        bad = mask & ~(np.isfinite(ent) & (ent >= -1e-3))
        if bad.any():
            r = int(np.searchsorted(offsets, int(np.argmax(bad)), side="right") - 1)
            raise ScoredDataError(
                f"scored row {row_ids[r]!r}: field student_entropy is not a finite entropy "
                "(>= 0 nats) on loss tokens"
            )


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
    student_entropy: np.ndarray | None = None  # [N] float32, nats; None: the store has none

    def __len__(self) -> int:
        return len(self.row_ids)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def span(self, r: int) -> slice:
        return slice(int(self.offsets[r]), int(self.offsets[r + 1]))

    @classmethod
    def empty(cls) -> RowBlock:
        z = np.zeros(0, np.int32)
        return cls(
            [],
            np.zeros(1, np.int64),
            z,
            z.astype(bool),
            z,
            z.astype(np.float32),
            None,
            z.astype(bool),
        )

    @classmethod
    def from_table(cls, table) -> RowBlock:
        """Scored rows from a pyarrow Table; errors name the row and the field."""
        row_ids = [str(x) for x in table.column("row_id").to_pylist()]
        ids, off, nulls = _list_column(table, "input_ids")
        _refuse_nulls(row_ids, nulls, "input_ids")
        lengths = np.diff(off)
        if len(lengths) and lengths.min() < 2:
            r = int(np.argmin(lengths))
            raise ScoredDataError(
                f"scored row {row_ids[r]!r}: field input_ids has {lengths[r]} tokens (need >= 2)"
            )

        def column(name: str, dtype, required: bool = False):
            return _token_column(table, name, dtype, required, row_ids, off)

        mask, _ = column("loss_mask", bool, required=True)
        if mask is None:
            raise ScoredDataError("scored rows: field loss_mask is missing")
        # Absent only in reads that need no log-probs (held-out rows for val_nll).
        s_lp, _ = column("student_logprobs", np.float32, required=True)
        if s_lp is None:
            s_lp = np.zeros(int(off[-1]), np.float32)
        sent, _ = column("sentence_ids", np.int32)
        if sent is None:
            sent = np.zeros(int(off[-1]), np.int32)
        t_lp, have_t = column("teacher_logprobs", np.float32)
        t_mask, have_tm = column("teacher_mask", bool)
        if t_mask is not None and not have_tm.all():
            t_mask[np.repeat(~have_tm, lengths)] = True  # no mask given: all known
        # The store holds the column null in every row when the score stage stored no
        # entropy (score.entropy): that reads as absent; some rows null is refused.
        if "student_entropy" in table.column_names and (
            table.column("student_entropy").null_count == table.num_rows
        ):
            ent = None
        else:
            ent, _ = column("student_entropy", np.float32, required=True)
        _check_loss_tokens(row_ids, off, mask, s_lp, ent)
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
            student_entropy=ent,
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
            student_entropy=None if self.student_entropy is None else cut(self.student_entropy),
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
        have_ent = [b.student_entropy is not None for b in blocks]
        if any(have_ent) and not all(have_ent):
            b = blocks[have_ent.index(False)]
            raise ScoredDataError(
                f"scored row {b.row_ids[0]!r}: field student_entropy is missing while other "
                "scored rows have it; score all rows with it or none"
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
            student_entropy=(
                np.concatenate([b.student_entropy for b in blocks]) if all(have_ent) else None
            ),
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

    @classmethod
    def packed(cls, lengths: list[int]) -> RowLayout:
        """The layout of rows of these lengths packed end to end into one sequence."""
        starts = np.cumsum([0, *lengths[:-1]])
        k = np.arange(max(lengths) - 1)
        index = starts[:, None] + k[None, :]
        valid = k[None, :] < (np.asarray(lengths)[:, None] - 1)
        return cls(torch.from_numpy(np.where(valid, index, -1)), torch.from_numpy(valid))

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
    student_entropy: torch.Tensor | None = None  # [B, T-1] float32 nats; None: not stored

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
            mv(self.student_entropy),
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
    with_teacher = _check_teacher(block, rows)
    spans = [block.span(r) for r in rows]

    def cols(x: np.ndarray | None) -> list[np.ndarray] | None:
        """Each row's values of a per-token column; None for a column the rows lack."""
        return [x[s] for s in spans] if x is not None else None

    s_lp = [
        student_logprobs[r] if student_logprobs and r in student_logprobs else x
        for r, x in zip(rows, cols(block.student_logprobs))
    ]
    t_lp = cols(block.teacher_logprobs) if with_teacher else None
    t_mask = cols(block.teacher_mask) if with_teacher else None
    ids, mask, sent = cols(block.input_ids), cols(block.loss_mask), cols(block.sentence_ids)
    ent = cols(block.student_entropy)
    row_ids = [block.row_ids[r] for r in rows]
    if packed:
        return _packed(row_ids, ids, mask, s_lp, t_lp, sent, t_mask, ent)
    return _padded(row_ids, ids, mask, s_lp, t_lp, sent, t_mask, ent, pad_id)


def _packed(row_ids, ids, mask, s_lp, t_lp, sent, t_mask, ent) -> MicroBatch:
    """Rows end to end in one sequence [1, T], positions restarting on every row."""

    def targets(parts: list[np.ndarray] | None, dtype) -> torch.Tensor | None:
        """[1, T-1]: the rows' values end to end, less the first (no token predicts it)."""
        if parts is None:
            return None
        return torch.from_numpy(np.concatenate(parts)[1:].astype(dtype))[None]

    lens = [len(x) for x in ids]
    T = sum(lens)
    pos = np.concatenate([np.arange(n, dtype=np.int64) for n in lens])
    return MicroBatch(
        input_ids=torch.from_numpy(np.concatenate(ids).astype(np.int64))[None],
        position_ids=torch.from_numpy(pos)[None],
        loss_mask=targets(mask, bool),
        student_logprobs=targets(s_lp, np.float32),
        teacher_logprobs=targets(t_lp, np.float32),
        sentence_ids=targets(sent, np.int64),
        layout=RowLayout.packed(lens),
        row_ids=row_ids,
        tokens=T,
        slots=T,
        teacher_mask=targets(t_mask, bool),
        student_entropy=targets(ent, np.float32),
    )


def _padded(row_ids, ids, mask, s_lp, t_lp, sent, t_mask, ent, pad_id: int) -> MicroBatch:
    """One batch row per scored row, right-padded to the longest: [B, T]."""
    B, T = len(ids), max(len(x) for x in ids)

    def pad(parts: list[np.ndarray], fill, dtype) -> np.ndarray:
        out = np.full((B, T), fill, dtype=dtype)
        for b, x in enumerate(parts):
            out[b, : len(x)] = x
        return out

    def targets(parts: list[np.ndarray] | None, fill, dtype) -> torch.Tensor | None:
        """[B, T-1]: aligned with ``input_ids[:, 1:]``."""
        return None if parts is None else torch.from_numpy(pad(parts, fill, dtype)[:, 1:])

    return MicroBatch(
        input_ids=torch.from_numpy(pad(ids, pad_id, np.int64)),
        position_ids=None,
        loss_mask=targets(mask, False, bool),
        student_logprobs=targets(s_lp, 0.0, np.float32),
        teacher_logprobs=targets(t_lp, 0.0, np.float32),
        sentence_ids=targets(sent, 0, np.int64),
        layout=None,
        row_ids=row_ids,
        tokens=sum(len(x) for x in ids),
        slots=B * T,
        teacher_mask=targets(t_mask, True, bool),
        student_entropy=targets(ent, 0.0, np.float32),
    )
