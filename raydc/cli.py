"""The ``raydc`` command line: the job's stages one by one.

    raydc prepare|score|select|train|tune|eval [--config FILE] [--stage NAME] [key=value ...]
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

STAGES = ("generate", "mixed_policy", "prepare", "score", "select", "train", "tune", "eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raydc",
        description="Distribution-corrected offline distillation on Ray.",
        epilog="Overrides are dotted config fields, e.g. train.max_steps=50 "
        "weights.preset=das_token (docs/configuration.md lists every field).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "generate": "sample teacher traces with their log-probs (vLLM) for generate.prompts",
        "mixed_policy": "mixed-policy traces: student prefixes continued by the teacher",
        "prepare": "read and tokenize the traces (rejects with reasons)",
        "score": "score teacher tokens under the student (and teacher) with vLLM",
        "select": "DASD divergence-aware top-k selection per prompt",
        "train": "weighted distillation on Ray Train + DeepSpeed",
        "tune": "Ray Tune search over the weighting (trials reuse the scores)",
        "eval": "generate on held-out prompts and grade (after train or tune)",
        "run": "the whole job: [generate] -> prepare -> score -> [select] -> train|tune -> [eval]",
        "config": "print the validated config (YAML) and exit",
    }
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
        "--stage",
        default=None,
        help="in a staged run (stages: in the config), run the command in this stage "
        "(the stages before it run or are reused first)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4"
    )


def load(args: argparse.Namespace):
    """The validated config of a parsed command line (file + overrides + --address)."""
    from raydc.config import load_config
    from raydc.pipeline import DEFAULT_CONFIG

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

    from raydc.infra.artifacts import StageError
    from raydc.pipeline import Pipeline
    from raydc.pipeline.summary import format_summary, summarize_run

    try:
        pipe = Pipeline(cfg)
        if args.stage:
            pipe = pipe.stage_pipeline(args.stage)
        if command == "run":
            pipe.run_all()
        else:
            pipe.run_until(command)
    except ConfigError as e:
        print(f"raydc: config error: {e}", file=sys.stderr)
        return 2
    except StageError as e:
        print(f"raydc: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raydc: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    summary = summarize_run(pipe.results, pipe.cfg)
    print(format_summary(summary), flush=True)
    if command == "run":
        out = Path(pipe.cfg.run.output_dir) / "summary.json"
        out.write_text(json.dumps(summary, indent=2, default=str))
        print(f"summary: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
