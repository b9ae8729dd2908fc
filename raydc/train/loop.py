"""The per-worker training loop: its shard, streamed window by window -> steps -> reports.

Each Ray Train worker runs ``train_loop_per_worker``: it opens the pieces of the scored
Parquet the driver assigned to its rank (``raydc.train.shard``), plans each epoch from the
row lengths (every rank takes the same number of steps: the smallest rank's), reads one
window of rows at a time, collates micro-batches (packed by default) and runs
``raydc.train.step.Learner.step`` on them. The data position (epoch, micro-batches
consumed) goes into every checkpoint, so a restarted worker resumes at the exact
micro-batch it stopped at.

Re-scoring rounds (``rescore_every = k`` with ``student_ref=init``): after every k
optimizer steps, each worker re-scores every training row of its shard in-process with the
current weights (no-grad forwards of the same model, window by window) into a per-rank
memory-mapped file on local disk, and uses those log-probs for the weights until the next
round. The file goes into each checkpoint, so a restart resumes with it.

Test hooks and probes come in through parameters, never the environment: ``after_step``
(a callable of ``StepInfo``, e.g. to kill a worker) from ``build_trainer``.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydc.train.data import MicroBatch, RowBlock, collate, plan_bins
from raydc.train.shard import RankShard, WindowReader, plan_epoch
from raydc.train.step import Learner, StepStats

STATE_FILE = "raydc_state.json"
DS_TAG = "ds"

# The training figures the run summary keeps, as this module emits them (raydc.summary
# reads this list; tests/unit/test_cli.py checks that weight_ess arrives).
HEADLINE = (
    "step",
    "loss",
    "val_nll",
    "tokens_per_s",
    "weight_ess",
    "weight_ess_fraction",
    "padding_share",
    "budget_fill",
)


@dataclass(frozen=True)
class StepInfo:
    """What an ``after_step`` hook is told after each optimizer step."""

    step: int
    epoch: int
    rank: int
    world: int
    checkpoint_every: int
    run_dir: str  # Ray Train's run folder (its checkpoint snapshot lives there)


def _all_reduce(values, op: str = "sum"):
    """All-reduce a small float64 vector over the data-parallel group."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(
            t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        )
    return t.tolist()


def _adamw(params, lr: float, weight_decay: float):
    """torch AdamW, its fused kernel where this torch has one for the device (CPU included):
    one pass over the flat ZeRO partition instead of a loop of small kernels."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _flatten_diagnostics(diag: dict) -> dict:
    out = {}
    for k in ("ess", "ess_fraction", "mean", "std", "min", "max", "corr_weight_length"):
        if k in diag:
            out[f"weight_{k}"] = diag[k]
    for k, v in (diag.get("clip_shares") or {}).items():
        out[f"weight_clip_{k}"] = v
    for k, v in (diag.get("mean_by_position") or {}).items():
        out[f"weight_pos_{k}"] = v
    if "histogram" in diag:
        out["weight_histogram"] = diag["histogram"]
    return out


class RescoredLogprobs:
    """Re-scored student log-probs of a shard's rows, on local disk (memory-mapped)."""

    def __init__(self, shard: RankShard, rank: int):
        self.offsets = shard.row_offsets
        self.dir = tempfile.mkdtemp(prefix=f"raydc_rescored_r{rank}_")
        atexit.register(shutil.rmtree, self.dir, ignore_errors=True)
        self.name = f"rescored_rank{rank}.npy"
        self.path = os.path.join(self.dir, self.name)
        self.values = np.lib.format.open_memmap(
            self.path, mode="w+", dtype=np.float32, shape=(int(self.offsets[-1]),)
        )

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


class _Worker:
    """State of one rank: the learner, its shard, the epoch plan and the counters."""

    def __init__(self, config: dict):
        import ray.train
        import ray.train.torch
        import torch

        self.t_entry = time.time()
        self.first_step_s = float("nan")
        self.cfg = config["cfg"]
        self.tc = self.cfg.train
        self.wc = self.cfg.weights
        self.config = config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.on_gpu = self.device.type != "cpu"
        torch.manual_seed(self.tc.seed)
        self.learner = self._build_learner()
        self.shard = RankShard.open(
            config["pieces"][self.rank], config["columns"], self.tc.val_share, self.tc.seed
        )
        self.val = self._read_val() if config.get("has_val") else None
        self.rescored: RescoredLogprobs | None = None
        self.step = 0
        self.epoch = 0
        self.pos = 0  # micro-batches of this epoch already consumed
        self.resumed_from = 0  # the checkpoint step this attempt started from
        self.restored_metrics: dict = {}  # reported with the checkpoint resumed from
        self.last_rows_fp = ""
        self.plan = None
        self.reader: WindowReader | None = None
        self.epoch_dropped_share = 0.0
        self.window = self._new_window()

    # ------------------------------------------------------------------ setup
    def _build_learner(self) -> Learner:
        import deepspeed
        import torch
        from transformers import AutoTokenizer

        from raydc.train.ds_config import build_ds_config, lr_lambda, resolve_precision
        from raydc.train.model import StudentLogprobs, load_student

        student = self.config["student"]
        self.tokenizer = AutoTokenizer.from_pretrained(student)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        # Before the model: ZeRO-3 builds it partitioned, which needs the process group.
        deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo")
        ds_cfg = build_ds_config(self.tc, self.world, self.on_gpu)
        self.precision = resolve_precision(self.tc, self.on_gpu)
        lm = load_student(student, self.tc, self.on_gpu, ds_cfg)
        model = StudentLogprobs(lm, self.tc.loss_chunk_size)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.tc.offload_optimizer and self.on_gpu:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(params, lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        else:
            opt = _adamw(params, lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.tc))
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg, dist_init_required=False
        )
        self.engine = engine
        return Learner(engine, scheduler, self.tc, self.wc, self.world, _all_reduce)

    def _read_val(self) -> RowBlock:
        """This rank's held-out rows (token ids and loss mask only), kept in memory."""
        has_val = [
            p
            for p in range(len(self.shard.pieces))
            if self.shard.is_val[self.shard.piece_rows[p] : self.shard.piece_rows[p + 1]].any()
        ]
        if not has_val:
            return _empty_block()
        block = self.shard.read_pieces(has_val, ["row_id", "input_ids", "loss_mask"])
        rows = self.shard.rows_of(has_val)
        return block.take(np.nonzero(self.shard.is_val[rows])[0])

    # ------------------------------------------------------------------ data plan
    def _plan_epoch(self) -> None:
        tc = self.tc
        self.plan = plan_epoch(
            self.shard,
            self.epoch,
            self.rank,
            tc.seed,
            tc.micro_batch_tokens,
            tc.shuffle_window_tokens,
            tc.packing,
        )
        # Every rank must take the same number of steps (each step has collectives).
        (n_min,) = _all_reduce([self.plan.num_micro_batches], "min")
        self.plan.steps = int(n_min) // tc.grad_accum
        if self.plan.steps == 0:
            raise RuntimeError(
                f"a worker's shard gives {int(n_min)} micro-batches per epoch, fewer than "
                f"train.grad_accum={tc.grad_accum}: lower train.micro_batch_tokens or "
                "grad_accum, use fewer workers, or add data"
            )
        used = self.plan.steps * tc.grad_accum
        mbs = [mb for w in self.plan.windows for mb in w.micro_batches]
        dropped = sum(int(self.shard.lengths[r].sum()) for mb in mbs[used:] for r in mb)
        total = sum(int(self.shard.lengths[r].sum()) for mb in mbs for r in mb)
        g_dropped, g_total = _all_reduce([dropped, total])
        self.epoch_dropped_share = g_dropped / g_total if g_total else 0.0
        self.reader = WindowReader(self.shard, self.plan)

    def _next_micro_batches(self) -> list[MicroBatch]:
        G = self.tc.grad_accum
        if self.pos + G > self.plan.steps * G:
            self.epoch += 1
            self.pos = 0
            self._plan_epoch()
        out, ids = [], []
        for k in range(self.pos, self.pos + G):
            block, local, rows = self.reader.get(k)
            override = None
            if self.rescored is not None:
                override = {i: self.rescored.row(r) for i, r in zip(local, rows)}
            mb = collate(block, local, self.tc.packing, self.pad_id, override)
            out.append(mb.to(self.device))
            ids.extend(mb.row_ids)
        self.last_rows_fp = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]
        self.pos += G
        return out

    # ------------------------------------------------------------------ steps
    def train_step(self) -> StepStats:
        mbs = self._next_micro_batches()
        stats = self.learner.step(mbs, uniform=self.step < self.tc.weight_warmup_steps)
        self.step += 1
        if self.step == self.resumed_from + 1:
            self.first_step_s = time.time() - self.t_entry
        win = self.window
        win["steps"] += 1
        win["loss_local"] += stats.loss
        win["tokens"] += stats.tokens
        win["slots"] += stats.slots
        win["micro_batches"] += len(mbs)
        win["seconds"] += stats.seconds
        win["grad_norm"] = stats.grad_norm
        win["lr"] = stats.lr
        win["last"] = (stats.micro_batches, stats.weights)
        win["rows_fp"] = self.last_rows_fp
        return stats

    @staticmethod
    def _new_window() -> dict:
        return dict(
            steps=0,
            loss_local=0.0,
            tokens=0,
            slots=0,
            micro_batches=0,
            seconds=0.0,
            grad_norm=float("nan"),
            lr=0.0,
            last=None,
            rows_fp="",
        )

    def window_metrics(self) -> dict:
        import torch

        from raydc.weights import weight_diagnostics

        win = self.window
        if win["steps"] == 0 and self.restored_metrics:
            # Nothing trained since the resume (the final checkpoint): its own figures.
            return dict(self.restored_metrics, resumed_from_step=self.resumed_from)
        W = self.world
        mine = np.zeros(2 * W)
        mine[self.rank] = len(self.shard.train_rows)
        mine[W + self.rank] = int(self.shard.lengths[self.shard.train_rows].sum())
        loss_sum, tokens, slots, n_mb, nbytes, *per_rank = _all_reduce(
            [
                win["loss_local"],
                win["tokens"],
                win["slots"],
                win["micro_batches"],
                self.shard.bytes_read,
                *mine.tolist(),
            ]
        )
        seconds, bytes_max, first_s, rss, rchar = _all_reduce(
            [win["seconds"], self.shard.bytes_read, self.first_step_s, *_process_io()], "max"
        )
        n = max(1, win["steps"])
        metrics = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": loss_sum / n,
            "lr": win["lr"],
            "grad_norm": win["grad_norm"],
            "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
            "step_time_s": seconds / n,
            "padding_share": 1.0 - tokens / slots if slots else 0.0,
            # Real tokens over the micro-batches' token budget: how full packing keeps them.
            "budget_fill": tokens / (n_mb * self.tc.micro_batch_tokens) if n_mb else 0.0,
            "packing": self.tc.packing,
            "epoch_dropped_token_share": self.epoch_dropped_share,
            "data_bytes_read_max": bytes_max,  # cumulative, the busiest rank
            "data_bytes_read_total": nbytes,
            # From the worker's start (model load, shard index) to its first step's end.
            "seconds_to_first_step": first_s,
            "worker_peak_rss_mib": rss,
            "worker_rchar_max": rchar,  # every byte the busiest worker read, model included
            "shard_rows_per_rank": [int(x) for x in per_rank[:W]],
            "shard_tokens_per_rank": [int(x) for x in per_rank[W:]],
            "resumed_from_step": self.resumed_from,
            # Rank 0's rows in the last step: equal runs must have seen equal data.
            "rows_fingerprint": win["rows_fp"],
            "weight_source": "uniform (weight warmup)"
            if self.step <= self.tc.weight_warmup_steps
            else self.tc.student_ref,
        }
        if win["last"] is not None:
            # Diagnostics of this rank's micro-batches of the last step (padded together).
            mbs, weights = win["last"]
            T = max(w.shape[1] for w in weights)
            pad = torch.nn.functional.pad
            w_all = torch.cat([pad(w.cpu(), (0, T - w.shape[1])) for w in weights])
            m_all = torch.cat(
                [pad(mb.loss_mask.cpu(), (0, T - w.shape[1])) for mb, w in zip(mbs, weights)]
            )
            metrics.update(_flatten_diagnostics(weight_diagnostics(w_all, m_all, self.wc)))
        if self.val is not None:
            metrics["val_nll"] = self.val_nll()
        self.window = self._new_window()
        return metrics

    def _no_grad_passes(self, block: RowBlock | None, rows: list[list[int]]):
        """Yield (j, micro-batch, logp [B, T-1]) for the micro-batch ``rows[j]`` of
        ``block``'s rows, no grad. Under ZeRO-3 a forward gathers parameters collectively, so every
        rank runs the same number of forwards: a rank with fewer repeats a dummy one."""
        (n_max,) = _all_reduce([len(rows)], "max")
        for j in range(int(n_max)):
            real = j < len(rows)
            if real:
                mb = collate(block, rows[j], self.tc.packing, self.pad_id)
            else:
                mb = self._dummy()
            lp = self.learner.logprobs(mb.to(self.device))
            if real:
                yield j, mb, lp

    def _dummy(self) -> MicroBatch:
        import torch

        ids = torch.full((1, 2), self.pad_id, dtype=torch.long)
        z = torch.zeros((1, 1))
        return MicroBatch(ids, None, z.bool(), z, None, z.long(), None, [], 2, 2)

    def val_nll(self) -> float:
        """Unweighted mean NLL of the held-out teacher tokens, over all ranks."""
        from raydc.loss import weighted_token_loss

        bins = plan_bins(self.val.lengths(), self.tc.micro_batch_tokens, self.tc.packing)
        nll, tok = 0.0, 0.0
        for _, mb, lp in self._no_grad_passes(self.val, bins):
            m = mb.loss_mask.to(lp.device)
            nll += float(weighted_token_loss(-lp, None, m, "none", denominator=1.0))
            tok += float(m.sum())
        g_nll, g_tok = _all_reduce([nll, tok])
        return g_nll / g_tok if g_tok > 0 else float("nan")

    def rescore(self) -> None:
        """Replace this shard's training rows' student log-probs by the current model's."""
        if self.rescored is None:
            self.rescored = RescoredLogprobs(self.shard, self.rank)
        plan = plan_epoch(
            self.shard,
            0,
            self.rank,
            0,
            self.tc.micro_batch_tokens,
            self.tc.shuffle_window_tokens,
            self.tc.packing,
            shuffle=False,
        )
        (n_windows,) = _all_reduce([len(plan.windows)], "max")
        for w in range(int(n_windows)):
            if w < len(plan.windows):
                win = plan.windows[w]
                block = self.shard.read_pieces(win.pieces)
                local = {int(r): i for i, r in enumerate(self.shard.rows_of(win.pieces))}
                bins = [[local[r] for r in mb] for mb in win.micro_batches]
            else:
                win, block, bins = None, None, []
            for j, mb, lp in self._no_grad_passes(block, bins):
                lp = lp.cpu()
                lp_rows = lp if mb.layout is None else mb.layout.to_rows(lp)
                for k, r in enumerate(win.micro_batches[j]):
                    L = int(self.shard.lengths[r])
                    vals = self.rescored.row(r)
                    vals[0] = 0.0
                    vals[1:] = lp_rows[k, : L - 1].numpy()

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt_dir: str, metrics: dict | None = None) -> None:
        state = dict(
            step=self.step,
            epoch=self.epoch,
            pos=self.pos,
            world=self.world,
            shard_rows=int(len(self.shard.lengths)),
            # The figures reported with this checkpoint: a run resumed from its final
            # checkpoint takes no step, and reports these instead of an empty window.
            metrics=metrics or {},
        )
        self.engine.save_checkpoint(ckpt_dir, tag=DS_TAG, client_state={"raydc": state})
        if self.rescored is not None:
            self.rescored.save(ckpt_dir)
        if self.rank == 0:
            (Path(ckpt_dir) / STATE_FILE).write_text(json.dumps(state))

    def load(self, ckpt_dir: str) -> None:
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
        if state["world"] != self.world:
            raise RuntimeError(
                f"checkpoint {ckpt_dir} was written by {state['world']} workers; this run has "
                f"{self.world} (DeepSpeed ZeRO checkpoints are per rank)"
            )
        self.engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_module_strict=True)
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.resumed_from = self.step
        self.restored_metrics = state.get("metrics") or {}
        if (Path(ckpt_dir) / f"rescored_rank{self.rank}.npy").exists():
            self.rescored = RescoredLogprobs(self.shard, self.rank)
            self.rescored.load(ckpt_dir)

    def export(self, model_dir: str) -> None:
        """Full weights (gathered under ZeRO-3) -> save_pretrained + tokenizer, on rank 0."""
        import deepspeed
        import torch

        lm = self.engine.module.lm
        state = {}
        for name, p in lm.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.rank == 0:
                    state[name] = p.detach().to("cpu", copy=True)
        if self.rank == 0:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(self.config["student"])
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
                self.precision, torch.float32
            )
            with torch.device("meta"):
                fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
            fresh.load_state_dict(state, strict=False, assign=True)
            missing = [n for n, _ in fresh.named_parameters() if n not in state]
            if missing:
                raise RuntimeError(f"export: parameters missing from the gathered state: {missing}")
            fresh.config.dtype = dtype
            fresh.save_pretrained(model_dir, safe_serialization=True)
            self.tokenizer.save_pretrained(model_dir)


def _process_io() -> tuple[float, float]:
    """(peak RSS in MiB, bytes read by read calls: /proc/self/io rchar, NaN elsewhere)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open("/proc/self/io") as f:
            rchar = float(next(x for x in f if x.startswith("rchar")).split()[1])
    except (OSError, StopIteration):
        rchar = float("nan")
    return rss, rchar


def _empty_block() -> RowBlock:
    z = np.zeros(0, np.int32)
    return RowBlock(
        [],
        np.zeros(1, np.int64),
        z,
        z.astype(bool),
        z,
        z.astype(np.float32),
        None,
        np.zeros(0, bool),
    )


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (see the module docstring)."""
    if not config.get("use_gpu"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from raydc.models import offline_env

    offline_env()
    import ray.train

    w = _Worker(config)
    tc = w.tc
    after_step = config.get("after_step")
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            w.load(d)
    w._plan_epoch()  # the epoch we stopped in, re-planned; pos skips what it consumed

    def report(final: bool = False) -> None:
        metrics = w.window_metrics()
        do_ckpt = final or (w.step % tc.checkpoint_every == 0)
        if not do_ckpt:
            ray.train.report(metrics)
            return
        tmp = tempfile.mkdtemp(prefix=f"raydc_ckpt_r{w.rank}_")
        try:
            w.save(tmp, metrics)
            if final:
                w.export(os.path.join(tmp, "model"))
            metrics["final"] = final
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"step_{w.step:08d}",
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    info = dict(
        rank=w.rank, world=w.world, checkpoint_every=tc.checkpoint_every, run_dir=config["run_dir"]
    )
    while w.step < tc.max_steps:
        w.train_step()
        if after_step is not None:
            after_step(StepInfo(step=w.step, epoch=w.epoch, **info))
        if tc.rescore_every and w.step % tc.rescore_every == 0 and w.step < tc.max_steps:
            w.rescore()
        if w.step == tc.max_steps:
            break
        if w.step % tc.log_every == 0 or w.step % tc.checkpoint_every == 0:
            report()
    report(final=True)


def wait_for_checkpoint(run_dir: str, step: int, timeout: float = 120.0) -> bool:
    """Block until Ray Train has recorded the checkpoint of ``step`` (``step_<8-digit step>`` in
    its checkpoint snapshot). Ray Train registers a report when its controller next polls
    the workers, so a worker that dies right after reporting can take the report with it;
    fault-injection hooks wait on this before they kill a worker."""
    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if snapshot.exists() and f"step_{step:08d}" in snapshot.read_text():
            return True
        time.sleep(0.5)
    return False
