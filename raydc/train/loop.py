"""The per-worker training loop: its shard, streamed window by window -> steps -> reports.

Each Ray Train worker runs ``train_loop_per_worker``: it opens the pieces of the scored
Parquet the driver assigned to its rank (``raydc.train.shard``), plans each epoch from the
row lengths (every rank takes the same number of steps: the smallest rank's), reads one
window of rows at a time, collates micro-batches (packed by default) and runs
``raydc.train.step.Learner.step`` on them. The data position (epoch, micro-batches
consumed) goes into every checkpoint, so a restarted worker resumes at the exact
micro-batch it stopped at.

Re-scoring rounds (``rescore_every``) and the held-out NLL are no-grad passes of the same
model (``raydc.train.rescore``); the re-scored log-probs go into each checkpoint too.

LoRA (``train.lora``): the model is PEFT's, only the adapters are trainable, and the
checkpoints hold the adapters' weights and optimizer state alone (the frozen base comes
from the student folder again on a resume); the final checkpoint holds the merged model
(``model/``) and the adapter (``adapter/``).

Test hooks and probes come in through parameters, never the environment: ``after_step``
(a callable of ``StepInfo``, e.g. to kill a worker) from ``build_trainer``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raydc.train.batch import MicroBatch, collate
from raydc.train.metrics import StepWindow, optimizer_state_bytes, process_io, weight_metrics
from raydc.train.rescore import RescoredLogprobs, held_out_nll, rescore_shard
from raydc.train.shard import RankShard, WindowReader, plan_epoch
from raydc.train.step import Learner, StepStats

if TYPE_CHECKING:
    from raydc.config import RaydcConfig

STATE_FILE = "raydc_state.json"
DS_TAG = "ds"

# The training figures the run summary keeps, as this module emits them (raydc.pipeline.summary
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
class WorkerConfig:
    """What the driver hands every training worker (``train_loop_config["worker"]``, the
    dataclass itself across the Ray boundary): the config, the student to load, the scored
    columns to read, each rank's pieces of the store, the run folder and the test hook."""

    cfg: RaydcConfig
    student: str
    columns: list[str]
    pieces: list  # per rank: the (file, row group) pieces of its shard (raydc.train.shard)
    run_dir: str  # Ray Train's run folder (its checkpoint snapshot)
    after_step: Callable[[StepInfo], None] | None = None

    @classmethod
    def of(cls, config: dict) -> WorkerConfig:
        return config[WORKER_KEY]


WORKER_KEY = "worker"


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


def adamw(params, lr: float, weight_decay: float):
    """torch AdamW, its fused kernel where this torch has one for the device (CPU included):
    one pass over the flat ZeRO partition instead of a loop of small kernels."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class Worker:
    """State of one rank: the learner, its shard, the epoch plan and the counters."""

    def __init__(self, config: dict):
        import ray.train
        import ray.train.torch
        import torch

        self.t_entry = time.time()
        self.first_step_s = float("nan")
        self.config = WorkerConfig.of(config)
        self.cfg = self.config.cfg
        self.tc = self.cfg.train
        self.wc = self.cfg.weights
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.on_gpu = self.device.type != "cpu"
        # Ray sets OMP_NUM_THREADS to an actor's CPUs only when it starts the process; a
        # reused worker keeps the thread count it started with, and a different count
        # changes the order of float sums. The worker's CPU ops run on its reserved CPUs.
        torch.set_num_threads(max(1, int(self.tc.cpus_per_worker)))
        self.threads = torch.get_num_threads()
        torch.manual_seed(self.tc.seed)
        self.learner = self._build_learner()
        self.shard = RankShard.open(
            self.config.pieces[self.rank], self.config.columns, self.tc.val_share, self.tc.seed
        )
        self.val = self.shard.read_held_out() if self.tc.val_share > 0 else None
        self.rescored: RescoredLogprobs | None = None
        self.step = 0
        self.epoch = 0
        self.pos = 0  # micro-batches of this epoch already consumed
        self.resumed_from = 0  # the checkpoint step this attempt started from
        self.resumed_path: str | None = None  # that checkpoint, as Ray Train names it
        self.resumed_model = False  # whether it holds the exported model (a final one)
        self.restored_metrics: dict = {}  # reported with the checkpoint resumed from
        self.warm_started_from: int | None = None  # the previous DASD phase's last step
        self.last_rows_fp = ""
        self.plan = None
        self.reader: WindowReader | None = None
        self.epoch_dropped_share = 0.0
        self.window = StepWindow()

    # ------------------------------------------------------------------ setup
    def _build_learner(self) -> Learner:
        import deepspeed
        import torch
        from transformers import AutoTokenizer

        from raydc.train.ds_config import build_ds_config, lr_lambda, resolve_precision
        from raydc.train.model import StudentLogprobs, load_student, trainable_counts

        student = self.config.student
        self.tokenizer = AutoTokenizer.from_pretrained(student)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        # Before the model: ZeRO-3 builds it partitioned, which needs the process group.
        deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo")
        ds_cfg = build_ds_config(self.tc, self.world, self.on_gpu)
        self.precision = resolve_precision(self.tc, self.on_gpu)
        lm = load_student(student, self.tc, self.on_gpu, ds_cfg)
        self.trainable_params, self.params = trainable_counts(lm)
        model = StudentLogprobs(lm, self.tc.loss_chunk_size)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.tc.offload_optimizer and self.on_gpu:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(params, lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        else:
            opt = adamw(params, lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.tc))
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg, dist_init_required=False
        )
        self.engine = engine
        return Learner(engine, scheduler, self.tc, self.wc, self.world, _all_reduce)

    # ------------------------------------------------------------------ data plan
    def plan_current_epoch(self) -> None:
        """Plan the epoch ``self.epoch``; ``self.pos`` says how much of it was consumed."""
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
            self.plan_current_epoch()
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
        import torch

        mbs = self._next_micro_batches()
        # Dropout (LoRA's, train.lora.dropout) draws from a generator seeded by the run's
        # seed, the step and the rank: a resumed run draws the masks the first attempt drew.
        seed = np.random.SeedSequence([self.tc.seed, self.step, self.rank]).generate_state(1)
        torch.manual_seed(int(seed[0]))
        stats = self.learner.step(mbs, uniform=self.step < self.tc.weight_warmup_steps)
        self.step += 1
        if self.step == self.resumed_from + 1:
            self.first_step_s = time.time() - self.t_entry
        self.window.add(stats, self.last_rows_fp)
        return stats

    def window_metrics(self) -> dict:
        """The figures of the steps since the last report, over all ranks; starts a new window."""
        win = self.window
        if win.steps == 0 and self.restored_metrics:
            # Nothing trained since the resume (the final checkpoint): its own figures.
            return dict(self.restored_metrics, resumed_from_step=self.resumed_from)
        W = self.world
        mine = np.zeros(2 * W)
        mine[self.rank] = len(self.shard.train_rows)
        mine[W + self.rank] = int(self.shard.lengths[self.shard.train_rows].sum())
        loss_sum, tokens, slots, n_mb, nbytes, *per_rank = _all_reduce(
            [win.loss, win.tokens, win.slots, win.micro_batches, self.shard.bytes_read]
            + mine.tolist()
        )
        seconds, bytes_max, first_s, rss, rchar, opt_bytes = _all_reduce(
            [
                win.seconds,
                self.shard.bytes_read,
                self.first_step_s,
                *process_io(),
                optimizer_state_bytes(self.engine.optimizer, self.engine.module),
            ],
            "max",
        )
        n = max(1, win.steps)
        metrics = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": loss_sum / n,
            "lr": win.lr,
            "grad_norm": win.grad_norm,
            "tokens": int(tokens),  # the window's real tokens, all ranks
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
            "torch_threads": self.threads,  # each worker's intra-op threads (cpus_per_worker)
            # Adam moments + fp32 master copies, the busiest rank's (LoRA: the adapters' only)
            "optimizer_state_mib": opt_bytes / 2**20,
            "trainable_params": self.trainable_params,
            "params": self.params,
            "worker_rchar_max": rchar,  # every byte the busiest worker read, model included
            "shard_rows_per_rank": [int(x) for x in per_rank[:W]],
            "shard_tokens_per_rank": [int(x) for x in per_rank[W:]],
            "resumed_from_step": self.resumed_from,
            "init_checkpoint_step": self.warm_started_from,
            # Rank 0's rows in the last step: equal runs must have seen equal data.
            "rows_fingerprint": win.rows_fingerprint,
            "weight_source": "uniform (weight warmup)"
            if self.step <= self.tc.weight_warmup_steps
            else self.tc.student_ref,
        }
        if win.last is not None:
            metrics.update(weight_metrics(win.last, self.wc))
        if self.val is not None:
            metrics["val_nll"] = held_out_nll(self.learner, self.val, self.pad_id, self.device)
        self.window = StepWindow()
        return metrics

    def rescore(self) -> None:
        """Replace this shard's training rows' student log-probs by the current model's."""
        if self.rescored is None:
            self.rescored = RescoredLogprobs(self.shard, self.rank)
        rescore_shard(self.learner, self.shard, self.rank, self.rescored, self.pad_id, self.device)

    # ------------------------------------------------------------------ checkpoints
    def report(self, final: bool = False) -> None:
        """Report the window's metrics to Ray Train, with a checkpoint every
        ``checkpoint_every`` steps and at the end (the final one holds the exported model),
        except at the end of a run resumed from its final checkpoint: that one stays."""
        import ray.train

        metrics = self.window_metrics()
        if not final and self.step % self.tc.checkpoint_every != 0:
            ray.train.report(metrics)
            return
        name = f"step_{self.step:08d}"
        resumed_here = self.resumed_path is not None and self.step == self.resumed_from
        if final and resumed_here:
            # Nothing trained since the resume. Reported again under its own folder name,
            # the checkpoint would be a second entry for one folder in Ray Train's list,
            # and Ray, keeping the newest keep_checkpoints entries, deletes the folder
            # with the older entry. The final checkpoint stays the result (its exported
            # model is copied out of it); ``checkpoint_path`` is what Tune's report
            # callback adds for a checkpoint.
            (has_model,) = _all_reduce([float(self.resumed_model)], "min")
            if has_model:
                metrics.update(final=True, checkpoint_path=self.resumed_path)
                ray.train.report(metrics)
                return
            if name == Path(self.resumed_path).name:  # no model in it: export anew, beside it
                name += "_export"
        tmp = tempfile.mkdtemp(prefix=f"raydc_ckpt_r{self.rank}_")
        try:
            self.save(tmp, metrics)
            if final:
                self.export(os.path.join(tmp, "model"), os.path.join(tmp, "adapter"))
            metrics["final"] = final
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def save(self, ckpt_dir: str, metrics: dict | None = None) -> None:
        state = dict(
            step=self.step,
            epoch=self.epoch,
            pos=self.pos,
            world=self.world,
            shard_rows=int(len(self.shard.lengths)),
            # the previous DASD phase's last step this run started from: a resumed run
            # reports it too
            init_checkpoint_step=self.warm_started_from,
            # The figures reported with this checkpoint: a run resumed from its final
            # checkpoint takes no step, and reports these instead of an empty window.
            metrics=metrics or {},
            lora=self._lora_state(),
        )
        # Under LoRA the frozen base is the student folder's: only the adapters are saved.
        self.engine.save_checkpoint(
            ckpt_dir,
            tag=DS_TAG,
            client_state={"raydc": state},
            exclude_frozen_parameters=self.tc.lora.enabled,
        )
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
        saved = state.get("lora")
        if saved != self._lora_state():
            raise RuntimeError(
                f"checkpoint {ckpt_dir} was written with train.lora={saved}; this run has "
                f"train.lora={self._lora_state()} (resume with the settings it was written "
                "with, or train into a new output folder)"
            )
        # A LoRA checkpoint holds the adapters only (the base is loaded from the student):
        # the module load is not strict then; the settings check above stands in for it.
        self.engine.load_checkpoint(
            ckpt_dir, tag=DS_TAG, load_module_strict=not self.tc.lora.enabled
        )
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.resumed_from = self.step
        self.warm_started_from = state.get("init_checkpoint_step")
        self.restored_metrics = state.get("metrics") or {}
        if (Path(ckpt_dir) / RescoredLogprobs.file_name(self.rank)).exists():
            self.rescored = RescoredLogprobs(self.shard, self.rank)
            self.rescored.load(ckpt_dir)

    def warm_start(self, ckpt_dir: str) -> None:
        """Weights and optimizer state of another run's checkpoint (the previous DASD
        phase); the step count, data position and learning-rate schedule start
        anew, as a phase trained with the same settings from there would."""
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
        if state["world"] != self.world:
            raise RuntimeError(
                f"train.init_checkpoint={ckpt_dir}: written by {state['world']} workers; this "
                f"phase has {self.world} (DeepSpeed ZeRO checkpoints are per rank: keep "
                "train.num_workers across phases, or set the phase's optimizer: fresh)"
            )
        if state.get("lora") or self.tc.lora.enabled:
            # This run's student is the previous phase's merged model (the config refuses
            # this for phases; here for a hand-set init_checkpoint).
            raise RuntimeError(
                f"train.init_checkpoint={ckpt_dir}: carries weights and optimizer state, and "
                "a LoRA run on either side would apply the earlier adapter twice or mismatch "
                "the optimizer's parameters; start from the exported model (train.student) "
                "without init_checkpoint"
            )
        self.engine.load_checkpoint(
            ckpt_dir, tag=DS_TAG, load_module_strict=True, load_lr_scheduler_states=False
        )
        # The loaded optimizer holds the previous phase's last learning rate; this phase's
        # schedule starts at its own step 0.
        for group, lr in zip(
            self.engine.optimizer.param_groups, self.learner.scheduler.get_last_lr()
        ):
            group["lr"] = lr
        self.warm_started_from = int(state["step"])

    def export(self, model_dir: str, adapter_dir: str) -> None:
        """Full weights (gathered under ZeRO-3) -> ``raydc.train.model.write_export`` on rank 0:
        save_pretrained + tokenizer; under LoRA the merged model and PEFT's adapter."""
        import deepspeed
        import torch

        from raydc.train.model import write_export

        lm = self.engine.module.lm
        state = {}
        for name, p in lm.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.rank == 0:
                    state[name] = p.detach().to("cpu", copy=True)
        if self.rank == 0:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
                self.precision, torch.float32
            )
            write_export(
                state, self.config.student, self.tc, dtype, self.tokenizer, model_dir, adapter_dir
            )

    def _lora_state(self) -> dict | None:
        """The LoRA settings a checkpoint's weights belong to (None: full fine-tuning)."""
        return dataclasses.asdict(self.tc.lora) if self.tc.lora.enabled else None


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: resume from the last checkpoint if there is one, train to
    ``train.max_steps`` (re-scoring every ``rescore_every`` steps), report every
    ``log_every`` steps and checkpoint every ``checkpoint_every``; the final report's
    checkpoint holds the exported model."""
    spec = WorkerConfig.of(config)
    if not spec.cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from raydc.infra.models import offline_env

    offline_env()
    import ray.train

    w = Worker(config)
    tc = w.tc
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            w.load(d)
            w.resumed_path = ckpt.path
            w.resumed_model = (Path(d) / "model").is_dir()
    elif tc.init_checkpoint:  # a DASD phase: where the previous one left off
        w.warm_start(tc.init_checkpoint)
    w.plan_current_epoch()  # the epoch we stopped in, re-planned; pos skips what it consumed
    while w.step < tc.max_steps:
        w.train_step()
        if spec.after_step is not None:
            spec.after_step(
                StepInfo(w.step, w.epoch, w.rank, w.world, tc.checkpoint_every, spec.run_dir)
            )
        if tc.rescore_every and w.step % tc.rescore_every == 0 and w.step < tc.max_steps:
            w.rescore()
        if w.step == tc.max_steps:
            break
        if w.step % tc.log_every == 0 or w.step % tc.checkpoint_every == 0:
            w.report()
    w.report(final=True)


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
