"""On-policy distillation (OPD) in the benchmark's process: the ``opd`` and ``offline_opd``
arms' rounds (issue 32), computed like every other arm (no Ray, no vLLM).

A round (``sample_round``): the current student samples one answer per prompt at T = 1
(``bench.quality.evaluate.generate`` with the regime's answer budget), keeping its
log-probs of the sampled tokens (the sampling policy's); answers that did not end with EOS
(truncated at the budget) are dropped, counted, never trained on; the teacher scores
exactly the kept tokens (``score_traces``). The round's steps then train on the kept rows
(``round_rows``) through the trainer's step with raydc's ``opd`` preset (the job's
``on_policy_weights``: the ``_baseline`` arms' ``opd_baseline`` subtracts the step's mean
advantage from each token's): with
``student_ref: current`` the ``Learner`` reads the stored log-probs as the sampling ones,
so a sampled token's weight is (log p_T - log p_samp) * clip(p_theta / p_samp, 0, 2) and
the loss is tinker-cookbook's importance-sampling loss on the per-token reverse-KL
advantage (raydc.method.weights, ``advantage`` transform). The optimizer runs on across
rounds and phases (``bench.quality.jobs.run_arm``).

Per round the record keeps raydc.method.opd's figures: the samples' mean length, EOS rate
and truncation share (``sample_stats``), the mean reverse KL of the kept samples under the
sampling policy (``reverse_kl_stats``), and the FLOPs of the generation and the teacher's
scoring (``round_flops``; training is counted per step by ``bench.quality.flops``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bench.quality.evaluate import generate
from bench.quality.traces import TraceSet, build_trace_set, score_traces
from raydc.method.opd import OnPolicyGuardError, reverse_kl_stats, round_flops, sample_stats

ON_POLICY = "on_policy"  # a job phase's source: the student's own samples (not a trace set)
ROUND_STEPS = 10  # optimizer steps a round's samples feed (the last round may take fewer)


@dataclass
class Round:
    """One round's samples: ``ts`` the kept (EOS-ended) ones, ``student_lp`` the sampling
    log-probs and ``teacher_lp`` the teacher's; ``stats`` (sample_stats, reverse_kl_stats,
    ``kept``) and ``flops`` (round_flops: generation and teacher scoring)."""

    ts: TraceSet
    stats: dict
    flops: dict


def sample_round(
    student,
    teacher,
    prompts: Sequence[list[int]],
    eos: int,
    max_new_tokens: int,
    seed: int,
    student_params: int,
    teacher_params: int,
) -> Round:
    """The student's T = 1 samples of ``prompts`` (one each), the truncated ones dropped,
    the rest scored by the teacher. Raises ``OnPolicyGuardError`` when no sample ended
    with EOS (nothing to train on)."""
    responses, lps = generate(
        student,
        prompts,
        eos,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        seed=seed,
        with_logprobs=True,
    )
    stopped = [r[-1] == eos for r in responses]
    stats = sample_stats([len(r) for r in responses], ["stop" if s else "length" for s in stopped])
    keep = [i for i, s in enumerate(stopped) if s]
    if not keep:
        raise OnPolicyGuardError(
            f"bench.quality opd round: none of the student's {len(prompts)} samples ended with "
            f"EOS within max_new_tokens={max_new_tokens}: nothing to train on"
        )
    ts = build_trace_set(
        [prompts[i] for i in keep],
        [responses[i] for i in keep],
        prompt_ids=keep,
        student_lps=[lps[i] for i in keep],
    )
    ts.teacher_lp = score_traces(teacher, ts)
    m = ts.loss_mask
    kl = reverse_kl_stats(ts.student_lp.numpy(), ts.teacher_lp.numpy(), m.numpy(), [None] * len(ts))
    generated = sum(len(p) + len(r) for p, r in zip(prompts, responses))  # prefill + samples
    flops = round_flops(
        student_params,
        teacher_params,
        generated_tokens=generated,
        student_scored_tokens=0,  # the sampling log-probs come with the generation
        teacher_scored_tokens=int(ts.lengths.sum()),
        trained_tokens=0,  # counted per step
    )
    stats = {**stats, **kl, "kept": len(keep)}
    return Round(ts=ts, stats=stats, flops=flops)


def round_rows(kept: int, steps: int, batch_size: int, g: torch.Generator) -> list[list[int]]:
    """Each of a round's ``steps`` steps' rows (``batch_size`` each) over its ``kept``
    samples: a random order of them, repeated as needed, cut into steps; every sample is
    trained on once when none was dropped (``steps * batch_size`` were drawn)."""
    if kept <= 0:
        raise ValueError(f"kept={kept}: a round needs a sample to train on")
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(kept, generator=g).tolist()
    return [order[k * batch_size : (k + 1) * batch_size] for k in range(steps)]


class PromptCycle:
    """The trace prompts in a random order, a new order each time they run out: each
    round takes the next ones, so no prompt repeats before every one has been used."""

    def __init__(self, n: int, g: torch.Generator):
        if n <= 0:
            raise ValueError(f"n={n}: no prompts to sample")
        self.n, self.g, self.queue = n, g, []

    def take(self, k: int) -> list[int]:
        while len(self.queue) < k:
            self.queue += torch.randperm(self.n, generator=self.g).tolist()
        out, self.queue = self.queue[:k], self.queue[k:]
        return out


def round_record(r: int, steps: int, rnd: Round) -> dict:
    """What a job's ``train.on_policy.rounds`` says of round ``r``."""
    keys = ("samples", "kept", "truncated", "eos_rate", "mean_length", "mean_reverse_kl")
    return {"round": r, "steps": steps, **{k: rnd.stats[k] for k in keys}, "flops": rnd.flops}
