"""What operators hit around the stage runner, without Ray: outputs deleted or truncated
after a stage finished, two jobs on one output folder, user files in a stage folder, an
output folder that cannot be written, and late checks made early. The stage functions
here are small fakes that write real Parquet; the real stages are run on these paths by
tests/integration/test_faults.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc.cli import main
from raydc.config import ConfigError, load_config
from raydc.infra.artifacts import HISTORY, MARKER, OWNED, OutputDirBusy, StageError
from raydc.pipeline import LOG, Pipeline


def _cfg(out: Path, *overrides: str):
    return load_config(
        None, [f"run.output_dir={out}", "score.student=", "score.teacher=null", *overrides]
    )


def _writer(rows_per_file=(3, 2)):
    calls = []

    def fn(out: Path) -> dict:
        calls.append(1)
        for i, n in enumerate(rows_per_file):
            pq.write_table(pa.table({"x": list(range(n))}), out / f"part-{i}.parquet")
        return {"rows_out": sum(rows_per_file)}

    return fn, calls


def _history(root: Path) -> list[str]:
    return [json.loads(x)["stage"] for x in (root / HISTORY).read_text().splitlines()]


def test_a_deleted_or_truncated_output_reruns_the_stage_that_made_it(tmp_path):
    pipe = Pipeline(_cfg(tmp_path / "run"), log=lambda m: None, connect_ray=False)
    fn, calls = _writer()
    first = pipe.run_stage("score", {"a": 1}, fn)
    marker = json.loads((first.out_dir / MARKER).read_text())
    assert marker["outputs"]["part-0.parquet"]["rows"] == 3
    assert marker["outputs"]["part-1.parquet"]["rows"] == 2

    assert pipe.run_stage("score", {"a": 1}, fn).skipped and len(calls) == 1

    logs: list[str] = []
    pipe.log = logs.append
    (first.out_dir / "part-1.parquet").unlink()
    again = pipe.run_stage("score", {"a": 1}, fn)
    assert not again.skipped and len(calls) == 2
    assert "part-1.parquet is missing" in logs[0]
    assert pq.ParquetFile(first.out_dir / "part-1.parquet").metadata.num_rows == 2

    # Truncated: same name, fewer bytes (a raw ArrowInvalid before this check).
    f = first.out_dir / "part-0.parquet"
    f.write_bytes(f.read_bytes()[:-20])
    assert not pipe.run_stage("score", {"a": 1}, fn).skipped and len(calls) == 3
    # Rewritten with other rows, same size class: the digest or the row count catches it.
    pq.write_table(pa.table({"x": [9, 9, 9]}), f)
    assert not pipe.run_stage("score", {"a": 1}, fn).skipped and len(calls) == 4
    assert _history(pipe.root) == ["score"] * 4


def test_train_vouches_for_its_model_not_its_checkpoints(tmp_path):
    from raydc.infra.stage import model_outputs as _model_outputs

    pipe = Pipeline(_cfg(tmp_path / "run"), log=lambda m: None, connect_ray=False)

    def fn(out: Path) -> dict:
        (out / "model").mkdir()
        (out / "model" / "model.safetensors").write_bytes(b"w" * 100)
        (out / "checkpoint_000001").mkdir()
        (out / "checkpoint_000001" / "state.pt").write_bytes(b"s")
        return {"model_dir": str(out / "model")}

    res = pipe.run_stage("train", {}, fn, resumable=True, vouch=_model_outputs)
    (res.out_dir / "checkpoint_000001" / "state.pt").unlink()  # pruned by the user: fine
    assert pipe.run_stage("train", {}, fn, resumable=True, vouch=_model_outputs).skipped
    # The exported model gone: rerun, resuming (the pending file keeps its checkpoints).
    (res.out_dir / "model" / "model.safetensors").unlink()
    seen = []

    def resume(out: Path) -> dict:
        seen.append(sorted(p.name for p in out.iterdir()))
        return fn(out) if not (out / "model").exists() else {"model_dir": str(out / "model")}

    again = pipe.run_stage("train", {}, resume, resumable=True, vouch=_model_outputs)
    assert not again.skipped
    assert "checkpoint_000001" in seen[0]  # the folder was kept, not cleared


def test_a_second_job_on_one_output_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from pathlib import Path
                from raydc.infra.artifacts import lock_output_dir
                Path({str(out)!r}).mkdir(parents=True)
                lock_output_dir(Path({str(out)!r}))
                print("locked", flush=True)
                time.sleep(120)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusy) as e:
            Pipeline(_cfg(out), connect_ray=False)
        assert f"pid {holder.pid}" in str(e.value) and str(out) in str(e.value)
        assert (
            main(["prepare", f"run.output_dir={out}", "score.student=", "score.teacher=null"]) == 1
        )
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL released it: the folder is usable again, no stale lock to remove.
    Pipeline(_cfg(out), connect_ray=False)


def test_a_stage_folder_raydc_did_not_make_is_never_deleted(tmp_path):
    out = tmp_path / "run"
    (out / "score").mkdir(parents=True)
    mine = out / "score" / "notes.txt"
    mine.write_text("my notes")
    pipe = Pipeline(_cfg(out), log=lambda m: None, connect_ray=False)
    fn, calls = _writer()
    with pytest.raises(StageError, match="raydc did not make it"):
        pipe.run_stage("score", {}, fn)
    assert mine.read_text() == "my notes" and not calls
    mine.unlink()
    res = pipe.run_stage("score", {}, fn)  # an empty folder is fine
    assert (res.out_dir / OWNED).exists()
    # A folder raydc made is cleared when its inputs change.
    (res.out_dir / "stale.txt").write_text("x")
    pipe.run_stage("score", {"changed": True}, fn)
    assert not (res.out_dir / "stale.txt").exists()


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_output_dir_is_refused(value, capsys):
    with pytest.raises(ConfigError, match="run.output_dir"):
        load_config(None, [f"run.output_dir={value}"])
    assert main(["prepare", f"run.output_dir={value}"]) == 2
    assert "run.output_dir" in capsys.readouterr().err


def test_an_unwritable_output_dir_fails_in_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for bad in (a_file, a_file / "sub"):
        assert main(["prepare", f"run.output_dir={bad}", "score.student="]) == 2
        err = capsys.readouterr().err
        assert err.startswith("raydc: config error: run.output_dir=") and err.count("\n") == 1
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert main(["prepare", f"run.output_dir={ro / 'run'}", "score.student="]) == 2
        assert "cannot write" in capsys.readouterr().err


def test_a_failed_stage_prints_one_line_and_logs_the_traceback(tmp_path):
    pipe = Pipeline(_cfg(tmp_path / "run"), log=lambda m: None, connect_ray=False)

    def boom(out: Path) -> dict:
        raise ValueError("bad value in row 7")

    with pytest.raises(StageError) as e:
        pipe.run_stage("score", {}, boom)
    assert "stage 'score' failed" in str(e.value) and "bad value in row 7" in str(e.value)
    log = (pipe.root / LOG).read_text()
    assert "Traceback" in log and "ValueError: bad value in row 7" in log
    assert not (pipe.root / "score" / MARKER).exists()


@pytest.mark.parametrize(
    "override, field",
    [
        (
            "score.student=/nonexistent/model",
            "score.student='/nonexistent/model': no such model folder",
        ),
        ("score.student=no-such-org/no-such-model", "the hub is offline"),
        ("data.path=/nonexistent/traces.jsonl", "data.path='/nonexistent/traces.jsonl'"),
        ("eval.path=/nonexistent/prompts.jsonl", "eval.path='/nonexistent/prompts.jsonl'"),
    ],
)
def test_missing_files_and_models_fail_before_any_stage(tmp_path, capsys, override, field):
    out = tmp_path / "run"
    rc = main(["run", f"run.output_dir={out}", "score.teacher=null", "eval.enabled=true", override])
    assert rc == 2
    err = capsys.readouterr().err
    assert [x for x in err.splitlines() if x.startswith("raydc:")] == [err.splitlines()[-1]]
    assert field in err and "Traceback" not in err
    assert not (out / "prepare").exists()


def test_a_teacher_smaller_than_its_tokenizer_fails_before_scoring(tmp_path, capsys):
    from raydc.infra.models import build_tiny_model

    teacher = Path(build_tiny_model(tmp_path / "t", "teacher"))
    cfg = json.loads((teacher / "config.json").read_text())
    cfg["vocab_size"] = 100
    (teacher / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    rc = main(["run", f"run.output_dir={out}", f"score.teacher={teacher}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "score.teacher=" in err and "vocab_size is 100" in err
    assert not (out / "prepare").exists()


def test_the_job_script_has_the_same_error_path(tmp_path):
    job = Path(__file__).resolve().parents[2] / "jobs" / "distill.py"
    r = subprocess.run(
        [sys.executable, str(job), f"run.output_dir={tmp_path / 'run'}", "train.lr=-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raydc: config error: train.lr=")


def test_a_bad_tune_space_fails_the_whole_job_before_any_stage(tmp_path, capsys):
    # Through `raydc run` / jobs/distill.py the sweep used to be checked only after
    # prepare, score and select had run (155 s here).
    out = tmp_path / "run"
    rc = main(["run", f"run.output_dir={out}", "score.teacher=null", "tune.enabled=true"])
    assert rc == 2
    assert "tune.space: empty" in capsys.readouterr().err
    assert not (out / "prepare").exists()


def test_a_full_disk_at_the_marker_never_marks_the_stage_done(tmp_path, monkeypatch):
    import errno

    import raydc.pipeline.runner as pipeline_mod

    pipe = Pipeline(_cfg(tmp_path / "run"), log=lambda m: None, connect_ray=False)
    fn, calls = _writer()
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith(MARKER):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(pipeline_mod.Path, "replace", lambda self, dst: full(self, dst))
    with pytest.raises(StageError, match="marker could not be written.*No space left"):
        pipe.run_stage("score", {}, fn)
    assert not (pipe.root / "score" / MARKER).exists()
    assert (pipe.root / ".score.pending.json").exists()  # still unfinished: rerun runs it
    monkeypatch.undo()
    assert not pipe.run_stage("score", {}, fn).skipped and len(calls) == 2
    assert pipe.run_stage("score", {}, fn).skipped
