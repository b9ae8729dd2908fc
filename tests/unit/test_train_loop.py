"""raydc.train.loop's checkpoint state without Ray Train or DeepSpeed: a rank's counters
go into raydc_state.json, and a resumed attempt reports what the first one did. The
engine is a stand-in that records the DeepSpeed calls; the real resume is
tests/integration/test_train.py and test_phases.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from raydc.config import from_dict
from raydc.train.loop import STATE_FILE, Worker
from raydc.train.metrics import StepWindow


class _Engine:
    """What Worker.save / load / window_metrics ask of a DeepSpeed engine."""

    def __init__(self):
        self.module = torch.nn.Linear(2, 2)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.saved: dict | None = None

    def save_checkpoint(self, ckpt_dir, tag, client_state, exclude_frozen_parameters):
        self.saved = client_state

    def load_checkpoint(self, ckpt_dir, tag, load_module_strict):
        pass


class _Shard:
    train_rows = np.array([0, 1])
    lengths = np.array([3, 5])
    bytes_read = 0


def _worker(**state) -> Worker:
    """A rank-0 worker of one as Worker.__init__ leaves it (before any checkpoint), with
    ``state`` on top; no learner, a two-row shard."""
    w = Worker.__new__(Worker)
    w.cfg = from_dict({"score": {"student": "/m/s"}})
    w.tc, w.wc = w.cfg.train, w.cfg.weights
    w.rank, w.world = 0, 1
    w.engine, w.shard, w.val, w.rescored = _Engine(), _Shard(), None, None
    w.first_step_s, w.threads, w.trainable_params, w.params = 1.0, 1, 6, 6
    w.step = w.epoch = w.pos = w.resumed_from = 0
    w.resumed_path, w.resumed_model, w.restored_metrics = None, False, {}
    w.warm_started_from = None
    w.epoch_dropped_share = 0.0
    w.window = StepWindow()
    for k, v in state.items():
        setattr(w, k, v)
    return w


def _one_step() -> StepWindow:
    return StepWindow(steps=1, loss=0.5, tokens=8, slots=8, micro_batches=1, seconds=0.1)


def test_a_resumed_phase_still_reports_the_step_it_was_warm_started_from(tmp_path):
    """A DASD phase warm-started from the previous phase's step 4 (train.init_checkpoint)
    is killed after its step 6 and resumed by Ray Train from that checkpoint: the resumed
    attempt loads the checkpoint instead of warm-starting, and its metrics must still say
    init_checkpoint_step 4, both for steps it goes on to train and, when the checkpoint was
    the final one, for the figures it reports without a step."""
    first = _worker(step=6, epoch=1, pos=2, warm_started_from=4, window=_one_step())
    metrics = first.window_metrics()
    assert metrics["init_checkpoint_step"] == 4 and metrics["resumed_from_step"] == 0
    first.save(str(tmp_path), metrics)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["init_checkpoint_step"] == 4 == first.engine.saved["raydc"]["init_checkpoint_step"]

    # Resumed mid-run: it trains on, and each report carries the warm start's step.
    again = _worker()
    again.load(str(tmp_path))
    assert (again.step, again.epoch, again.pos, again.resumed_from) == (6, 1, 2, 6)
    again.window, again.step = _one_step(), 7  # a step since the resume: its own figures
    resumed = again.window_metrics()
    assert resumed["init_checkpoint_step"] == 4 and resumed["resumed_from_step"] == 6
    assert resumed["loss"] == pytest.approx(0.5) and not math.isnan(resumed["tokens_per_s"])

    # Resumed at its final checkpoint: no step, the figures saved with it.
    final = _worker()
    final.load(str(tmp_path))
    figures = final.window_metrics()
    assert figures["init_checkpoint_step"] == 4 and figures["resumed_from_step"] == 6
    assert figures["loss"] == metrics["loss"]


def test_a_run_that_was_not_warm_started_reports_none_after_a_resume(tmp_path):
    first = _worker(step=3, window=_one_step())
    first.save(str(tmp_path), first.window_metrics())
    again = _worker()
    again.load(str(tmp_path))
    again.window, again.step = _one_step(), 4
    assert again.window_metrics()["init_checkpoint_step"] is None
