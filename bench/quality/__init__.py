"""The built-in quality benchmark (jobs/benchmark_quality.py): does distribution-corrected
weighting give a better student than SFT on the same offline teacher traces, in a regime
where distillation helps?

The task and models are the embedded default's (raydc/assets/sumtask): a running sum mod
10 over lists of codes; the shipped teacher knows all 40 codes, the shipped student only 24,
so SFT on the teacher's traces teaches it the other 16 and its held-out accuracy rises.
Every arm fine-tunes through the trainer's step (``finetune``: the trainer's
``MicroBatch``, weights, loss and ``Learner.step`` in one process).

Modules: task (problems, grader), models (the shipped pair, chat-format ids), traces
(``TraceSet``), finetune (the trainer's step in one process), evaluate (the measures,
ExAccErr), jobs (one arm's run in a worker), stages (the benchmark's steps), tuning (the
Ray Tune search), machine (the /proc load sampler), run (arms, plan, run folder), report
(results.json, plots, docs/results.md). Nothing here imports ray except ``tuning``.
"""

from __future__ import annotations

from bench.machine import LoadMonitor  # noqa: F401
from bench.quality.finetune import TrainSpec, train  # noqa: F401
