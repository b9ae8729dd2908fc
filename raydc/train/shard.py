"""Which rows each training rank reads, and in what order: the streaming data plane.

The driver never reads the rows. ``build_index`` reads each scored file's Parquet footer and
its ``num_tokens`` column (4 bytes a row); ``assign_pieces`` cuts the rows, in file order,
into ``world`` contiguous ranges of equal *tokens* (so long-tailed lengths balance to within
one row) and gives each rank its range as ``Piece``s: whole row groups, plus at most a row
range of a group at each end. A rank then reads about ``total / world`` bytes an epoch:
every row group is read by one rank, a group cut by a range boundary by two.

Each rank builds a ``RankShard`` from its pieces (their ``num_tokens`` and id columns only:
lengths, row ids for the held-out split), then plans each epoch with ``plan_epoch`` from the
lengths alone: the pieces in a seeded random order are cut into *windows* of about
``train.shuffle_window_tokens`` tokens, each window's rows are shuffled and packed (or
bucketed) into micro-batches, and the micro-batches of a window are shuffled. Only one
window's rows are ever in memory (``WindowReader``: the training columns of its pieces),
so worker memory is bounded by the window, not by the shard or the data set. The plan is a
pure function of (seed, epoch, rank, pieces, lengths): a restarted worker re-plans the
epoch it stopped in and skips the micro-batches it had consumed, landing on the exact
micro-batch.

Why not Ray Data's ``streaming_split``: it hands blocks to whichever consumer asks first, so
which rows a rank sees (and in what order) changes from run to run, and it balances rows,
not tokens; a resumed run could then neither land on the micro-batch it stopped at nor keep
ranks in step on long-tailed lengths. Reading assigned row groups with pyarrow gives both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raydc.train.batch import RowBlock, plan_bins
from raydc.train.data import INDEX_COLUMN, ScoredDataError, is_val_key


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of row group ``row_group`` of ``file``."""

    file: str
    row_group: int
    start: int
    stop: int
    tokens: int
    bytes: int  # compressed bytes of the row group's columns (what reading it costs)
    # A selection: the group's row indices of rows [start, stop) of its kept rows.
    take: tuple[int, ...] | None = None

    def rows(self, table):
        """This piece's rows of its row group ``table``."""
        if self.take is not None:
            return table.take(list(self.take))
        return table.slice(self.start, self.stop - self.start)


@dataclass(frozen=True)
class RowGroup:
    file: str
    row_group: int
    lengths: np.ndarray  # [rows] tokens of each (kept) row
    bytes: int
    take: np.ndarray | None = None  # [rows] a selection's kept row indices in the group


def build_index(files: list[str], keep: frozenset[str] | None = None) -> list[RowGroup]:
    """The row groups of ``files`` with their rows' lengths, in a canonical order: by each
    group's smallest row id. Ray Data writes blocks in the order they finish, so two
    scorings of the same rows can lay the same groups out in another file and group order;
    the epoch plan must not follow that. Reads footers and the ``num_tokens`` and ``row_id``
    columns only; with ``keep`` (a selection's row ids) only the kept rows are indexed."""
    import pyarrow.parquet as pq

    keyed, found = [], 0
    for f in files:
        pf = pq.ParquetFile(f)
        if INDEX_COLUMN not in pf.schema_arrow.names:
            raise ScoredDataError(f"{f}: scored column {INDEX_COLUMN!r} missing")
        for g in range(pf.metadata.num_row_groups):
            if pf.metadata.row_group(g).num_rows == 0:
                continue
            t = pf.read_row_group(g, columns=[INDEX_COLUMN, "row_id"])
            lens = t.column(INDEX_COLUMN).to_numpy().astype(np.int64)
            ids = t.column("row_id").to_pylist()
            take = None
            if keep is not None:
                hit = np.fromiter((r in keep for r in ids), bool, len(ids))
                take = np.nonzero(hit)[0]
                lens = lens[take]
                ids = [ids[i] for i in take]
                found += len(take)
                if not len(take):
                    continue
            group = RowGroup(f, g, lens, _columns_bytes(pf, g, None), take)
            keyed.append(((min(ids), f, g), group))
    if keep is not None and found != len(keep):
        raise ScoredDataError(
            f"the selection keeps {len(keep)} row ids but the scored store holds {found} of "
            "them; run the select stage again"
        )
    return [group for _, group in sorted(keyed, key=lambda kg: kg[0])]


def assign_pieces(groups: list[RowGroup], world: int) -> list[list[Piece]]:
    """Rank r's pieces: the rows whose first token falls in the r-th of ``world`` equal
    token ranges of all rows in index order. Deterministic; disjoint; together all rows."""
    lens = np.concatenate([g.lengths for g in groups]) if groups else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    total = int(lens.sum())
    cuts = [int(np.searchsorted(starts, total * r / world, side="left")) for r in range(world)]
    cuts.append(len(lens))
    bases = np.concatenate([[0], np.cumsum([len(g.lengths) for g in groups])])
    out: list[list[Piece]] = []
    for r in range(world):
        lo, hi = cuts[r], cuts[r + 1]
        pieces = []
        for g, grp in enumerate(groups):
            a, b = max(lo, bases[g]), min(hi, bases[g + 1])
            if a < b:
                s, e = int(a - bases[g]), int(b - bases[g])
                take = None if grp.take is None else tuple(grp.take[s:e].tolist())
                tokens = int(grp.lengths[s:e].sum())
                pieces.append(Piece(grp.file, grp.row_group, s, e, tokens, grp.bytes, take))
        out.append(pieces)
    return out


@dataclass
class Window:
    """Shard pieces read together, and the micro-batches (shard row indices) they give."""

    pieces: list[int]
    micro_batches: list[list[int]]


@dataclass
class EpochPlan:
    """One rank's epoch: windows in order; micro-batch k of the epoch is the k-th one
    over the windows' lists. ``steps`` is set when the ranks have agreed on it."""

    epoch: int
    windows: list[Window]
    steps: int = 0

    @property
    def num_micro_batches(self) -> int:
        return sum(len(w.micro_batches) for w in self.windows)

    def locate(self, k: int) -> tuple[int, int]:
        """(window, index inside it) of the epoch's k-th micro-batch."""
        for w, win in enumerate(self.windows):
            if k < len(win.micro_batches):
                return w, k
            k -= len(win.micro_batches)
        raise IndexError("micro-batch beyond the epoch")


@dataclass
class RankShard:
    """One rank's pieces; rows are numbered in piece order, then row order."""

    pieces: list[Piece]
    columns: list[str]
    lengths: np.ndarray  # [N] int64
    is_val: np.ndarray  # [N] bool
    piece_rows: np.ndarray  # [P + 1] int64: rows of piece p are [piece_rows[p], piece_rows[p+1])
    row_offsets: np.ndarray = field(init=False)  # [N + 1] token offsets in shard order
    bytes_read: int = 0  # compressed bytes of row groups read so far (index pass included)
    _files: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.row_offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def _open(self, path: str):
        """One open ParquetFile per file: opening re-reads the footer (64 KiB here)."""
        import pyarrow.parquet as pq

        if path not in self._files:
            self._files[path] = pq.ParquetFile(path)
        return self._files[path]

    @classmethod
    def open(
        cls, pieces: list[Piece], columns: list[str], val_share: float = 0.0, seed: int = 0
    ) -> RankShard:
        import pyarrow.parquet as pq

        key = "prompt_id" if "prompt_id" in columns else "row_id"
        lengths, is_val, bounds, nbytes = [], [], [0], 0
        files: dict = {}
        for p in pieces:
            pf = files.get(p.file) or files.setdefault(p.file, pq.ParquetFile(p.file))
            cols = [INDEX_COLUMN] + ([key] if val_share > 0 else [])
            t = p.rows(pf.read_row_group(p.row_group, columns=cols))
            nbytes += _columns_bytes(pf, p.row_group, cols)
            lengths.append(t.column(INDEX_COLUMN).to_numpy().astype(np.int64))
            if val_share > 0:
                keys = t.column(key).to_pylist()
                is_val.append(np.array([is_val_key(str(k), val_share, seed) for k in keys], bool))
            else:
                is_val.append(np.zeros(t.num_rows, bool))
            bounds.append(bounds[-1] + t.num_rows)
        empty = np.zeros(0, np.int64)
        shard = cls(
            pieces=list(pieces),
            columns=list(columns),
            lengths=np.concatenate(lengths) if lengths else empty,
            is_val=np.concatenate(is_val) if is_val else np.zeros(0, bool),
            piece_rows=np.asarray(bounds, np.int64),
        )
        shard.bytes_read = nbytes
        shard._files = files
        return shard

    @property
    def train_rows(self) -> np.ndarray:
        return np.nonzero(~self.is_val)[0]

    def read_pieces(self, piece_ids: list[int], columns: list[str] | None = None) -> RowBlock:
        """The rows of the given pieces, in that order, as one block (checked)."""
        cols = columns or self.columns
        blocks = []
        for p_id in piece_ids:
            p = self.pieces[p_id]
            pf = self._open(p.file)
            t = p.rows(pf.read_row_group(p.row_group, columns=cols))
            self.bytes_read += _columns_bytes(pf, p.row_group, cols)
            block = RowBlock.from_table(t)
            want = self.lengths[self.piece_rows[p_id] : self.piece_rows[p_id + 1]]
            if not np.array_equal(block.lengths(), want):
                raise ScoredDataError(
                    f"{p.file} row group {p.row_group}: column {INDEX_COLUMN} does not match "
                    "the length of input_ids; the scored file is inconsistent (re-score)"
                )
            blocks.append(block)
        return RowBlock.concat(blocks)

    def read_held_out(self) -> RowBlock:
        """This shard's held-out rows (token ids and loss mask only)."""
        has_val = [
            p
            for p in range(len(self.pieces))
            if self.is_val[self.piece_rows[p] : self.piece_rows[p + 1]].any()
        ]
        if not has_val:
            return RowBlock.empty()
        block = self.read_pieces(has_val, ["row_id", "input_ids", "loss_mask"])
        return block.take(np.nonzero(self.is_val[self.rows_of(has_val)])[0])

    def rows_of(self, piece_ids: list[int]) -> np.ndarray:
        """Shard row indices of the given pieces, in that order."""
        return np.concatenate(
            [np.arange(self.piece_rows[p], self.piece_rows[p + 1]) for p in piece_ids]
            or [np.zeros(0, np.int64)]
        )


def _columns_bytes(pf, row_group: int, columns: list[str] | None) -> int:
    """Compressed bytes of a row group's column chunks (all columns when ``columns`` is None)."""
    md = pf.metadata.row_group(row_group)
    total = 0
    for c in range(md.num_columns):
        col = md.column(c)
        if columns is None or col.path_in_schema.split(".")[0] in columns:
            total += col.total_compressed_size
    return total


def epoch_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank])


def plan_epoch(
    shard: RankShard,
    epoch: int,
    rank: int,
    seed: int,
    micro_batch_tokens: int,
    window_tokens: int,
    packing: bool,
    shuffle: bool = True,
) -> EpochPlan:
    """This rank's epoch over its training rows (held-out rows excluded).

    With ``shuffle``, the pieces are visited in a seeded random order and the micro-batches
    of each window are shuffled; without, everything stays in shard order (re-scoring and
    validation passes)."""
    rng = epoch_rng(seed, epoch, rank) if shuffle else None
    P = len(shard.pieces)
    order = rng.permutation(P) if rng is not None else np.arange(P)
    windows: list[Window] = []
    cur: list[int] = []
    acc = 0
    for p in order.tolist():
        cur.append(p)
        acc += shard.pieces[p].tokens
        if acc >= window_tokens:
            windows.append(Window(cur, []))
            cur, acc = [], 0
    if cur:
        windows.append(Window(cur, []))
    for win in windows:
        rows = shard.rows_of(win.pieces)
        rows = rows[~shard.is_val[rows]]
        if rng is not None:
            rows = rows[rng.permutation(len(rows))]
        bins = plan_bins(shard.lengths[rows], micro_batch_tokens, packing)
        win.micro_batches = [rows[b].tolist() for b in bins]
        if rng is not None:
            win.micro_batches = [win.micro_batches[j] for j in rng.permutation(len(bins))]
    return EpochPlan(epoch, [w for w in windows if w.micro_batches])


class WindowReader:
    """Micro-batch rows of an epoch plan, one window in memory at a time.

    ``get(k)`` returns (block, block-local row indices, shard row indices) of the epoch's
    k-th micro-batch, reading its window when it is not the one held; read in order, each
    window is read once."""

    def __init__(self, shard: RankShard, plan: EpochPlan):
        self.shard, self.plan = shard, plan
        self._held: int | None = None
        self._block: RowBlock | None = None
        self._local: dict[int, int] = {}

    def get(self, k: int) -> tuple[RowBlock, list[int], list[int]]:
        w, j = self.plan.locate(k)
        if self._held != w:
            win = self.plan.windows[w]
            self._block = None  # drop the previous window before reading the next
            self._block = self.shard.read_pieces(win.pieces)
            self._local = {int(r): i for i, r in enumerate(self.shard.rows_of(win.pieces))}
            self._held = w
        rows = self.plan.windows[w].micro_batches[j]
        return self._block, [self._local[r] for r in rows], rows
