"""Training throughput and loss memory: raydc vs TRL's SFTTrainer vs a plain PyTorch loop.

Prints (and writes as JSON with --out), from one invocation on one tiny model and batch:

- raydc's training step (Ray Train, 1 worker, DeepSpeed ZeRO-2, gloo, fp32) with the
  ``discord`` and ``sft`` presets: step time of each and their ratio (median of
  ``--repeats`` interleaved rounds of the plain, sft and discord arms);
- tokens/s of raydc vs TRL ``SFTTrainer`` vs a plain PyTorch loop: same random-init Llama
  (vocab 2,048, hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 512: 3.41M
  parameters), the same random-token rows (seq 256, batch 8), AdamW lr 1e-4, 2 threads;
- peak extra memory (RSS delta) of the loss at vocab 151,936 over 8,192 tokens, forward +
  backward: naive full logits vs raydc's chunked log-probs (vs TRL's chunked kernel).

Each arm runs in a fresh process. While it runs, the CPU time of every other process is
sampled (/proc/stat busy time minus the arm's own process tree): an arm with more than
``--max-foreign`` share of foreign CPU is rerun (up to --retries), and reported as
contended when no clean run was had.

    python bench/train.py --out bench/results/train.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ, BATCH, STEPS, WARMUP, LR = 256, 8, 30, 3, 1e-4
VOCAB, HIDDEN, LAYERS, HEADS, KV, INTER = 2048, 256, 4, 4, 2, 512
MEM_VOCAB, MEM_TOKENS, MEM_HIDDEN, MEM_CHUNK = 151_936, 8192, 256, 1024
THREADS = 2


# ----------------------------------------------------------------------------- fixtures


def build_model(out: Path) -> str:
    """The 3.41M-parameter Llama, random init, saved with the tiny-bpe tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raydc.models import load_tokenizer

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        intermediate_size=INTER,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    load_tokenizer("tiny-bpe").save_pretrained(out)
    return str(out)


def make_rows(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(1, VOCAB, size=(n, SEQ), dtype=np.int64)


def write_scored(model_dir: str, out: Path) -> str:
    """Scored Parquet of the benchmark rows (every token after the first carries loss)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydc.models import fingerprint

    ids = make_rows(BATCH * 8)
    n = ids.shape[0]
    rng = np.random.default_rng(1)
    # Plausible log-probs for the weights (they only need to be <= 0).
    s_lp = -rng.gamma(2.0, 2.0, size=ids.shape).astype(np.float32)
    t_lp = -rng.gamma(2.0, 2.0, size=ids.shape).astype(np.float32)
    mask = np.ones(ids.shape, dtype=bool)
    mask[:, 0] = False
    s_lp[:, 0] = t_lp[:, 0] = 0.0
    table = pa.table(
        {
            "row_id": [f"r{i}" for i in range(n)],
            "prompt_id": [f"p{i}" for i in range(n)],
            "input_ids": pa.array(list(ids.astype(np.int32)), pa.list_(pa.int32())),
            "loss_mask": pa.array(list(mask), pa.list_(pa.bool_())),
            "sentence_ids": pa.array(list(np.zeros(ids.shape, np.int32)), pa.list_(pa.int32())),
            "student_logprobs": pa.array(list(s_lp), pa.list_(pa.float32())),
            "teacher_logprobs": pa.array(list(t_lp), pa.list_(pa.float32())),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "part-00000.parquet")
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "student": {"path": model_dir, "fingerprint": fingerprint(model_dir)},
                "counts": {"rows_out": n},
            }
        )
    )
    return str(out)


# ----------------------------------------------------------------------------- arms


def arm_plain(model_dir: str, fused: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # The baseline is torch's default AdamW (a loop of per-tensor kernels on CPU); the fused
    # variant is reported beside it, not as the target's baseline.
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True if fused else None)
    x = torch.from_numpy(make_rows(BATCH))
    times = []
    for i in range(WARMUP + STEPS):
        t0 = time.perf_counter()
        logits = model(input_ids=x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    step = sum(times) / len(times)
    return {"step_s": step, "tokens_per_s": BATCH * SEQ / step}


def arm_trl(model_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(THREADS)
    ids = make_rows(BATCH)
    ds = Dataset.from_dict({"input_ids": [list(map(int, r)) for r in ids]})
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > WARMUP:
                times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=BATCH,
            max_steps=WARMUP + STEPS,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1e9,
            logging_steps=10**6,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            fp16=False,
            max_length=SEQ,
            packing=False,
            dataloader_num_workers=0,
            seed=0,
            data_seed=0,
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            callbacks=[Timer()],
        )
        trainer.train()
    step = sum(times) / len(times)
    return {"step_s": step, "tokens_per_s": BATCH * SEQ / step, "trl_steps_timed": len(times)}


def arm_raydc(model_dir: str, scored: str, preset: str) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray

    from raydc.config import from_dict
    from raydc.models import offline_env
    from raydc.train import run_train

    offline_env()
    ray.init(
        num_cpus=THREADS,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "DS_ACCELERATOR": "cpu",
                "OMP_NUM_THREADS": str(THREADS),
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            }
        },
    )
    log_every = 10
    cfg = from_dict(
        {
            "train": dict(
                student=model_dir,
                num_workers=1,
                cpus_per_worker=THREADS,
                zero_stage=2,
                precision="fp32",
                lr=LR,
                lr_schedule="constant",
                grad_clip=1.0,
                max_steps=WARMUP + STEPS + log_every,
                micro_batch_tokens=BATCH * SEQ,
                log_every=log_every,
                checkpoint_every=10**6,
                max_failures=0,
            ),
            "weights": {"preset": preset},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_train(cfg, scored, tmp)
        windows = [json.loads(x) for x in Path(summary["metrics_path"]).read_text().splitlines()]
    ray.shutdown()
    # Windows after the first (which holds start-up and warm-up steps), before the final one.
    timed = [w for w in windows if w["step"] > log_every and not w.get("final")]
    step = sum(w["step_time_s"] for w in timed) / len(timed)
    return {
        "step_s": step,
        "tokens_per_s": BATCH * SEQ / step,
        "windows": len(timed),
        "padding_share": timed[-1]["padding_share"],
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def arm_memory(variant: str) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    h = (torch.randn(MEM_TOKENS, MEM_HIDDEN) * 0.5).requires_grad_(True)
    w = (torch.randn(MEM_VOCAB, MEM_HIDDEN) * 0.02).requires_grad_(True)
    y = torch.randint(0, MEM_VOCAB, (MEM_TOKENS,))
    # Touch the inputs' pages; the baseline is measured after they exist.
    _ = float(h.sum() + w.sum())
    base = _rss_bytes()
    if _peak_rss_bytes() > base:  # start-up peaks (imports) above the baseline would hide ours
        base_peak = _peak_rss_bytes()
    else:
        base_peak = base
    t0 = time.perf_counter()
    if variant == "naive":
        logp = torch.log_softmax(h @ w.t(), dim=-1).gather(1, y[:, None])[:, 0]
    elif variant == "raydc":
        from raydc.loss import chunked_token_logprobs

        logp = chunked_token_logprobs(h, w, y, chunk_size=MEM_CHUNK)
    else:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        logp = ChunkedLogProbFunction.apply(
            h, w, None, y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ()
        )[0]
    loss = -logp.mean()
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    return {
        "peak_extra_gib": (peak - base) / 2**30,
        "loss": float(loss),
        "startup_peak_above_base_gib": (base_peak - base) / 2**30,
        "seconds": seconds,
        "grad_w_norm": float(w.grad.norm()),
    }


# ----------------------------------------------------------------------------- harness


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, parts[:8])
    return user + nice + system + irq + softirq + steal


def run_arm(argv: list[str], retries: int, max_foreign: float) -> dict:
    """Run one arm in a fresh process; measure foreign CPU while it runs; rerun if loaded."""
    import psutil

    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    attempts = []
    for attempt in range(retries + 1):
        load_before = open("/proc/loadavg").read().split()[:3]
        busy0, t0 = _busy_jiffies(), time.time()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        own: dict[int, float] = {}
        names: dict[int, str] = {}
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        ct = p.cpu_times()
                        own[p.pid] = ct.user + ct.system
                        # Read each time: a Ray actor retitles its process after start.
                        names[p.pid] = (p.cmdline() or [p.name()])[0].split("/")[-1][:40]
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            time.sleep(0.5)
        out, err = proc.communicate()
        wall = time.time() - t0
        busy = (_busy_jiffies() - busy0) / hz
        foreign = max(0.0, busy - sum(own.values())) / (wall * ncpu)
        result_lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not result_lines:
            # Record the failure and go on: one broken arm must not lose the others.
            print(f"  {argv[0]} failed:\n{err[-3000:]}", flush=True)
            return {
                "error": err[-500:],
                "foreign_cpu_share": round(foreign, 3),
                "contended": foreign > max_foreign,
            }
        res = json.loads(result_lines[-1][7:])
        # CPU seconds of the arm's own processes by name (Ray's actors and daemons included).
        by_name: dict[str, float] = {}
        for pid, cpu in own.items():
            name = names.get(pid, "?")
            by_name[name] = by_name.get(name, 0.0) + cpu
        res["own_cpu_s"] = dict(
            sorted(((k, round(v, 1)) for k, v in by_name.items()), key=lambda kv: -kv[1])[:8]
        )
        res.update(
            foreign_cpu_share=round(foreign, 3),
            loadavg_before=load_before,
            loadavg_after=open("/proc/loadavg").read().split()[:3],
            wall_s=round(wall, 1),
            attempt=attempt + 1,
        )
        res["contended"] = foreign > max_foreign
        attempts.append(res)
        print(f"  {' '.join(argv[:1] + argv[2:])}: {json.dumps(res)}", flush=True)
        if not res["contended"]:
            return res
    return min(attempts, key=lambda r: r["foreign_cpu_share"])


def child(argv: list[str]) -> None:
    from raydc.models import offline_env

    offline_env()
    name = argv[0]
    if name in ("plain", "plain_fused"):
        res = arm_plain(argv[1], fused=name == "plain_fused")
    elif name == "trl":
        res = arm_trl(argv[1])
    elif name == "raydc":
        res = arm_raydc(argv[1], argv[2], argv[3])
    else:
        res = arm_memory(argv[1])
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--retries", type=int, default=2, help="reruns of an arm taken under load")
    ap.add_argument(
        "--max-foreign",
        type=float,
        default=0.05,
        help="largest share of the machine's CPU other processes may use",
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds of plain and raydc arms"
    )
    ap.add_argument("--skip", default="", help="comma-separated arms to skip (trl, memory)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="raydc-bench-train-"))
    model_dir = build_model(work / "model")
    scored = write_scored(model_dir, work / "scored")
    r = {
        "machine": {"cpus": os.cpu_count(), "threads": THREADS},
        "setup": {
            "params": "3.41M Llama",
            "seq": SEQ,
            "batch": BATCH,
            "steps": STEPS,
            "warmup": WARMUP,
        },
    }
    print("throughput arms (fresh process each):", flush=True)
    # Repeats of one arm differed by 15-20% on this machine kind: the arms being compared
    # run in interleaved rounds and each reports its median round.
    arms = {
        "plain": ["plain", model_dir],
        "raydc_sft": ["raydc", model_dir, scored, "sft"],
        "raydc_discord": ["raydc", model_dir, scored, "discord"],
        "plain_fused": ["plain_fused", model_dir],
    }
    rounds: dict[str, list[dict]] = {k: [] for k in arms}
    for rep in range(args.repeats):
        print(f" round {rep + 1}/{args.repeats}", flush=True)
        for k, argv in arms.items():
            rounds[k].append(run_arm(argv, args.retries, args.max_foreign))
    for k, rs in rounds.items():
        ok = sorted((x for x in rs if "error" not in x), key=lambda x: x["step_s"])
        r[k] = dict(ok[(len(ok) - 1) // 2]) if ok else rs[-1]
        r[k]["rounds_step_s"] = [x.get("step_s") for x in rs]
        r[k]["contended"] = any(x.get("contended") for x in rs)
    if "trl" not in skip:
        r["trl"] = run_arm(["trl", model_dir], args.retries, args.max_foreign)
    if "memory" not in skip:
        print("loss memory arms (fresh process each):", flush=True)
        for v in ("naive", "raydc", "trl"):
            if v == "trl" and "trl" in skip:
                continue
            r[f"mem_{v}"] = run_arm(["memory", v], args.retries, args.max_foreign)

    def ratio(a, b, key):
        if "error" not in r.get(a, {"error": 1}) and "error" not in r.get(b, {"error": 1}):
            return r[a][key] / r[b][key]
        return None

    def round_ratio(a: str, b: str) -> float | None:
        """Median over rounds of step_s[b] / step_s[a] (a's tokens/s over b's). A round's
        arms run back to back; the machine's speed drifts more between rounds than within."""
        xs = sorted(
            y["step_s"] / x["step_s"]
            for x, y in zip(rounds.get(a, []), rounds.get(b, []))
            if "error" not in x and "error" not in y
        )
        return xs[(len(xs) - 1) // 2] if xs else None

    r["rounds_raydc_sft_over_plain_tokens"] = [
        y["step_s"] / x["step_s"] if "error" not in x and "error" not in y else None
        for x, y in zip(rounds["raydc_sft"], rounds["plain"])
    ]
    r["ratio_discord_over_sft_step"] = round_ratio("raydc_sft", "raydc_discord")
    r["raydc_sft_over_plain_tokens"] = round_ratio("raydc_sft", "plain")
    r["raydc_sft_over_trl_tokens"] = ratio("raydc_sft", "trl", "tokens_per_s")
    r["raydc_sft_over_plain_fused_tokens"] = round_ratio("raydc_sft", "plain_fused")
    r["mem_raydc_over_naive"] = ratio("mem_raydc", "mem_naive", "peak_extra_gib")
    r["any_contended"] = any(isinstance(v, dict) and v.get("contended") for v in r.values())
    print("\nsummary")
    for k in ("plain", "plain_fused", "trl", "raydc_sft", "raydc_discord"):
        if k in r and "error" not in r[k]:
            print(
                f"  {k:14s} {r[k]['tokens_per_s']:9.0f} tok/s  step {r[k]['step_s'] * 1e3:6.1f} ms"
                f"  foreign CPU {r[k]['foreign_cpu_share']:.1%}"
            )
    for k in (
        "ratio_discord_over_sft_step",
        "raydc_sft_over_plain_tokens",
        "raydc_sft_over_trl_tokens",
        "raydc_sft_over_plain_fused_tokens",
        "mem_raydc_over_naive",
    ):
        if r.get(k) is not None:
            print(f"  {k}: {r[k]:.3f}")
    for v in ("naive", "raydc", "trl"):
        if f"mem_{v}" in r and "error" not in r[f"mem_{v}"]:
            print(f"  loss memory {v:6s} {r[f'mem_{v}']['peak_extra_gib']:.2f} GiB extra")
    print(f"  contended: {r['any_contended']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        child(sys.argv[2:])
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        main()
