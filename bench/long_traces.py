"""Long reasoning traces at scale: packing, activation checkpointing, the streaming shards
and the identity check, measured on this machine (figures in docs/benchmarks.md).

Arms (``--arms``, default all), each in a fresh process, the machine's other load recorded
while it runs (a run with more than ``--max-foreign`` of foreign CPU is rerun, then reported
as contended):

- ``packing``: a long-tailed scored set (lognormal lengths, 100-8,000 tokens) trained by
  raydc's own trainer (``run_train``, Ray Train + DeepSpeed, 1 worker on both cores) with
  today's length bucketing (right-padded rows), with packing (``sdpa_packed``: sdpa on each
  row's segment) and with packing on a dense block-diagonal mask (``sdpa``); in
  ``--rounds`` interleaved rounds. Reported from the trainer's own metrics after the first
  (warm-up) report: tokens/s, padding share, budget fill; the ratio is the median of the
  per-round ratios.
- ``memory``: peak extra RSS of one forward + backward of one row of 4K / 16K / 32K tokens
  through ``StudentLogprobs`` and the chunked weighted loss, vocab 151,936, with and
  without activation checkpointing (a fresh process per cell).
- ``scale``: synthetic scored sets of 2K / 8K / 32K / 128K rows (64-256 tokens), trained
  with 1, 2 and 4 workers for 2 steps: time to the first step, peak RSS per worker, bytes
  read per worker (the data plane's count of Parquet column chunks and /proc rchar).
- ``fingerprint``: seconds per GB of weights, hashing every byte (the old identity check)
  against ``raydc.infra.artifacts.fingerprint_paths``.

    python bench/long_traces.py --out bench/results/long_traces.json
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

# The packing arm's model: Qwen2-shaped, hidden 256, 4 layers, 4 heads (2 KV), tiny-bpe
# vocabulary; the memory arm's: 12 layers of that width (depth is what checkpointing
# trades; real students have 24-36) with Qwen2's 151,936-token vocabulary.
MODEL = dict(hidden=256, layers=4, heads=4, kv=2, inter=1024)
MEMORY_LAYERS = 12
PACK_LENGTHS = (100, 8000)
PACK_BUDGET = 8192
PACK_STEPS, PACK_LOG = 24, 4
SCALE_ROWS = (2_000, 8_000, 32_000, 128_000)
SCALE_WORKERS = (1, 2, 4)


# ----------------------------------------------------------------------------- fixtures


def build_model(out: Path, vocab: int | None = None) -> str:
    from raydc.infra.models import build_tiny_model

    m = MODEL
    if vocab is None:
        return build_tiny_model(
            out,
            sizes=(m["hidden"], m["layers"], m["heads"], m["kv"], m["inter"]),
            max_position_embeddings=65536,
        )
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=m["hidden"],
        intermediate_size=m["inter"],
        num_hidden_layers=MEMORY_LAYERS,
        num_attention_heads=m["heads"],
        num_key_value_heads=m["kv"],
        head_dim=m["hidden"] // m["heads"],
        max_position_embeddings=65536,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return str(out)


def write_scored(model_dir: str, out: Path, lengths, seed: int = 0, row_group_size=256) -> str:
    """Scored Parquet of random-token rows of the given lengths (a short prompt, the rest
    response), random log-probs, with the manifest training checks."""
    import numpy as np
    import pyarrow as pa

    from raydc.score.store import write_store

    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int64)
    tables = []
    per_file = 16_384
    for start in range(0, len(lengths), per_file):
        lens = lengths[start : start + per_file]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        n = int(offsets[-1])
        ids = rng.integers(3, 1000, n).astype(np.int32)
        mask = np.ones(n, bool)
        mask[offsets[:-1]] = False
        mask[offsets[:-1] + 1] = False
        lp = (-rng.gamma(1.0, 1.5, n)).astype(np.float32)
        lp[offsets[:-1]] = 0.0

        def lst(values, typ, offsets=offsets):
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, typ))

        columns = {
            "row_id": [f"r{start + i}" for i in range(len(lens))],
            "prompt_id": [f"p{start + i}" for i in range(len(lens))],
            "input_ids": lst(ids, pa.int32()),
            "loss_mask": lst(mask, pa.bool_()),
            "teacher_logprobs": lst(lp - 0.3 * rng.random(n).astype(np.float32), pa.float32()),
            "student_logprobs": lst(lp, pa.float32()),
        }
        tables.append(columns)
    merged = {
        k: pa.concat_arrays([c[k] for c in tables])
        if isinstance(tables[0][k], pa.Array)
        else [v for c in tables for v in c[k]]
        for k in tables[0]
    }
    return write_store(out, merged, model_dir, n_files=len(tables), row_group_size=row_group_size)


def lognormal_lengths(n: int, lo: int, hi: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    # median ~1,100 tokens, a long tail to the cap (the 100-8,000 mix)
    return np.clip(rng.lognormal(7.0, 0.9, n).astype(int), lo, hi)


# ----------------------------------------------------------------------------- load


def run_arm(argv: list[str], retries: int, max_foreign: float, timeout: int) -> dict:
    """Run ``child argv`` in a fresh process; foreign CPU share = (machine busy - the
    child's tree) / wall / cores, sampled each second."""
    from bench.machine import TreeCPU

    result = {}
    for attempt in range(retries + 1):
        with tempfile.NamedTemporaryFile("r", suffix=".json") as res:
            t0 = time.time()
            proc = subprocess.Popen([sys.executable, __file__, "child", res.name, *argv])
            tree = TreeCPU(proc.pid)
            while proc.poll() is None:
                tree.poll()
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
            wall_s=round(wall, 1),
            attempt=attempt + 1,
            contended=foreign > max_foreign,
        )
        print(
            f"  {' '.join(argv)}: foreign CPU {foreign:.1%}"
            + (" (contended, rerun)" if foreign > max_foreign and attempt < retries else ""),
            flush=True,
        )
        if foreign <= max_foreign:
            break
    return result


# ----------------------------------------------------------------------------- arms


def _ray_start(cpus: int = 2) -> None:
    from raydc.infra.runtime import connect_ray

    connect_ray(None, num_cpus=cpus, include_dashboard=False)


def _config(student: str, **train):
    from raydc.config import from_dict

    base = dict(
        student=student,
        num_workers=1,
        cpus_per_worker=2,
        zero_stage=2,
        lr=1e-4,
        lr_schedule="constant",
        val_share=0.0,
        log_every=PACK_LOG,
        checkpoint_every=10**6,
        seed=0,
    )
    base.update(train)
    return from_dict({"train": base, "weights": {"preset": "discord"}})


def arm_packing(work: str, variant: str) -> dict:
    """One raydc training run on the long-tailed set (variant: bucketing | packed |
    packed_dense); figures from the trainer's metrics after the first report."""
    from raydc.train import run_train

    os.environ["DS_ACCELERATOR"] = "cpu"
    _ray_start()
    train = dict(max_steps=PACK_STEPS, micro_batch_tokens=PACK_BUDGET)
    if variant == "bucketing":
        train.update(packing=False, attn_implementation="sdpa")
    elif variant == "packed":
        train.update(packing=True, attn_implementation="sdpa_packed")
    else:
        train.update(packing=True, attn_implementation="sdpa")
    out = tempfile.mkdtemp(prefix=f"bench_pack_{variant}_", dir=work)
    summary = run_train(_config(f"{work}/model", **train), f"{work}/scored_long", out)
    reports = [json.loads(x) for x in Path(summary["metrics_path"]).read_text().splitlines()]
    timed = [r for r in reports if r["step"] > PACK_LOG and "tokens_per_s" in r]
    tok = sum(r["tokens_per_s"] * r["step_time_s"] * PACK_LOG for r in timed)
    secs = sum(r["step_time_s"] * PACK_LOG for r in timed)
    return {
        "variant": variant,
        "tokens_per_s": tok / secs,
        "padding_share": statistics.mean(r["padding_share"] for r in timed),
        "budget_fill": statistics.mean(r["budget_fill"] for r in timed),
        "step_time_s": secs / (PACK_LOG * len(timed)),
        "timed_steps": PACK_LOG * len(timed),
    }


def arm_memory(work: str, tokens: int, checkpointing: bool) -> dict:
    """Peak extra RSS of one forward + backward of one row (fresh process)."""
    import resource

    import torch

    from raydc.config import TrainConfig
    from raydc.method.loss import weighted_token_loss
    from raydc.train.model import StudentLogprobs, load_student

    torch.set_num_threads(2)
    tc = TrainConfig(gradient_checkpointing=checkpointing)
    # Chunks of 256 tokens: the head's [chunk x vocab] logits (and their gradient) are the
    # floor under the activations, 2 x 256 x 151,936 x 4 B = 0.29 GiB.
    model = StudentLogprobs(load_student(f"{work}/model_qwen_vocab", tc, on_gpu=False), 256)
    ids = torch.randint(3, 150_000, (1, tokens))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    logp = model(ids)
    mask = torch.ones_like(logp, dtype=torch.bool)
    w = torch.full_like(logp, 0.5)
    weighted_token_loss(-logp, w, mask, "self_norm").backward()
    seconds = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "tokens": tokens,
        "checkpointing": checkpointing,
        "peak_extra_gib": (peak - base) / 2**20,
        "seconds": seconds,
    }


def epoch_reads(scored: str, workers: int) -> dict:
    """Bytes each rank reads for one epoch through the data plane (index pass included),
    no model: the plan's windows read in order. Counted two ways: the Parquet column
    chunks the reader asked for, and /proc/self/io rchar around the reads."""
    from raydc.train.data import check_schema, scored_files
    from raydc.train.shard import RankShard, WindowReader, assign_pieces, build_index, plan_epoch

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return int(next(x for x in f if x.startswith("rchar")).split()[1])

    files = scored_files(scored)
    columns = check_schema(files)
    counted, real = [], []
    for pieces in assign_pieces(build_index(files), workers):
        r0 = rchar()
        shard = RankShard.open(pieces, columns)
        plan = plan_epoch(shard, 0, 0, 0, 4096, 2_000_000, packing=True)
        reader = WindowReader(shard, plan)
        for k in range(plan.num_micro_batches):
            reader.get(k)
        real.append(rchar() - r0)
        counted.append(shard.bytes_read)
    return {"epoch_bytes_counted_max": max(counted), "epoch_rchar_max": max(real)}


def arm_scale(work: str, rows: int, workers: int) -> dict:
    from raydc.train import run_train

    os.environ["DS_ACCELERATOR"] = "cpu"
    _ray_start()
    cfg = _config(
        f"{work}/model",
        num_workers=workers,
        cpus_per_worker=2 / workers,
        max_steps=2,
        micro_batch_tokens=4096,
        log_every=1,
    )
    out = tempfile.mkdtemp(prefix=f"bench_scale_{rows}_{workers}_", dir=work)
    t0 = time.time()
    summary = run_train(cfg, f"{work}/scored_{rows}", out)
    reports = [json.loads(x) for x in Path(summary["metrics_path"]).read_text().splitlines()]
    first = reports[0]
    store = sum(f.stat().st_size for f in Path(f"{work}/scored_{rows}").glob("*.parquet"))
    epoch = epoch_reads(f"{work}/scored_{rows}", workers)
    return {
        **epoch,
        # one epoch's reads of the busiest rank over its share of the store (target <= 1.2)
        "epoch_read_over_share": epoch["epoch_rchar_max"] / (store / workers),
        "rows": rows,
        "workers": workers,
        "store_bytes": store,
        "seconds_to_first_step": first["seconds_to_first_step"],
        "fit_seconds": time.time() - t0,
        "worker_peak_rss_mib": first["worker_peak_rss_mib"],
        "data_bytes_read_max": first["data_bytes_read_max"],
        "rchar_max_at_first_step": first["worker_rchar_max"],
    }


def arm_fingerprint(work: str) -> dict:
    import hashlib

    from raydc.infra.artifacts import fingerprint_paths

    folder = Path(work) / "fp_model"
    size = 1 << 30
    if not (folder / "model.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text('{"hidden_size": 8}')
        header = json.dumps(
            {"w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}
        ).encode()
        with open(folder / "model.safetensors", "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            for _ in range(size >> 24):
                f.write(os.urandom(1 << 24))

    def every_byte(p: Path) -> str:  # the identity check before this change
        h = hashlib.sha256()
        for name in sorted(os.listdir(p)):
            with open(p / name, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    gb = sum(f.stat().st_size for f in folder.iterdir()) / 1e9
    out = {"gb": gb}
    for name, fn in (("every_byte", every_byte), ("raydc", fingerprint_paths)):
        fn(folder)  # warm the page cache: the figures are warm reads
        t0 = time.perf_counter()
        for _ in range(3):
            fn(folder)
        out[f"{name}_s_per_gb"] = (time.perf_counter() - t0) / 3 / gb
    out["speedup"] = out["every_byte_s_per_gb"] / out["raydc_s_per_gb"]
    return out


def child(argv: list[str]) -> None:
    out, arm, work, *rest = argv
    fn = {
        "packing": arm_packing,
        "memory": arm_memory,
        "scale": arm_scale,
        "fingerprint": arm_fingerprint,
    }[arm]
    args = [int(x) if x.isdigit() else ({"True": True, "False": False}.get(x, x)) for x in rest]
    Path(out).write_text(json.dumps(fn(work, *args), default=str))


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="packing,memory,scale,fingerprint")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the packing arm")
    ap.add_argument("--pack-rows", type=int, default=1500)
    ap.add_argument("--memory-tokens", default="4096,16384,32768")
    ap.add_argument("--scale-rows", default=",".join(map(str, SCALE_ROWS)))
    ap.add_argument("--scale-workers", default=",".join(map(str, SCALE_WORKERS)))
    ap.add_argument("--max-foreign", type=float, default=0.05)
    ap.add_argument("--retries", type=int, default=1)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="raydc_bench_long_")
    Path(work).mkdir(parents=True, exist_ok=True)
    arms = a.arms.split(",")
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "work": work}
    if not Path(work, "model", "config.json").exists():
        build_model(Path(work, "model"))
    if "packing" in arms:
        if not Path(work, "scored_long").exists():
            lens = lognormal_lengths(a.pack_rows, *PACK_LENGTHS)
            write_scored(f"{work}/model", Path(work, "scored_long"), lens, row_group_size=64)
        rounds = []
        for r in range(a.rounds):
            print(f"packing round {r + 1}/{a.rounds}", flush=True)
            rounds.append(
                {
                    v: run_arm(["packing", work, v], a.retries, a.max_foreign, 1800)
                    for v in ("bucketing", "packed", "packed_dense")
                }
            )
        ratio = [x["packed"]["tokens_per_s"] / x["bucketing"]["tokens_per_s"] for x in rounds]
        dense = [x["packed"]["tokens_per_s"] / x["packed_dense"]["tokens_per_s"] for x in rounds]
        report["packing"] = {
            "rounds": rounds,
            "packed_over_bucketing": statistics.median(ratio),
            "per_round": ratio,
            "segments_over_dense_mask": statistics.median(dense),
        }
    if "memory" in arms:
        if not Path(work, "model_qwen_vocab", "config.json").exists():
            build_model(Path(work, "model_qwen_vocab"), vocab=151_936)
        cells = []
        for t in map(int, a.memory_tokens.split(",")):
            for ck in (False, True):
                cells.append(
                    run_arm(["memory", work, str(t), str(ck)], a.retries, a.max_foreign, 3600)
                )
        report["memory"] = cells
    if "scale" in arms:
        import numpy as np

        cells = []
        for n in map(int, a.scale_rows.split(",")):
            if not Path(work, f"scored_{n}").exists():
                lens = np.random.default_rng(n).integers(64, 257, n)
                write_scored(f"{work}/model", Path(work, f"scored_{n}"), lens)
            for w in map(int, a.scale_workers.split(",")):
                cells.append(
                    run_arm(["scale", work, str(n), str(w)], a.retries, a.max_foreign, 1800)
                )
        report["scale"] = cells
    if "fingerprint" in arms:
        report["fingerprint"] = run_arm(["fingerprint", work], a.retries, a.max_foreign, 900)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2:])
    else:
        main()
