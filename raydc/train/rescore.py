"""No-grad passes of the model being trained: re-scoring rounds and the held-out NLL.

Re-scoring (``rescore_every = k`` with ``student_ref=init``): after every k optimizer
steps, each worker re-scores every training row of its shard in-process with the current
weights (no-grad forwards of the same model, window by window) into a per-rank
memory-mapped file on local disk (``RescoredLogprobs``), and uses those log-probs for the
weights until the next round. The file goes into each checkpoint, so a restart resumes
with it.

Under ZeRO-3 a forward gathers parameters collectively, so every rank runs the same number
of forwards (``no_grad_passes``): a rank with fewer repeats a dummy one.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import torch

from raydc.train.batch import MicroBatch, RowBlock, collate, plan_bins
from raydc.train.shard import RankShard, plan_epoch
from raydc.train.step import Learner


class RescoredLogprobs:
    """Re-scored student log-probs of a shard's rows, on local disk (memory-mapped)."""

    def __init__(self, shard: RankShard, rank: int):
        self.offsets = shard.row_offsets
        self.dir = tempfile.mkdtemp(prefix=f"raydc_rescored_r{rank}_")
        atexit.register(shutil.rmtree, self.dir, ignore_errors=True)
        self.name = self.file_name(rank)
        self.path = os.path.join(self.dir, self.name)
        self.values = np.lib.format.open_memmap(
            self.path, mode="w+", dtype=np.float32, shape=(int(self.offsets[-1]),)
        )

    @staticmethod
    def file_name(rank: int) -> str:
        """Its file in a checkpoint folder."""
        return f"rescored_rank{rank}.npy"

    def row(self, r: int) -> np.ndarray:
        return self.values[self.offsets[r] : self.offsets[r + 1]]

    def save(self, ckpt_dir: str) -> None:
        self.values.flush()
        shutil.copyfile(self.path, os.path.join(ckpt_dir, self.name))

    def load(self, ckpt_dir: str) -> None:
        src = os.path.join(ckpt_dir, self.name)
        got = np.load(src, mmap_mode="r")
        if got.shape != self.values.shape:
            raise RuntimeError(
                f"{src}: {got.shape[0]} re-scored tokens, the shard has {self.values.shape[0]}"
            )
        self.values[:] = got
        self.values.flush()


def no_grad_passes(
    learner: Learner, block: RowBlock | None, bins: list[list[int]], pad_id: int, device
) -> Iterator[tuple[int, MicroBatch, torch.Tensor]]:
    """Yield (j, micro-batch, logp [B, T-1]) for the micro-batch of ``block``'s rows
    ``bins[j]``, no grad, every rank running as many forwards as the busiest."""
    (n_max,) = learner.all_reduce([len(bins)], "max")
    for j in range(int(n_max)):
        real = j < len(bins)
        mb = collate(block, bins[j], learner.tc.packing, pad_id) if real else _dummy(pad_id)
        lp = learner.logprobs(mb.to(device))
        if real:
            yield j, mb, lp


def _dummy(pad_id: int) -> MicroBatch:
    ids = torch.full((1, 2), pad_id, dtype=torch.long)
    z = torch.zeros((1, 1))
    return MicroBatch(ids, None, z.bool(), z, None, z.long(), None, [], 2, 2)


def held_out_nll(learner: Learner, val: RowBlock, pad_id: int, device) -> float:
    """Unweighted mean NLL of the held-out teacher tokens, over all ranks."""
    from raydc.method.loss import weighted_token_loss

    tc = learner.tc
    bins = plan_bins(val.lengths(), tc.micro_batch_tokens, tc.packing)
    nll, tok = 0.0, 0.0
    for _, mb, lp in no_grad_passes(learner, val, bins, pad_id, device):
        m = mb.loss_mask.to(lp.device)
        nll += float(weighted_token_loss(-lp, None, m, "none", denominator=1.0))
        tok += float(m.sum())
    g_nll, g_tok = learner.all_reduce([nll, tok], "sum")
    return g_nll / g_tok if g_tok > 0 else float("nan")


def rescore_shard(
    learner: Learner, shard: RankShard, rank: int, into: RescoredLogprobs, pad_id: int, device
) -> None:
    """Write the current model's log-probs of ``shard``'s training rows ``into`` the store."""
    tc = learner.tc
    plan = plan_epoch(
        shard,
        0,
        rank,
        0,
        tc.micro_batch_tokens,
        tc.shuffle_window_tokens,
        tc.packing,
        shuffle=False,
    )
    (n_windows,) = learner.all_reduce([len(plan.windows)], "max")
    for w in range(int(n_windows)):
        if w < len(plan.windows):
            win = plan.windows[w]
            block = shard.read_pieces(win.pieces)
            local = {int(r): i for i, r in enumerate(shard.rows_of(win.pieces))}
            bins = [[local[r] for r in mb] for mb in win.micro_batches]
        else:
            win, block, bins = None, None, []
        for j, mb, lp in no_grad_passes(learner, block, bins, pad_id, device):
            lp = lp.cpu()
            lp_rows = lp if mb.layout is None else mb.layout.to_rows(lp)
            for k, r in enumerate(win.micro_batches[j]):
                L = int(shard.lengths[r])
                vals = into.row(r)
                vals[0] = 0.0
                vals[1:] = lp_rows[k, : L - 1].numpy()
