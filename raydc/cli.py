"""The ``raydc`` command line: the job's stages one by one.

    raydc generate|mixed_policy|prepare|score|select|train|tune|eval
          [--config FILE] [--phase NAME] [key=value ...]   # a stage (the stage table's)
    raydc run    [--config FILE] [key=value ...]    # the whole job (= jobs/distill.py)
    raydc config [--config FILE] [key=value ...]    # print the validated config

Without ``--config`` the embedded example (``raydc/configs/default.yaml``) is used. A stage
runs whatever it needs upstream that is not done yet; finished stages whose inputs did not
change are reused (see raydc.pipeline), so ``raydc score`` then ``raydc train`` re-scores
nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from raydc.pipeline.table import STAGES

    p = argparse.ArgumentParser(
        prog="raydc",
        description="Distribution-corrected offline distillation on Ray.",
        epilog="Overrides are dotted config fields, e.g. train.max_steps=50 "
        "weights.preset=das_token (docs/configuration.md lists every field).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {s.name: s.help for s in STAGES}
    order = " -> ".join(f"[{s.name}]" if s.optional else s.name for s in STAGES)
    helps["run"] = f"the whole job, every enabled stage in order: {order}"
    helps["config"] = "print the validated config (YAML) and exit"
    for name, text in helps.items():
        sp = sub.add_parser(name, help=text, description=text)
        add_config_args(sp)
    return p


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help="YAML config (default: the embedded example, raydc/configs/default.yaml)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (sets run.ray_address): auto, host:port, ray://...",
    )
    p.add_argument(
        "--phase",
        default=None,
        help="in a run with DASD phases (phases: in the config), run the command in this "
        "phase (the phases before it run or are reused first)",
    )
    p.add_argument("--stage", dest="old_stage", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4"
    )


def load(args: argparse.Namespace):
    """The validated config of a parsed command line (file + overrides + --address)."""
    from raydc.config import ConfigError, load_config
    from raydc.pipeline import DEFAULT_CONFIG

    if getattr(args, "old_stage", None):
        raise ConfigError(f"--stage {args.old_stage}: renamed to --phase (a DASD training phase)")
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"run.ray_address={args.address}")
    return load_config(args.config or DEFAULT_CONFIG, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(args.command, args)


def execute(command: str, args: argparse.Namespace) -> int:
    """Run one command (a stage, ``run`` or ``config``) with one error path for every entry
    point (``raydc``, ``jobs/distill.py``, ``ray job submit``): a config error, a missing
    file or model, a busy output folder or a failed stage prints one line naming the field,
    path or stage and returns non-zero (2: the config, 1: a stage); the traceback of a
    failed stage is in ``<run.output_dir>/raydc.log``."""
    from raydc.config import ConfigError, dump_config

    try:
        cfg = load(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"raydc: config error: {e}", file=sys.stderr)
        return 2
    if command == "config":
        print(dump_config(cfg), end="")
        return 0

    from raydc.infra import tracking
    from raydc.infra.artifacts import StageError, write_private
    from raydc.infra.runtime import RAY_LOG, native_stderr_to
    from raydc.pipeline import Pipeline
    from raydc.pipeline.summary import format_summary, summarize_run

    try:
        pipe = Pipeline(cfg)
        tracking.start_job(pipe.cfg)  # MLflow / W&B (run.trackers): the job's run
        if args.phase:
            pipe = pipe.phase_pipeline(args.phase)
        # Ray's C++ log lines on the driver's stderr go to the run's ray.log too
        with native_stderr_to(Path(pipe.cfg.run.output_dir) / RAY_LOG):
            if command == "run":
                pipe.run_all()
            else:
                pipe.run_until(command)
    except ConfigError as e:
        tracking.finish_job("FAILED")
        print(f"raydc: config error: {e}", file=sys.stderr)
        return 2
    except StageError as e:
        tracking.finish_job("FAILED")
        print(f"raydc: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        tracking.finish_job("KILLED")
        print("raydc: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    summary = summarize_run(pipe.results, pipe.cfg)
    print(format_summary(summary), flush=True)
    for name, where in tracking.finish_job("FINISHED", summary, pipe.results).items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in where.items()))
    if command == "run":
        out = Path(pipe.cfg.run.output_dir) / "summary.json"
        write_private(out, json.dumps(summary, indent=2, default=str))
        print(f"summary: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
