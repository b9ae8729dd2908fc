"""The built-in quality benchmark's task, models, training loop and evaluation.

Why this task. A CPU pilot (see the project notes) found no exposure bias on a rigid task
and showed that what distribution correction changes is *which teacher tokens a student
learns from*. So the task here has:

- long step-by-step traces (8-14 steps, up to ~75 response tokens after a ~30-token
  prompt) with a checkable answer: a running sum mod 10 over a list of letter-labelled
  digits (``Sa3b9c4:``), one step per line naming the item, its digit and the sum
  (``c4=6``), then ``#answer``;
- two trace *styles* that are both correct but incompatible mid-trace: ``forward`` consumes
  the items a, b, c..., ``backward`` the last item first. A trace that starts in one style
  and drifts into the other skips or repeats items, so one slip derails it;
- a student with a strong, competent prior of its own: pre-trained on ``forward`` traces of
  shorter lists (3-10 digits) and on a side task (``D``: double each digit mod 10) that the
  teacher traces never show. What it keeps of that prior is measured, not assumed;
- a larger teacher trained on a mixture of styles (mostly ``backward``) and lengths 8-14,
  whose T = 1 samples (and noisier T = 1.5 samples, scored with T = 1 log-probs) are the
  offline traces.

Exposure bias is measured directly: one teacher-forced forward pass over a correct
reference trace says, per position, whether the student's argmax is a *valid* next token
(any unconsumed item's label, its digit, the right sum, the punctuation). The share of problems whose
every teacher-forced step is valid is what teacher forcing predicts for free generation;
free greedy generation on the same problems gives the realised accuracy.

Every training run (teacher, student pre-training, every arm) takes the trainer's step:
``raydc.train.batch.collate`` builds its ``MicroBatch`` and ``raydc.train.step.Learner``
computes the weights (``micro_batch_weights``) and the loss (``weighted_token_loss``), in
one process (``finetune.LocalEngine`` in DeepSpeed's place); per-token log-probs come from
``raydc.loss.chunked_token_logprobs``. Models are real Qwen2 causal LMs (head_dim 64, as
vLLM CPU needs), saved with ``save_pretrained`` so vLLM loads them. Nothing here imports
ray.

Modules: task, models, traces, finetune, evaluate, sampling, jobs, machine, run, stages
(the benchmark's steps, in order), report; the names below are the package's public API.
"""

from __future__ import annotations

from raydc.quality.evaluate import (  # noqa: F401
    evaluate,
    free_generation_metrics,
    generate,
    max_new_tokens_for,
    teacher_forced_metrics,
)
from raydc.quality.finetune import TrainSpec, train  # noqa: F401
from raydc.quality.jobs import pretrain_student_job, run_job, worker_init  # noqa: F401
from raydc.quality.machine import LoadMonitor  # noqa: F401
from raydc.quality.models import (  # noqa: F401
    STUDENT_SIZE,
    TEACHER_SIZE,
    build_model,
    count_params,
    load_model,
    save_model,
)
from raydc.quality.report import METRICS, aggregate, markdown_table, plot, write_report  # noqa: F401
from raydc.quality.run import write_json_safe  # noqa: F401
from raydc.quality.sampling import check_vllm_logprobs, sample_with_vllm  # noqa: F401
from raydc.quality.task import (  # noqa: F401
    CHARS,
    EOS,
    LETTERS,
    PAD,
    STYLES,
    VOCAB,
    VOCAB_SIZE,
    Problem,
    TraceGrade,
    decode,
    encode,
    grade,
    make_problems,
    solution,
    style_order,
    valid_next_tokens,
)
from raydc.quality.traces import (  # noqa: F401
    TraceSet,
    build_trace_set,
    examples_to_trace_set,
    model_token_logprobs,
    score_traces,
)
