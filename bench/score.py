"""Scoring throughput: raydc's Ray Data + vLLM actors vs plain vLLM vs transformers.

One run builds the models and token rows once, then runs each arm in its own process on
the same rows and engine settings, polling that process tree's RSS and the machine's
load. Arms:

- ``raydc``: the real score stage (``run_score``: read, check, vLLM actor, weights, write).
- ``raydc_actor``: the bare path raydc uses, ``map_batches`` with a vLLM actor pool.
- ``raydata_llm``: ``ray.data.llm``'s vLLM processor on the same token ids.
- ``vllm``: one in-process ``vllm.LLM``; ``generate`` over all rows.
- ``hf``: raydc's transformers scorer (padded forward, chunked log-softmax).

Start-up (engine construction) is reported apart from scoring; tokens/s counts scored
tokens over scoring time. Run it on a quiet machine: the output records the load, and
other processes' CPU share during each arm, so contended figures can be told apart.

    python bench/score.py --models tiny,medium --rows 256 --out bench/results/score.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (hidden, layers, heads, kv heads, intermediate): "medium" is ~26M parameters, large
# enough that the forward pass, not per-call overhead, dominates.
MODELS = {"tiny": None, "medium": (512, 8, 8, 2, 1536)}
ARMS = ("raydc", "raydc_actor", "raydata_llm", "vllm", "hf")


def engine_settings(max_len: int) -> dict:
    # --batch-size and --cpus-per-engine reach the child processes through the environment.
    return dict(
        dtype="float32",
        max_model_len=max_len,
        max_num_batched_tokens=4096,
        gpu_memory_utilization=0.1,
        enforce_eager=True,
        batch_size=int(os.environ.get("RAYDC_BENCH_BATCH_SIZE", "32")),
        cpus_per_engine=float(os.environ.get("RAYDC_BENCH_CPUS_PER_ENGINE", "1")),
    )


def ray_init() -> None:
    """A local cluster with room for the engine actor *and* the read and write tasks beside
    it: with an engine of 2 CPUs on a 2-CPU cluster, nothing else could be scheduled."""
    from raydc.infra.runtime import connect_ray

    cpus = max(2, int(engine_settings(0)["cpus_per_engine"]) + 1)
    connect_ray(None, num_cpus=cpus, include_dashboard=False)


# ----------------------------------------------------------------------------- arms


def arm_prepare(a) -> dict:
    """Tokenise GSM8K traces with the student's template (raydc's prepare stage)."""

    from raydc.config import from_dict
    from raydc.prepare.stage import run_prepare

    traces = Path(a.work) / "traces.jsonl"
    with open(ROOT / "raydc/assets/gsm8k/train.jsonl") as src, open(traces, "w") as dst:
        for _, line in zip(range(a.rows), src):
            d = json.loads(line)
            dst.write(json.dumps({"prompt": d["question"], "response": d["answer"]}) + "\n")
    from raydc.infra.runtime import connect_ray

    connect_ray(None, num_cpus=2, include_dashboard=False)
    cfg = from_dict(
        {
            "data": {"path": str(traces), "max_length": a.max_len, "overlength": "truncate"},
            "score": {"student": a.model},
        }
    )
    s = run_prepare(cfg, Path(a.work) / "prepared")
    import pyarrow.parquet as pq

    from raydc.infra.artifacts import data_files

    t = pq.read_table(data_files(Path(a.work) / "prepared"), columns=["row_id", "input_ids"])
    pq.write_table(t, Path(a.work) / "ids.parquet")
    return {"rows": s["rows_out"], "tokens": s["tokens"]}


def _ids(a):
    import pyarrow.parquet as pq

    return pq.read_table(Path(a.work) / "ids.parquet").column("input_ids").to_pylist()


def arm_raydc(a) -> dict:

    from raydc.config import from_dict
    from raydc.score.stage import run_score

    ray_init()
    cfg = from_dict(
        {
            "score": {"student": a.model, "backend": "vllm", "engine": engine_settings(a.max_len)},
            "weights": {"preset": "dft"},
        }
    )
    t0 = time.perf_counter()
    s = run_score(cfg, Path(a.work) / "prepared", Path(a.work) / "scored")
    wall = time.perf_counter() - t0
    eng = s["engines"]["student"]
    return {
        "tokens": s["tokens"],
        "wall_s": wall,
        "startup_s": eng["startup_s"],
        "score_s": wall - eng["startup_s"],
        "engine_busy_s": eng["busy_s"],
        # What the stage wrote, per column and in all (the store's size on disk).
        "store_bytes_per_token": s["store_bytes_per_token"],
    }


def arm_raydc_actor(a) -> dict:
    import ray

    from raydc.config import ScoreConfig, VLLMEngineConfig
    from raydc.infra.runtime import restart_args_allowed
    from raydc.score.actors import StudentScorer

    ray_init()
    engine = VLLMEngineConfig(**engine_settings(a.max_len))
    scfg = ScoreConfig(student=a.model, backend="vllm", engine=engine)
    t0 = time.perf_counter()
    parts = Path(a.work) / "actor_parts"
    parts.mkdir(exist_ok=True)
    ds = ray.data.read_parquet(str(Path(a.work) / "ids.parquet"))
    with restart_args_allowed():
        ds = ds.map_batches(
            StudentScorer,
            fn_constructor_kwargs=dict(model=a.model, score_cfg=scfg, parts_dir=str(parts)),
            **engine.actor_pool_args(),
        )
    n = sum(
        sum(len(x) for x in b["student_logprobs"]) for b in ds.iter_batches(batch_format="pyarrow")
    )
    wall = time.perf_counter() - t0
    startup = sum(json.loads(f.read_text())["startup_s"] for f in parts.glob("*init.json"))
    return {"tokens": n, "wall_s": wall, "startup_s": startup, "score_s": wall - startup}


def arm_raydata_llm(a) -> dict:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    ray_init()
    s = engine_settings(a.max_len)
    config = vLLMEngineProcessorConfig(
        model_source=a.model,
        engine_kwargs=dict(
            dtype=s["dtype"],
            max_model_len=s["max_model_len"],
            max_num_batched_tokens=s["max_num_batched_tokens"],
            gpu_memory_utilization=s["gpu_memory_utilization"],
            enforce_eager=True,
            enable_prefix_caching=False,
        ),
        batch_size=s["batch_size"],
        concurrency=1,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        placement_group_config={"bundles": [{"CPU": s["cpus_per_engine"]}]},
        log_engine_metrics=False,
    )

    def pre(row):
        return dict(
            tokenized_prompt=list(row["input_ids"]),
            sampling_params=dict(
                max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False
            ),
        )

    def post(row):
        ids, plp = list(row["prompt_token_ids"]), row["prompt_logprobs"]
        lp = [0.0]
        for t in range(1, len(ids)):
            d = plp[t]
            e = d.get(ids[t], d.get(str(ids[t])))
            lp.append(float(e["logprob"]))
        return {"n": len(lp)}

    processor = build_processor(config, preprocess=pre, postprocess=post)
    t0 = time.perf_counter()
    ds = processor(ray.data.read_parquet(str(Path(a.work) / "ids.parquet")))
    n = sum(int(x) for b in ds.iter_batches(batch_format="pyarrow") for x in b["n"].to_pylist())
    wall = time.perf_counter() - t0
    return {"tokens": n, "wall_s": wall}


def arm_vllm(a) -> dict:
    from raydc.config import VLLMEngineConfig
    from raydc.engines.vllm import VLLMScorer

    rows = _ids(a)
    t0 = time.perf_counter()
    scorer = VLLMScorer(a.model, VLLMEngineConfig(**engine_settings(a.max_len)))
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = scorer.score(rows)
    score = time.perf_counter() - t1
    return {
        "tokens": sum(len(x) for x in out),
        "startup_s": startup,
        "score_s": score,
        "wall_s": startup + score,
    }


def arm_hf(a) -> dict:
    import torch

    from raydc.config import VLLMEngineConfig
    from raydc.engines.hf import TransformersScorer

    torch.set_num_threads(2)
    rows = _ids(a)
    t0 = time.perf_counter()
    scorer = TransformersScorer(a.model, VLLMEngineConfig(**engine_settings(a.max_len)))
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = scorer.score(rows)
    score = time.perf_counter() - t1
    return {
        "tokens": sum(len(x) for x in out),
        "startup_s": startup,
        "score_s": score,
        "wall_s": startup + score,
    }


# ----------------------------------------------------------------------------- harness


def run_arm(arm: str, model: str, work: str, rows: int, max_len: int) -> dict:
    """Run one arm in a child process; poll its tree's RSS and the machine's load."""
    from bench.machine import TreeCPU

    cmd = [
        sys.executable,
        __file__,
        "--child",
        arm,
        "--model",
        model,
        "--work",
        work,
        "--rows",
        str(rows),
        "--max-len",
        str(max_len),
    ]
    load0, t0 = os.getloadavg(), time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree = TreeCPU(proc.pid)
    peak = [0]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            live = tree.poll()
            if not live:
                break
            peak[0] = max(peak[0], sum(p.rss_bytes for p in live.values()))
            stop.wait(0.25)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    wall = time.time() - t0
    foreign = tree.foreign_share(wall)
    result = Path(work) / f"result-{arm}.json"
    if proc.returncode != 0 or not result.exists():
        return {"arm": arm, "error": err[-3000:]}
    res = json.loads(result.read_text())
    res.update(
        arm=arm,
        peak_rss_mib=round(peak[0] / 2**20),
        process_wall_s=round(wall, 1),
        loadavg_before=load0,
        loadavg_after=os.getloadavg(),
        foreign_cpu_share=round(foreign, 3),
    )
    if res.get("score_s"):
        res["tokens_per_s"] = round(res["tokens"] / res["score_s"], 1)
    if res.get("wall_s"):
        res["tokens_per_s_end_to_end"] = round(res["tokens"] / res["wall_s"], 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,medium")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch-size", type=int, default=32, help="rows per engine call")
    ap.add_argument(
        "--cpus-per-engine",
        type=float,
        default=1.0,
        help="Ray CPUs of each engine actor (Ray sets its OMP threads to this)",
    )
    ap.add_argument("--child", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    from raydc.infra.models import offline_env

    offline_env()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not a.child:
        os.environ["RAYDC_BENCH_BATCH_SIZE"] = str(a.batch_size)
        os.environ["RAYDC_BENCH_CPUS_PER_ENGINE"] = str(a.cpus_per_engine)
    if a.child:
        res = globals()[f"arm_{a.child}"](a)
        # A file, not stdout: engines print their own lines there on shutdown.
        (Path(a.work) / f"result-{a.child}.json").write_text(json.dumps(res))
        return

    from raydc.infra.models import build_tiny_model

    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "settings": {**engine_settings(a.max_len), "rows": a.rows},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="raydc-bench-") as tmp:
        for name in a.models.split(","):
            model = build_tiny_model(
                Path(tmp) / name,
                "student",
                sizes=MODELS[name],
                max_position_embeddings=max(2048, a.max_len),
            )
            import torch
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model)
            n_params = sum(
                t.numel()
                for t in __import__("safetensors.torch", fromlist=["x"])
                .load_file(str(Path(model) / "model.safetensors"))
                .values()
            )
            work = Path(tmp) / f"work-{name}"
            work.mkdir()
            prep = run_arm("prepare", model, str(work), a.rows, a.max_len)
            entry = {
                "params": n_params,
                "hidden": cfg.hidden_size,
                "layers": cfg.num_hidden_layers,
                "prepared": prep,
                "arms": {},
            }
            for arm in a.arms.split(","):
                res = run_arm(arm, model, str(work), a.rows, a.max_len)
                entry["arms"][arm] = res
                print(json.dumps({"model": name, **res}), flush=True)
            report["models"][name] = entry
            del torch
    report["machine"]["loadavg_end"] = os.getloadavg()
    print(format_table(report))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))


def format_table(report: dict) -> str:
    lines = [
        "| model | arm | tokens | start-up s | scoring s | tokens/s | end-to-end tokens/s "
        "| peak RSS MiB | foreign CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        for arm, r in m["arms"].items():
            if "error" in r:
                lines.append(f"| {name} | {arm} | error | | | | | | |")
                continue
            su = r.get("startup_s")
            sc = r.get("score_s")
            lines.append(
                f"| {name} ({m['params'] / 1e6:.1f}M) | {arm} | {r['tokens']} | "
                f"{su:.1f} | {sc:.1f} | {r.get('tokens_per_s', '-')} | "
                f"{r['tokens_per_s_end_to_end']} | {r['peak_rss_mib']} | "
                f"{r['foreign_cpu_share']:.0%} |"
                if su is not None
                else f"| {name} ({m['params'] / 1e6:.1f}M) | {arm} | {r['tokens']} | - | - | - | "
                f"{r['tokens_per_s_end_to_end']} | {r['peak_rss_mib']} | "
                f"{r['foreign_cpu_share']:.0%} |"
            )
    for name, m in report["models"].items():
        per = (m["arms"].get("raydc") or {}).get("store_bytes_per_token")
        if per:
            cols = ", ".join(f"{k} {v:.2f}" for k, v in per.items() if k != "total")
            lines.append(f"\n{name}: scored store {per['total']:.2f} bytes/token ({cols})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
