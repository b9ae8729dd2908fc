"""The console's progress (raydc.infra.progress): the line's fields, one line at most every
``every_s`` off a terminal, a bar on one, training followed through metrics.jsonl, and
Ray Data's progress records turned into raydc's lines. Clocks are fakes: no timing."""

from __future__ import annotations

import io
import json
import logging

from raydc.infra.progress import (
    DataProgress,
    Progress,
    follow_training,
    format_duration,
    progress_line,
)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_progress_line_holds_count_share_figures_and_eta():
    line = progress_line(
        "train", 40, 120, "step", {"loss": 0.035544, "tokens/s": 23666.4}, eta_s=80.0
    )
    assert line == "[raydc] train    step 40/120 (33%), loss 0.03554, 23,666 tokens/s, ETA 1:20"
    # without a total: no share, no ETA; a slow rate keeps two digits
    assert progress_line("score", 1200, None, "rows", {"rows/s": 7.14}, eta_s=5.0) == (
        "[raydc] score    rows 1,200, 7.1 rows/s"
    )
    assert format_duration(45) == "0:45"
    assert format_duration(12 * 60 + 3) == "12:03"
    assert format_duration(3723) == "1:02:03"


def test_off_a_terminal_one_line_at_most_every_interval():
    clock, out = Clock(), io.StringIO()
    p = Progress("train", total=120, every_s=60, stream=out, clock=clock)
    assert p.bar is False  # a StringIO is not a terminal
    shown = []
    for t, step, loss in [(10, 10, 0.9), (30, 20, 0.7), (70, 40, 0.5), (100, 60, 0.4)]:
        clock.t = t
        shown.append(p.update(step, {"loss": loss, "tokens/s": 20000.0}))
    # nothing in the first minute (a short stage prints no progress), then one line at 70 s,
    # none 30 s later. The rate is counted from the first report (step 10 at 10 s):
    # 30 steps in 60 s -> 0.5 step/s, 80 steps left -> 160 s.
    assert shown == [
        None,
        None,
        "[raydc] train    step 40/120 (33%), loss 0.5, 20,000 tokens/s, ETA 2:40",
        None,
    ]
    clock.t = 135  # 65 s after the last line: (80 - 10) steps in 125 s, 40 left -> 71.4 s
    line = p.update(80, {"loss": 0.3})
    assert line == "[raydc] train    step 80/120 (67%), loss 0.3, ETA 1:11"
    assert out.getvalue().splitlines() == [shown[2], line]


def test_the_interval_is_a_parameter():
    clock, out = Clock(), io.StringIO()
    p = Progress("eval", total=4, unit="rows", every_s=5, stream=out, clock=clock)
    for t in (1, 4, 6, 9, 12):
        clock.t = t
        p.update(t // 3)
    # lines at 6 s (>= 5 s after the start) and 12 s (>= 5 s after 6 s) only
    assert [x.split(",")[0] for x in out.getvalue().splitlines()] == [
        "[raydc] eval     rows 2/4 (50%)",
        "[raydc] eval     rows 4/4 (100%)",
    ]


def test_nothing_done_is_no_progress_line():
    clock, out = Clock(), io.StringIO()
    p = Progress("eval", total=64, unit="rows", every_s=0, stream=out, clock=clock)
    assert p.update(0) is None  # engines still starting
    clock.t = 20
    assert p.update(16) == "[raydc] eval     rows 16/64 (25%), ETA 1:00"  # 16 in 20 s


def test_on_a_terminal_a_bar():
    out = io.StringIO()
    p = Progress("train", total=120, stream=out, bar=True)
    p.update(10, {"loss": 0.9})
    p.update(40, {"loss": 0.5, "tokens/s": 23666.0})
    bar = p._tqdm
    assert (bar.n, bar.total, bar.unit) == (40, 120, "step")
    assert bar.postfix == "loss 0.5, 23,666 tokens/s"
    assert "[raydc] train" in out.getvalue()
    p.close()
    assert p._tqdm is None


def test_training_progress_follows_the_reported_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 30, "loss": 2.0}) + "\n")  # a run resumed at 30
    clock, out = Clock(), io.StringIO()
    progress = Progress("train", total=60, every_s=0, stream=out, clock=clock)
    follower = follow_training(path, progress)
    assert follower.poll() == 0  # what was there before is not this run's progress
    with open(path, "a") as f:
        f.write(json.dumps({"step": 40, "loss": 1.5, "tokens_per_s": 900.0}) + "\n")
        f.write('{"step": 50, "lo')  # being written: read at the next poll
    clock.t = 10
    assert follower.poll() == 1
    with open(path, "a") as f:
        f.write('ss": 1.25, "tokens_per_s": NaN}\n')
    clock.t = 30
    assert follower.poll() == 1
    assert out.getvalue().splitlines() == [
        "[raydc] train    step 40/60 (67%), loss 1.5, 900 tokens/s",
        # 10 steps in 20 s since step 40: 10 left -> 20 s; a NaN rate is left out
        "[raydc] train    step 50/60 (83%), loss 1.25, ETA 0:20",
    ]
    with follower:  # the thread starts and stops
        pass
    assert not follower._thread.is_alive()


def _dump(logger, dataset: str, taken: str, ops: list[str]) -> None:
    """One progress dump as Ray Data logs it off a terminal (logging_progress.py)."""
    first = f"======= Running Dataset: {dataset} ======="
    logger.info(first)
    logger.info(f"Total Progress: {taken}")
    logger.info("Active & requested resources: 1/2 CPU, 1.0MiB/3.4GiB object store")
    logger.info("")
    for op in ops:
        logger.info(op)
        logger.info("  Tasks: 0; Actors: 1; Queued blocks: 0 (0.0B)")
    logger.info("=" * len(first))


def test_ray_data_progress_dumps_become_raydc_lines():
    clock, out = Clock(), io.StringIO()
    logger = logging.getLogger("raydc.test.ray.data")
    logger.propagate = False
    handler = DataProgress("score", every_s=60, stream=out, clock=clock)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def scoring(scored: int) -> list[str]:  # written to Parquet: the consumer takes nothing
        return [
            "ListFiles: 2/2",
            "ReadFilesParquetV2->MapBatches(check_batch): 800/800",
            f"MapBatches(StudentScorer): {scored + 100}/1",
            f"MapBatches(TeacherScorer): {scored}/1",
            "MapBatches(finish_batch)->Write: 0/1",
        ]

    try:
        for t, scored in [(0, 0), (10, 0), (20, 100), (70, 480)]:
            clock.t = t  # rows out of the operator before the writer, of the 800 read;
            _dump(logger, "dataset_3_0", "0/?", scoring(scored))  # from 10 s: 8 rows/s
        generating = ["Map(_preprocess): 64/64", "MapBatches(vLLMEngineStageUDF): 0/1"]
        generating.append("Map(_postprocess): 0/1")
        for t, taken in [(80, "0/?"), (100, "16/?"), (140, "32/?")]:
            clock.t = t  # a second dataset, whose consumer takes the rows: a new rate
            _dump(logger, "dataset_4_0", taken, generating)
        clock.t = 200  # nothing to show (no rows, no total): no line, though it is time
        _dump(logger, "dataset_5_0", "0/?", ["ReadParquet: 0/?"])
        logger.info("Total Progress: 5/5")  # outside a dump: not progress
        assert out.getvalue().splitlines() == [
            "[raydc] score    rows 480/800 (60%), 8 rows/s, ETA 0:40",  # 320 left at 8/s
            "[raydc] score    rows 32/64 (50%), 0.53 rows/s, ETA 1:00",  # 32 in 60 s
        ]
    finally:
        logger.removeHandler(handler)
        handler.close()
