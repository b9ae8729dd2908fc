"""The per-worker training loop: shard -> micro-batches -> weights -> global loss -> step.

Each Ray Train worker runs ``train_loop_per_worker``. Per optimizer step a worker takes
``grad_accum`` micro-batches, computes their weights (``raydc.weights.compute_weights``)
from the stored student log-probs (``student_ref=init``, optionally refreshed by
re-scoring rounds) or from its own live forward pass, detached (``student_ref=current``),
and all-reduces the local denominators (``raydc.loss.loss_denominators``) so the loss is
normalised over the *global* batch: every rank and every micro-batch of the step.

Gradient scale: DeepSpeed divides each micro-batch loss by ``grad_accum`` and averages
gradients over the ``world`` ranks, so the gradient it steps with is
``1 / (world * grad_accum) * sum grad(local_loss)``. Each micro-batch's local loss is
``sum(w m l) / D_global * world * grad_accum``; the sum of their gradients then equals the
gradient of the global loss ``sum_all(w m l) / D_global``, whatever the number of workers
or accumulation steps (tests/integration/test_train.py checks 1 vs 2 workers).

Re-scoring rounds (``rescore_every = k`` with ``student_ref=init``): after every k
optimizer steps, each worker re-scores all rows of its shard in-process with the current
weights (a no-grad forward of the same model, chunked head) and uses those log-probs for
the weights until the next round. The refreshed log-probs go into checkpoints, so a
restart resumes with them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from raydc.train.data import (
    Row,
    collate,
    epoch_rng,
    owner_rank,
    plan_micro_batches,
    rows_from_table,
)

STATE_FILE = "raydc_state.json"
DS_TAG = "ds"


def _read_shard(name: str, rank: int, world: int) -> list[Row]:
    """This rank's rows of dataset ``name``, sorted by row id.

    Ray Data hands every worker the whole (materialised) dataset; a row belongs to the rank
    given by a hash of its row id. Which rows a rank holds, and their order, then depend on
    nothing but the row ids: not on block order, task timing or how a split balanced blocks,
    so a restarted worker, or a rerun, sees exactly the same shard.
    """
    import ray.train

    it = ray.train.get_dataset_shard(name)
    rows: list[Row] = []
    if it is None:
        return rows
    for table in it.iter_batches(batch_size=1024, batch_format="pyarrow"):
        ids = table.column("row_id").to_pylist()
        keep = [owner_rank(str(r), world) == rank for r in ids]
        if any(keep):
            import pyarrow as pa

            rows.extend(rows_from_table(table.filter(pa.array(keep))))
    rows.sort(key=lambda r: r.row_id)
    return rows


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


class _Worker:
    """State of one rank: the engine, its shard, the epoch plan and the counters."""

    def __init__(self, config: dict):
        import torch

        self.cfg = config["cfg"]
        self.tc = self.cfg.train
        self.wc = self.cfg.weights
        self.config = config
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.on_gpu = self.device.type != "cpu"
        torch.manual_seed(self.tc.seed)
        self._build_engine()
        self.rows = _read_shard("train", self.rank, self.world)
        self.val_rows = _read_shard("val", self.rank, self.world) if config.get("has_val") else []
        self.rescored: list[np.ndarray] | None = None
        self.step = 0
        self.epoch = 0
        self.pos = 0  # micro-batches of this epoch already consumed
        self.resumed_from = 0  # the checkpoint step this attempt started from
        self.last_rows_fp = ""
        self.window = self._new_window()

    # ------------------------------------------------------------------ setup
    def _build_engine(self) -> None:
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from raydc.train.ds_config import build_ds_config, lr_lambda, resolve_precision
        from raydc.train.model import StudentLogprobs

        student = self.config["student"]
        self.tokenizer = AutoTokenizer.from_pretrained(student)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        lm = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        lm.config.use_cache = False
        self.model = StudentLogprobs(lm, self.tc.loss_chunk_size)
        ds_cfg = build_ds_config(self.tc, self.world, self.on_gpu)
        self.precision = resolve_precision(self.tc, self.on_gpu)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.tc.offload_optimizer and self.on_gpu:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(params, lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        else:
            opt = _adamw(params, lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.tc))
        deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo")
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            optimizer=opt,
            lr_scheduler=sched,
            config=ds_cfg,
            dist_init_required=False,
        )

    # ------------------------------------------------------------------ data plan
    def _plan_epoch(self) -> None:
        lengths = [len(r) for r in self.rows]
        rng = epoch_rng(self.tc.seed, self.epoch, self.rank)
        self.plan = plan_micro_batches(lengths, self.tc.micro_batch_tokens, rng)
        # Every rank must take the same number of steps (each step has collectives).
        (n_min,) = _all_reduce([len(self.plan)], "min")
        self.steps_per_epoch = int(n_min) // self.tc.grad_accum
        if self.steps_per_epoch == 0:
            raise RuntimeError(
                f"a worker's shard gives {int(n_min)} micro-batches per epoch, fewer than "
                f"train.grad_accum={self.tc.grad_accum}: lower train.micro_batch_tokens or "
                "grad_accum, use fewer workers, or add data"
            )

    def _next_micro_batches(self) -> list[dict]:
        if self.pos + self.tc.grad_accum > self.steps_per_epoch * self.tc.grad_accum:
            self.epoch += 1
            self.pos = 0
            self._plan_epoch()
        out = []
        step_plan = self.plan[self.pos : self.pos + self.tc.grad_accum]
        ids = [self.rows[i].row_id for b in step_plan for i in b]
        self.last_rows_fp = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]
        for idxs in step_plan:
            rows = [self.rows[i] for i in idxs]
            lps = [self.rescored[i] for i in idxs] if self.rescored is not None else None
            mb = collate(rows, self.pad_id, lps)
            out.append(mb)
        self.pos += self.tc.grad_accum
        return out

    def _to_device(self, mb: dict) -> dict:
        return {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in mb.items()}

    # ------------------------------------------------------------------ maths
    def _weights(self, mb: dict, live_lp=None):
        """Weights [B, T-1] of the targets input_ids[:, 1:] (detached)."""
        import torch

        from raydc.weights import compute_weights

        m = mb["loss_mask"][:, 1:]
        if self.step < self.tc.weight_warmup_steps:
            return m.to(torch.float32)
        if self.tc.student_ref == "current":
            s = live_lp.detach().float()
        else:
            s = mb["student_logprobs"][:, 1:]
        t = mb["teacher_logprobs"][:, 1:] if mb["teacher_logprobs"] is not None else None
        return compute_weights(s, t, m, self.wc, sentence_ids=mb["sentence_ids"][:, 1:])

    def _forward(self, mb: dict):
        # No attention mask: ``collate`` right-pads, so under causal attention no real token
        # sees a pad, and pads' outputs are off the loss mask. Without a mask the attention
        # takes its fused causal path instead of materialising a [B, 1, T, T] mask.
        return self.engine(mb["input_ids"], None)

    def train_step(self) -> dict:
        import torch

        from raydc.loss import loss_denominators, weighted_token_loss

        t0 = time.perf_counter()
        G = self.tc.grad_accum
        mbs = [self._to_device(mb) for mb in self._next_micro_batches()]
        live = [None] * G
        if self.tc.student_ref == "current" and self.step >= self.tc.weight_warmup_steps:
            if G == 1:
                live[0] = self._forward(mbs[0])  # kept with its graph for the backward
            else:
                # The denominator needs every micro-batch's weights before the first
                # backward: one extra no-grad forward per micro-batch (same parameters).
                with torch.no_grad():
                    live = [self._forward(mb) for mb in mbs]
        weights = [self._weights(mb, lp) for mb, lp in zip(mbs, live)]
        tok, wsum = 0.0, 0.0
        for mb, w in zip(mbs, weights):
            d = loss_denominators(w, mb["loss_mask"][:, 1:])
            tok += float(d["tokens"])
            wsum += float(d["weight_sum"])
        g_tok, g_wsum = _all_reduce([tok, wsum])
        denom = g_wsum if self.wc.normalization == "self_norm" else g_tok
        scale = self.world * G
        lr = float(self.scheduler.get_last_lr()[0])
        loss_local = 0.0
        for i, (mb, w) in enumerate(zip(mbs, weights)):
            logp = live[i] if (G == 1 and live[i] is not None) else self._forward(mb)
            loss = weighted_token_loss(
                -logp.float(),
                w,
                mb["loss_mask"][:, 1:],
                self.wc.normalization,
                denominator=denom,
            )
            loss_local += float(loss.detach())
            self.engine.backward(loss * scale)
            self.engine.step()
        self.step += 1
        gn = self.engine.get_global_grad_norm()
        dt = time.perf_counter() - t0
        win = self.window
        win["steps"] += 1
        win["loss_local"] += loss_local
        win["tokens"] += sum(mb["tokens"] for mb in mbs)
        win["slots"] += sum(mb["slots"] for mb in mbs)
        win["loss_tokens"] += tok
        win["seconds"] += dt
        win["grad_norm"] = float(gn) if gn is not None else float("nan")
        win["lr"] = lr
        win["last"] = (mbs, weights)
        win["rows_fp"] = self.last_rows_fp
        return win

    @staticmethod
    def _new_window() -> dict:
        return dict(
            steps=0,
            loss_local=0.0,
            tokens=0,
            slots=0,
            loss_tokens=0.0,
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
        loss_sum, tokens, slots, seconds_max = _all_reduce(
            [win["loss_local"], win["tokens"], win["slots"], 0.0]
        )
        (seconds,) = _all_reduce([win["seconds"]], "max")
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
            w_all = torch.cat(
                [torch.nn.functional.pad(w.cpu(), (0, T - w.shape[1])) for w in weights]
            )
            m_all = torch.cat(
                [
                    torch.nn.functional.pad(mb["loss_mask"][:, 1:].cpu(), (0, T - w.shape[1]))
                    for mb, w in zip(mbs, weights)
                ]
            )
            metrics.update(_flatten_diagnostics(weight_diagnostics(w_all, m_all, self.wc)))
        if self.val_rows or self.config.get("has_val"):
            metrics["val_nll"] = self.val_nll()
        self.window = self._new_window()
        return metrics

    def _no_grad_logprobs(self, rows: list[Row]):
        """Yield (row indices, logp [B, T-1] numpy) over ``rows`` without gradients.

        Under ZeRO-3 a forward gathers parameters collectively, so every rank runs the same
        number of forwards: a rank with fewer micro-batches repeats a dummy one.
        """
        import torch

        plan = plan_micro_batches([len(r) for r in rows], self.tc.micro_batch_tokens, None)
        (n_max,) = _all_reduce([len(plan)], "max")
        dummy = rows[:1] or self.rows[:1]
        with torch.no_grad():
            for j in range(int(n_max)):
                real = j < len(plan)
                batch_rows = [rows[i] for i in plan[j]] if real else dummy
                mb = self._to_device(collate(batch_rows, self.pad_id))
                lp = self._forward(mb).float()
                if real:
                    yield plan[j], mb, lp

    def val_nll(self) -> float:
        """Unweighted mean NLL of the held-out teacher tokens, over all ranks."""
        from raydc.loss import weighted_token_loss

        nll, tok = 0.0, 0.0
        for _, mb, lp in self._no_grad_logprobs(self.val_rows):
            m = mb["loss_mask"][:, 1:]
            nll += float(weighted_token_loss(-lp, None, m, "none", denominator=1.0))
            tok += float(m.sum())
        g_nll, g_tok = _all_reduce([nll, tok])
        return g_nll / g_tok if g_tok > 0 else float("nan")

    def rescore(self) -> None:
        """Replace this shard's student log-probs by the current model's (no grad)."""
        out: list[np.ndarray] = [None] * len(self.rows)  # type: ignore[list-item]
        for idxs, _, lp in self._no_grad_logprobs(self.rows):
            lp_np = lp.cpu().numpy()
            for b, i in enumerate(idxs):
                L = len(self.rows[i])
                out[i] = np.concatenate([[0.0], lp_np[b, : L - 1]]).astype(np.float32)
        self.rescored = out

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt_dir: str) -> None:
        state = dict(step=self.step, epoch=self.epoch, pos=self.pos, world=self.world)
        self.engine.save_checkpoint(ckpt_dir, tag=DS_TAG, client_state={"raydc": state})
        if self.rescored is not None:
            flat = np.concatenate(self.rescored) if self.rescored else np.zeros(0, np.float32)
            np.save(Path(ckpt_dir) / f"rescored_rank{self.rank}.npy", flat)
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
        path = Path(ckpt_dir) / f"rescored_rank{self.rank}.npy"
        if path.exists():
            flat = np.load(path)
            ends = np.cumsum([len(r) for r in self.rows])
            self.rescored = np.split(flat, ends[:-1])

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


def _maybe_fault(config: dict, step: int, rank: int, checkpoint_every: int) -> None:
    """Test hook (RAYDC_TRAIN_FAULT="step:marker" on the driver): the last rank exits hard
    after ``step`` on the first attempt only, so restarts are tested with a real death.

    Ray Train registers a report when its controller next polls the workers; a worker
    that dies first takes its last report with it. The hook therefore waits (up to 120 s)
    until the newest checkpoint is in the run's checkpoint snapshot before exiting.
    """
    fault = config.get("fault")
    if not fault or step != fault["step"] or rank != config["world_hint"] - 1:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    last = (step // checkpoint_every) * checkpoint_every
    snapshot = Path(config["run_dir"]) / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 120
    while last and time.time() < deadline:
        if snapshot.exists() and f"step_{last:08d}" in snapshot.read_text():
            break
        time.sleep(0.5)
    marker.write_text(f"killed rank {rank} after step {step}\n")
    os._exit(1)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (see the module docstring)."""
    if not config.get("use_gpu"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from raydc.models import offline_env

    offline_env()
    import ray.train

    w = _Worker(config)
    tc = w.tc
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            w.load(d)
        # Re-plan the epoch we stopped in; pos skips what it already consumed.
    w._plan_epoch()

    def report(final: bool = False) -> None:
        metrics = w.window_metrics()
        do_ckpt = final or (w.step % tc.checkpoint_every == 0)
        if not do_ckpt:
            ray.train.report(metrics)
            return
        tmp = tempfile.mkdtemp(prefix=f"raydc_ckpt_r{w.rank}_")
        try:
            w.save(tmp)
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

    while w.step < tc.max_steps:
        w.train_step()
        _maybe_fault(config, w.step, w.rank, tc.checkpoint_every)
        if tc.rescore_every and w.step % tc.rescore_every == 0 and w.step < tc.max_steps:
            w.rescore()
        if w.step == tc.max_steps:
            break
        if w.step % tc.log_every == 0 or w.step % tc.checkpoint_every == 0:
            report()
    report(final=True)
