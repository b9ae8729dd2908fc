"""LoRA against full fine-tuning on this machine: optimizer state, peak memory, step time.

Each arm is raydc's own trainer (``run_train``: Ray Train, 1 worker on both cores,
DeepSpeed ZeRO-2, fp32, packed rows, the chunked weighted loss with ``discord``) in a fresh
process, on random-token scored rows; full fine-tuning and LoRA (``train.lora``: r 16,
alpha 32, every linear layer) alternate in ``--rounds`` rounds on each model shape:

- ``small``: the Qwen2 shape of bench/long_traces.py (hidden 256, 4 layers, 4 heads,
  2 KV heads, intermediate 1,024; tiny-bpe vocabulary);
- ``wide``: hidden 768, 8 layers, 12 heads, 4 KV heads, intermediate 2,048 (its layers
  are most of its weights, as in a real student).

Figures, from the trainer's own metrics: ``optimizer_state_mib`` (Adam's moments and
ZeRO's fp32 master copy, ``raydc.train.metrics.optimizer_state_bytes``),
``worker_peak_rss_mib`` (the worker's peak resident set before export), the median
``step_time_s`` of the reports after the first (warm-up) one, and the trainable share.
While an arm runs, the CPU of every process outside its tree is sampled (foreign CPU) with
the 1-minute load average; an arm over ``--max-foreign`` is rerun once, then reported as
contended.

    python bench/lora.py --out bench/results/lora.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "small": (256, 4, 4, 2, 1024),  # hidden, layers, heads, kv heads, intermediate
    "wide": (768, 8, 12, 4, 2048),
}
LORA = {"r": 16, "alpha": 32.0, "target_modules": ["all-linear"]}
ROWS, LENGTHS = 256, (64, 512)
BUDGET = 2048  # tokens a micro-batch (one step: grad_accum 1)
STEPS, LOG = 9, 3


def _config(student: str, lora: bool):
    from raydc.config import from_dict

    train = dict(
        student=student,
        num_workers=1,
        cpus_per_worker=2,
        zero_stage=2,
        lr=1e-4,
        lr_schedule="constant",
        max_steps=STEPS,
        micro_batch_tokens=BUDGET,
        log_every=LOG,
        checkpoint_every=10**6,
        val_share=0.0,
        seed=0,
    )
    if lora:
        train["lora"] = LORA
    return from_dict({"train": train, "weights": {"preset": "discord"}})


def arm(work: str, shape: str, mode: str) -> dict:
    """One training run; figures from its reports after the first."""
    from raydc.infra.runtime import connect_ray
    from raydc.train import run_train

    os.environ["DS_ACCELERATOR"] = "cpu"
    connect_ray(None, num_cpus=2, include_dashboard=False)
    out = tempfile.mkdtemp(prefix=f"bench_lora_{shape}_{mode}_", dir=work)
    cfg = _config(f"{work}/model_{shape}", lora=mode == "lora")
    summary = run_train(cfg, f"{work}/scored_{shape}", out)
    reports = [json.loads(x) for x in Path(summary["metrics_path"]).read_text().splitlines()]
    timed = [r for r in reports if r["step"] > LOG and "step_time_s" in r]
    last = reports[-1]
    return {
        "shape": shape,
        "mode": mode,
        "params": last["params"],
        "trainable_params": last["trainable_params"],
        "optimizer_state_mib": last["optimizer_state_mib"],
        "worker_peak_rss_mib": last["worker_peak_rss_mib"],
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "timed_steps": LOG * len(timed),
    }


def run_arm(argv: list[str], retries: int, max_foreign: float, timeout: int) -> dict:
    """``arm`` in a fresh process, the machine's other CPU use and load sampled."""
    from bench.machine import TreeCPU

    result: dict = {}
    for attempt in range(retries + 1):
        with tempfile.NamedTemporaryFile("r", suffix=".json") as res:
            t0 = time.time()
            proc = subprocess.Popen([sys.executable, __file__, "child", res.name, *argv])
            tree, loads = TreeCPU(proc.pid), []
            while proc.poll() is None:
                tree.poll()
                loads.append(os.getloadavg()[0])
                time.sleep(1.0)
                if time.time() - t0 > timeout:
                    proc.kill()
                    break
            wall = time.time() - t0
            foreign = tree.foreign_share(wall)
            text = Path(res.name).read_text()
        result = json.loads(text) if text else {"error": f"exit {proc.returncode}"}
        result.update(
            foreign_cpu_share=round(foreign, 4),
            load1_max=max(loads, default=float("nan")),
            wall_s=round(wall, 1),
            attempt=attempt + 1,
            contended=foreign > max_foreign,
        )
        print(f"  {' '.join(argv[1:])}: foreign CPU {foreign:.1%}, {wall:.0f} s", flush=True)
        if foreign <= max_foreign:
            break
    return result


def main() -> None:
    from bench.long_traces import write_scored
    from raydc.infra.models import build_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    ap.add_argument("--max-foreign", type=float, default=0.05)
    ap.add_argument("--retries", type=int, default=1)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="raydc_bench_lora_")
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "lora": LORA}
    import numpy as np

    for shape in a.shapes.split(","):
        model = Path(work, f"model_{shape}")
        if not (model / "config.json").exists():
            build_tiny_model(model, sizes=SHAPES[shape])
        if not Path(work, f"scored_{shape}").exists():
            lens = np.random.default_rng(0).integers(*LENGTHS, ROWS)
            write_scored(str(model), Path(work, f"scored_{shape}"), lens, row_group_size=64)
        runs = []
        for r in range(a.rounds):
            order = ("full", "lora") if r % 2 == 0 else ("lora", "full")
            print(f"{shape}: round {r + 1}/{a.rounds}", flush=True)
            runs += [
                run_arm(["arm", work, shape, m], a.retries, a.max_foreign, 1800) for m in order
            ]
        by = {m: [x for x in runs if x.get("mode") == m] for m in ("full", "lora")}
        med = {
            m: {
                k: statistics.median(x[k] for x in xs)
                for k in ("optimizer_state_mib", "worker_peak_rss_mib", "step_time_s")
            }
            for m, xs in by.items()
            if xs
        }
        report[shape] = {"runs": runs, "median": med}
        if len(med) == 2:
            report[shape]["lora_over_full"] = {
                k: med["lora"][k] / med["full"][k] for k in med["full"]
            }
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        out, _, work, shape, mode = sys.argv[2:]
        Path(out).write_text(json.dumps(arm(work, shape, mode), default=str))
    else:
        main()
