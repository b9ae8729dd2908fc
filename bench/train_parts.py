"""Where raydc's training step spends its time, without Ray: one variant per process.

Same model, rows and batch as bench/train.py (build the model with its ``build_model``).
Variants are names made of parts: ``plain`` (the plain loop), ``sm`` (raydc's
StudentLogprobs head, no DeepSpeed) or ``ds`` (inside a DeepSpeed ZeRO-2 engine, ``z1``
for ZeRO-1), plus ``recompute`` (logits recomputed in backward, else kept), ``fused``
(fused AdamW), ``clip`` (gradient clipping at 1.0), ``nomask`` (no attention mask).

    python bench/train_parts.py ds_kept_fused_clip /tmp/model   # prints one JSON line
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(2)
from transformers import AutoModelForCausalLM  # noqa: E402

import bench.train as bt  # noqa: E402

variant = sys.argv[1]
model_dir = sys.argv[2]
STEPS, WARM = 30, 3
x = torch.from_numpy(bt.make_rows(bt.BATCH))
attn = torch.ones_like(x)

lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
lm.config.use_cache = False
if variant == "plain":
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4)

    def step():
        logits = lm(input_ids=x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, bt.VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
else:
    import functools

    import raydc.train.model as model_mod
    from raydc.method.loss import DEFAULT_KEEP_BYTES, chunked_token_logprobs
    from raydc.train.model import StudentLogprobs

    keep = 0 if "recompute" in variant else DEFAULT_KEEP_BYTES
    # The head calls the module-level name; bind keep_bytes there.
    model_mod.chunked_token_logprobs = functools.partial(chunked_token_logprobs, keep_bytes=keep)
    m = StudentLogprobs(lm, 1024)
    fused = "fused" in variant
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused or None)
    mask_arg = None if "nomask" in variant else attn
    if "ds" in variant:
        import deepspeed

        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        deepspeed.init_distributed(dist_backend="gloo")
        from raydc.config import TrainConfig
        from raydc.train.ds_config import build_ds_config

        # raydc's own DeepSpeed config for this stage, clipping and fp32.
        tc = TrainConfig(
            zero_stage=1 if "z1" in variant else 2,
            grad_clip=1.0 if "clip" in variant else 0.0,
            grad_accum=1,
            precision="fp32",
        )
        cfg = build_ds_config(tc, world_size=1, on_gpu=False)
        eng, opt, _, _ = deepspeed.initialize(
            model=m, optimizer=opt, config=cfg, dist_init_required=False
        )

        def step():
            lp = eng(x, mask_arg)
            loss = -lp.mean()
            eng.backward(loss)
            eng.step()
    else:

        def step():
            lp = m(x, mask_arg)
            loss = -lp.mean()
            loss.backward()
            if "clip" in variant:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)


ts = []
for i in range(WARM + STEPS):
    t0 = time.perf_counter()
    step()
    dt = time.perf_counter() - t0
    if i >= WARM:
        ts.append(dt)
s = sorted(ts)[len(ts) // 2]
print(
    json.dumps(
        {
            "variant": variant,
            "median_step_s": s,
            "mean_step_s": sum(ts) / len(ts),
            "tok_s": bt.BATCH * bt.SEQ / (sum(ts) / len(ts)),
        }
    )
)
