"""A long stage's progress on the console: a tqdm bar on a terminal; off one (a log file,
``ray job submit``) one ``[raydc]`` line at most every ``every_s`` seconds, the first one
``every_s`` after the stage started (a stage shorter than that prints none).

Two sources feed it:

- training: the metrics the workers report. Ray Train runs its callbacks in the controller
  actor, not in the driver, so the driver follows the ``metrics.jsonl`` that raydc's
  callback appends there (``follow_training``): step / total, loss, tokens/s, ETA.
- Ray Data stages (generate, score, eval, and the rest): off a terminal Ray Data draws no
  bar and logs a progress dump every 10 s instead; ``DataProgress`` turns those records
  into raydc's lines (rows / total, rows/s, ETA). On a terminal Ray Data draws its own
  bars and logs no dumps, so raydc adds nothing.

The interval is a parameter of each (default ``PROGRESS_EVERY_S``), so tests set it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

PROGRESS_EVERY_S = 60.0


def format_duration(seconds: float) -> str:
    """``0:45``, ``12:03``, ``1:02:03`` (hours only when there are any)."""
    total = int(round(max(0.0, seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_figures(figures: dict[str, float]) -> list[str]:
    """``loss 0.03554``; a rate (a key ending in ``/s``) as ``23,666 tokens/s``."""
    out = []
    for key, value in figures.items():
        if key.endswith("/s"):
            out.append(f"{value:,.0f} {key}" if value >= 10 else f"{value:.2g} {key}")
        else:
            out.append(f"{key} {value:.4g}")
    return out


def progress_line(
    stage: str,
    done: int,
    total: int | None,
    unit: str,
    figures: dict[str, float] | None = None,
    eta_s: float | None = None,
) -> str:
    """One progress line, e.g. ``[raydc] train    step 40/120 (33%), loss 0.03554,
    23,666 tokens/s, ETA 1:20`` (no total: no share and no ETA)."""
    if total:
        bits = [f"{unit} {done:,}/{total:,} ({100 * done / total:.0f}%)"]
    else:
        bits = [f"{unit} {done:,}"]
    bits += format_figures(figures or {})
    if total and eta_s is not None:
        bits.append(f"ETA {format_duration(eta_s)}")
    return f"[raydc] {stage:<8} " + ", ".join(bits)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """The progress of one stage: ``update(done, figures)`` as figures arrive.

    On a terminal (``bar``, default: whether ``stream`` is one) a tqdm bar that tqdm
    redraws itself; otherwise a ``progress_line`` at most every ``every_s`` seconds, the
    first ``every_s`` after this object was made and once something is done. The ETA is the remaining units at the
    rate since the last update before units began to move (so the stage's start-up, model
    loading and the engines' start, is not counted as work)."""

    def __init__(
        self,
        stage: str,
        total: int | None = None,
        unit: str = "step",
        every_s: float = PROGRESS_EVERY_S,
        stream: IO[str] | None = None,
        bar: bool | None = None,
        show_rate: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stage, self.total, self.unit = stage, total, unit
        self.every_s = float(every_s)
        self._stream = stream
        self.bar = _is_terminal(self.stream) if bar is None else bar
        self.show_rate = show_rate
        self.clock = clock
        self.last_line = clock()
        self.first: tuple[float, int] | None = None  # (time, done) of the first update
        self._tqdm = None

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr  # stderr of now

    def restart(self, total: int | None = None) -> None:
        """A new pass over other work (a second dataset in one stage): a new total and a
        new base for the rate; the interval between lines goes on."""
        self.total, self.first = total, None
        if self._tqdm is not None:
            self._tqdm.reset(total=total)

    def rate(self, done: int, now: float) -> float | None:
        """Units a second since the first update; None before there are two points."""
        if self.first is None:
            return None
        t0, d0 = self.first
        if now <= t0 or done <= d0:
            return None
        return (done - d0) / (now - t0)

    def update(
        self, done: int, figures: dict[str, float] | None = None, total: int | None = None
    ) -> str | None:
        """Show ``done`` units (of ``total``, when given: it may change). Returns the line
        written, or None (a bar, or too soon after the last line)."""
        if total is not None:
            self.total = total
        now = self.clock()
        if self.first is None or done == self.first[1]:
            self.first = (now, done)  # nothing done since: the rate starts here
        rate = self.rate(done, now)
        figures = dict(figures or {})
        if self.show_rate and rate is not None:
            figures[f"{self.unit}/s"] = rate
        if self.bar:
            self._draw(done, figures)
            return None
        if done <= 0 or now - self.last_line < self.every_s:  # nothing done is no progress
            return None
        self.last_line = now
        eta = (self.total - done) / rate if rate and self.total else None
        line = progress_line(self.stage, done, self.total, self.unit, figures, eta)
        print(line, file=self.stream, flush=True)
        return line

    def _draw(self, done: int, figures: dict[str, float]) -> None:
        if self._tqdm is None:
            from tqdm import tqdm

            self._tqdm = tqdm(
                total=self.total,
                initial=done,
                unit=self.unit,
                desc=f"[raydc] {self.stage}",
                postfix=", ".join(format_figures(figures)) or None,
                file=self.stream,
                dynamic_ncols=True,
                leave=False,  # the stage's own finishing line replaces it
            )
            return
        if self.total is not None and self._tqdm.total != self.total:
            self._tqdm.total = self.total
        self._tqdm.set_postfix_str(", ".join(format_figures(figures)), refresh=False)
        self._tqdm.update(done - self._tqdm.n)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None


def training_figures(metrics: dict) -> dict[str, float]:
    """The figures a training progress line shows, from one report of the workers."""
    out = {}
    for key, label in (("loss", "loss"), ("tokens_per_s", "tokens/s")):
        v = metrics.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[label] = float(v)
    return out


class follow_training:  # noqa: N801  (used as a context manager, like open())
    """While training runs, read the reports raydc's Ray Train callback appends to
    ``metrics_path`` (one JSON object a line) and show them as ``progress``: a driver
    thread polling every ``poll_s``. Lines already there (a resumed run) are skipped.

    ``with follow_training(out / "metrics.jsonl", Progress("train", total=120)):
    trainer.fit()``"""

    def __init__(self, metrics_path: str | Path, progress: Progress, poll_s: float = 1.0):
        self.path, self.progress, self.poll_s = Path(metrics_path), progress, poll_s
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> int:
        """Show the complete lines written since the last poll; returns how many."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return 0
        end = chunk.rfind(b"\n") + 1  # a line being written is read at the next poll
        self._offset += end
        n = 0
        for raw in chunk[:end].splitlines():
            try:
                m = json.loads(raw)
            except ValueError:
                continue
            if isinstance(m, dict) and isinstance(m.get("step"), int):
                self.progress.update(m["step"], training_figures(m))
                n += 1
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def __enter__(self) -> follow_training:
        self._thread = threading.Thread(target=self._run, name="raydc-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.progress.close()


class DataProgress(logging.Handler):
    """On Ray Data's logger: its progress dumps (logged off a terminal every 10 s instead of
    a bar) as ``[raydc] <stage>`` lines, one at most every ``every_s``.

    A dump is a ``Running Dataset`` header, ``Total Progress: N/M`` (rows the consumer has
    taken), one ``<operator>: N/M`` line per operator and a closing rule. Where the consumer
    takes rows (``iter_batches``: eval, generate) the total progress is the count. Where it
    takes none (a dataset written to Parquet: prepare, score) it stays at 0, and the count
    is the rows out of the operator before the last (the writer), of as many rows as the
    largest operator total (the rows read). A new dataset starts a new total and rate."""

    _HEADER = re.compile(r"^=+ Running Dataset: (\S+) =+$")
    _COUNT = re.compile(r"^(\S.*?): (\d+)/(\d+|\?)$")  # "Total Progress: 3/8", "Op: 3/8"
    _RULE = re.compile(r"^=+$")

    def __init__(
        self,
        stage: str,
        every_s: float = PROGRESS_EVERY_S,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(logging.INFO)
        self.stage = stage
        self.dataset: str | None = None
        self.counts: list[tuple[str, int, int | None]] | None = None  # the dump being read
        self.progress = Progress(
            stage, unit="rows", every_s=every_s, stream=stream, show_rate=True, clock=clock
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a record that cannot format is not progress
            return
        header = self._HEADER.match(msg)
        if header:
            if header.group(1) != self.dataset:
                self.dataset = header.group(1)
                self.progress.restart()
            self.counts = []
            return
        if self.counts is None:
            return
        m = self._COUNT.match(msg)
        if m:
            total = None if m.group(3) == "?" else int(m.group(3))
            self.counts.append((m.group(1), int(m.group(2)), total))
        elif self._RULE.match(msg):
            counts, self.counts = self.counts, None
            done_total = self.rows(counts)
            if done_total is not None:
                self.progress.update(done_total[0], total=done_total[1])

    @staticmethod
    def rows(counts: list[tuple[str, int, int | None]]) -> tuple[int, int | None] | None:
        """(rows done, rows in all or None) of one dump's counts; None: nothing to show."""
        taken = [(d, t) for name, d, t in counts if name == "Total Progress"]
        ops = [(d, t) for name, d, t in counts if name != "Total Progress"]
        totals = [t for _, t in ops if t is not None]
        rows_in = max(totals) if totals else None
        if taken and taken[0][0] > 0:
            return taken[0][0], taken[0][1] or rows_in
        if len(ops) < 2 or (ops[-2][0] == 0 and rows_in is None):
            return None
        return ops[-2][0], rows_in

    def close(self) -> None:
        self.progress.close()
        super().close()
