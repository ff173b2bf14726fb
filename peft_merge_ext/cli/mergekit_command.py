"""`peft-merge-ext run mergekit.yaml --out DIR`: a mergekit configuration of `base+adapter` LoRA models, run with the
streamed pipeline (`publish.mergekit_run`), validated first (`publish.mergekit_config`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run_mergekit_file"]


def run_mergekit_file(
    args: argparse.Namespace,
    data: dict[str, Any],
    source_dir: Path | None,
    output_problems: Callable[[str, bool, list[Any]], list[str]],
    print_result: Callable[[Any], None],
) -> int:
    """Validate and run (or with `--dry-run`, validate and describe) a mergekit configuration; returns the number of
    problems `--dry-run` found (0 once a merge is written).

    The output is `--out` (relative to the working directory), else `merged` next to the configuration file.
    `output_problems` and `print_result` are the command line's own (what `--dry-run` checks, how a result prints).
    """
    from ..publish.mergekit_config import parse_mergekit_config

    if args.workers < 1:
        from ..errors import MergeInputError

        raise MergeInputError(f"--workers must be a positive number of threads, got {args.workers}.")
    config = parse_mergekit_config(data, source_dir)
    out = Path(args.out).absolute() if args.out is not None else (source_dir or Path.cwd()) / "merged"
    if args.dry_run:
        problems = output_problems(str(out), args.overwrite, [args.recipe, config.base, *config.adapters])
        print(f"mergekit configuration: merge_method {config.method}, base {config.base.name}")
        for index, entry in enumerate(config.inputs):
            print(f"  input {entry.reference}" + (" (base_model)" if index == config.base_index else ""))
        print("".join(f"Problem: {text}\n" for text in problems) + ("Validation: OK" if not problems else ""))
        return len(problems)
    from ..publish.mergekit_run import run_mergekit_config

    result = run_mergekit_config(
        config,
        out,
        overwrite=args.overwrite,
        quiet=args.quiet,
        device=args.device,
        allow_pickle=args.allow_pickle,
        inputs=[args.recipe],
        workers=args.workers,
    )
    print_result(result)
    return 0
