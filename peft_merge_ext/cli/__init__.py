"""The `peft-merge-ext` command line.

```
peft-merge-ext plugins [--json]
peft-merge-ext demo [--out DIR]
peft-merge-ext merge --base PATH --adapter PATH [--adapter PATH ...] [--weights W ...] [--method NAME] [--t T ...]
                     [--svd-rank K] [--dtype bf16] --out DIR [--push REPO_ID] [--private] [--dry-run] [--quiet]
                     [--format {safetensors,gguf}] [--gguf-type {f32,f16,bf16,q8_0}]
peft-merge-ext run RECIPE.yaml [--dry-run]
peft-merge-ext upload DIR REPO_ID [--private | --public] [--revision B] [--create-pr] [--message M] [--description D]
peft-merge-ext search --base PATH --adapter PATH ... --eval-file JSONL [--method NAME] [--budget N] [--seed S]
```

Bad input (including an output location the disk refuses: full, file too large, read-only) gives a one-line error on
stderr and exit code 2, naming the file or argument and the fix; user input is quoted at most about 200 characters
long. `--dry-run` also checks the output folder. Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
MAX_QUOTED = 200  # characters of one word of an error message (user input) printed at most


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (argparse's own convention)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="Base model folder, or a Hub id already in the HF cache.")
    parser.add_argument(
        "--adapter", action="append", required=True, metavar="PATH", help="A PEFT adapter folder; repeat for each."
    )
    parser.add_argument("--weights", nargs="+", type=float, metavar="W", help="One weight per adapter.")
    parser.add_argument("--method", help="Combination type (see `peft-merge-ext plugins`); optional for one adapter.")
    parser.add_argument("--t", nargs="+", type=float, metavar="T", help="slerp: a factor, or anchors over depth.")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Any option of the method; VALUE is parsed as JSON when it can be (e.g. --option max_iter=50).",
    )
    parser.add_argument("--svd-rank", type=int, metavar="K", help="Upper bound on the merged rank per module.")
    parser.add_argument(
        "--svd-energy", type=float, metavar="F", help="Keep per module the smallest rank holding this energy fraction."
    )
    parser.add_argument(
        "--uniform-rank",
        nargs="*",
        type=int,
        metavar="R",
        help="Give the combined adapter one rank, the smallest of R... (default: the ranks vLLM accepts) that fits.",
    )
    parser.add_argument(
        "--adapter-only", action="store_true", help="Write the combined LoRA adapter instead of a merged model."
    )
    parser.add_argument("--dtype", help="Output dtype: bf16, fp16 or fp32 (default: the base's).")
    parser.add_argument(
        "--format",
        dest="output_format",
        choices=["safetensors", "gguf"],
        help="safetensors (default: a Hugging Face folder) or gguf (one llama.cpp file; Llama, Mistral, Qwen2).",
    )
    parser.add_argument(
        "--gguf-type", help="With --format gguf: f32, f16 (default), bf16 or q8_0 (type of the 2-D weights)."
    )
    parser.add_argument("--device", help="Where deltas are computed, e.g. cuda (default: cpu).")
    parser.add_argument("--max-shard-size", default="5GB", help="Output shard size limit (default: 5GB).")
    parser.add_argument("--allow-pickle", action="store_true", help="Accept .bin pickle weights (weights_only).")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `peft-merge-ext`."""
    parser = _Parser(prog="peft-merge-ext", description="Merge LoRA adapters: plugins, streaming merges, recipes.")
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"peft-merge-ext {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    plugins = commands.add_parser("plugins", help="List installed plugins and their combination types.")
    plugins.add_argument("--json", action="store_true", help="Print JSON.")

    demo = commands.add_parser("demo", help="Build tiny local models and merge them (no download).")
    demo.add_argument(
        "--out",
        default="peft-merge-ext-demo",
        help="Keep the results (base, adapters, merged models and their model cards) in this folder "
        "(default: ./peft-merge-ext-demo, replaced on each run).",
    )

    merge = commands.add_parser("merge", help="Merge adapters into a base checkpoint on disk, streaming.")
    _add_merge_arguments(merge)
    merge.add_argument("--out", required=True, help="Output folder (must not exist or be empty).")
    merge.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    merge.add_argument("--push", metavar="REPO_ID", help="Upload the merged folder to this Hub repository.")
    merge.add_argument("--private", action="store_true", help="Create the Hub repository as private.")
    merge.add_argument("--dry-run", action="store_true", help="Print the plan and validation problems; write nothing.")
    merge.add_argument("--quiet", action="store_true", help="No progress bar.")

    run = commands.add_parser("run", help="Run a YAML merge recipe.")
    run.add_argument("recipe", help="The recipe file (the model card of a merged model contains one).")
    run.add_argument("--dry-run", action="store_true", help="Print the plan and validation problems; write nothing.")
    run.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    run.add_argument("--quiet", action="store_true", help="No progress bar.")
    run.add_argument("--allow-pickle", action="store_true", help="Accept .bin pickle weights (weights_only).")
    run.add_argument("--device", help="Where deltas are computed, e.g. cuda (default: cpu).")
    run.add_argument(
        "--out",
        metavar="DIR",
        help="Output folder of the last step, overriding the recipe's; for a mergekit configuration (default: "
        "merged, next to it).",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="mergekit configurations: merge N modules at a time on N threads (default 1: least memory; more is "
        "faster on several cores, at about N times the working memory).",
    )

    upload = commands.add_parser("upload", help="Upload a merged folder (e.g. after a failed push).")
    upload.add_argument("folder", help="The folder to upload.")
    upload.add_argument("repo_id", help="The Hub repository, e.g. user/model.")
    visibility = upload.add_mutually_exclusive_group()
    visibility.add_argument("--private", action="store_true", help="Create the repository as private.")
    visibility.add_argument("--public", action="store_true", help="Create the repository as public.")
    upload.add_argument("--revision", help="Branch to upload to (created if needed).")
    upload.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    upload.add_argument("--message", help="Commit message.")
    upload.add_argument("--description", help="Commit description (the pull request description with --create-pr).")

    search = commands.add_parser("search", help="Search adapter weights that maximize a metric on an eval set.")
    search.add_argument("--base", required=True, help="Base model folder (or cached Hub id).")
    search.add_argument("--adapter", action="append", required=True, metavar="PATH", help="Adapter folder; repeat.")
    search.add_argument("--eval-file", required=True, metavar="JSONL", help="Evaluation examples, one JSON per line.")
    search.add_argument("--method", help="Combination type to search (default: weighted).")
    search.add_argument("--budget", type=int, metavar="N", help="Number of trials (default: 40).")
    search.add_argument("--seed", type=int, metavar="S", help="Random seed (default: 0).")
    search.add_argument("--svd-rank", type=int, metavar="K", help="Upper bound on the merged rank per module.")
    search.add_argument("--device", help="Where the evaluation runs (default: cuda when available).")
    search.add_argument("--batch-size", type=int, metavar="B", help="Evaluation batch size (default: 8).")
    search.add_argument("--out", metavar="DIR", help="Write the best combined adapter and search.json here.")
    return parser


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from ..errors import MergeInputError

    options: dict[str, Any] = {}
    if args.t is not None:
        options["t"] = args.t[0] if len(args.t) == 1 else list(args.t)
    for item in args.option:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise MergeInputError(f"--option needs KEY=VALUE, got {item!r}.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if getattr(args, "svd_energy", None) is not None:
        options["svd_energy"] = args.svd_energy
    if getattr(args, "uniform_rank", None) is not None:
        options["uniform_rank"] = list(args.uniform_rank) or True
    return options


def _command_plugins(args: argparse.Namespace) -> int:
    from ..plugins.registry import get_combination_types, get_plugins

    types = get_combination_types()
    plugins = [
        {
            "name": plugin.name,
            "distribution": plugin.distribution,
            "version": plugin.version,
            "hooks": list(plugin.hooks),
            "types": [
                {"name": name, "description": types[name].description, "options": dict(types[name].options)}
                for name in plugin.types
                if name in types
            ],
        }
        for plugin in get_plugins()
    ]
    if args.json:
        print(json.dumps(plugins, indent=2, default=repr))
        return 0
    for plugin in plugins:
        origin = f"{plugin['distribution']} {plugin['version']}" if plugin["distribution"] else "local"
        print(f"{plugin['name']} ({origin}) hooks: {', '.join(plugin['hooks']) or 'none'}")
        for entry in plugin["types"]:
            options = ", ".join(f"{k}={v!r}" for k, v in entry["options"].items())
            print(f"  {entry['name']}: {entry['description']}" + (f" [options: {options}]" if options else ""))
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.out)
    return 0


def _print_result(result: Any) -> None:
    print(f"Merged model written to {result.path} ({', '.join(result.files)}) in {result.seconds:.1f} s.")
    if result.report is not None:
        summary = result.report.summary()
        print(f"Method {result.report.combination_type}: {summary['modules']} modules", end="")
        for key in ("rank", "energy_kept"):
            if key in summary:
                values = summary[key]
                print(f", {key} min {values['min']:.4g} / mean {values['mean']:.4g} / max {values['max']:.4g}", end="")
        print(".")
    if result.url:
        print(f"Uploaded: {result.url}")


def _command_merge(args: argparse.Namespace) -> int:
    from ..publish.merge_checkpoint import gguf_problems, merge_checkpoint, plan_checkpoint_merge

    options = _options(args)
    common = {
        "combination_type": args.method,
        "weights": args.weights,
        "dtype": args.dtype,
        "svd_rank": args.svd_rank,
        "allow_pickle": args.allow_pickle,
        "device": args.device,
        "merge_into_base": not args.adapter_only,
    }
    if args.dry_run:
        plan = plan_checkpoint_merge(args.base, args.adapter, strict=False, **common, **options)
        inputs = [*(adapter.folder for adapter in plan.adapters), plan.base_folder]
        plan.problems.extend(_output_problems(args.out, args.overwrite, inputs))
        plan.problems.extend(gguf_problems(plan, args.output_format, args.gguf_type))
        print(plan.describe())
        return EXIT_BAD_INPUT if plan.problems else 0
    result = merge_checkpoint(
        args.base,
        args.adapter,
        out=args.out,
        max_shard_size=args.max_shard_size,
        push_to=args.push,
        private=True if args.private else None,
        overwrite=args.overwrite,
        quiet=args.quiet,
        output_format=args.output_format,
        gguf_type=args.gguf_type,
        **common,
        **options,
    )
    _print_result(result)
    return 0


def _command_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..publish.mergekit_config import is_mergekit_config
    from ..recipe import load_recipe, read_recipe_yaml
    from .recipe_runner import run_recipe

    data, source_dir = read_recipe_yaml(Path(args.recipe))
    if is_mergekit_config(data):
        from .mergekit_command import run_mergekit_file

        problems = run_mergekit_file(args, data, source_dir, _output_problems, _print_result)
        return EXIT_BAD_INPUT if problems else 0
    if args.workers != 1:
        from ..errors import MergeInputError

        raise MergeInputError(
            f"--workers applies to mergekit configurations only; {args.recipe} is a peft-merge-ext recipe (its "
            "merges stream one module at a time). Remove --workers."
        )
    recipe = load_recipe(Path(args.recipe))
    if args.out is not None:  # relative to where the command runs, like every command-line path
        recipe.steps[-1].output = str(Path(args.out).absolute())
    common = {"allow_pickle": args.allow_pickle, "device": args.device, "recipe_file": args.recipe}
    if args.dry_run:
        problems = 0
        plans = run_recipe(recipe, dry_run=True, **common)
        for index, (step, plan) in enumerate(zip(recipe.steps, plans, strict=True)):
            if len(recipe.steps) > 1:
                print(f"Step {index + 1} of {len(recipe.steps)}:")
            inputs = [
                args.recipe,
                recipe.resolve_path(recipe.base),
                *(recipe.resolve_path(a.path) for a in step.adapters),
            ]
            output = step.output
            if recipe.source_dir is not None and not Path(output).expanduser().is_absolute():
                output = str(recipe.source_dir / output)
            found = _output_problems(output, args.overwrite, inputs)
            if plan is None:
                print("(reads the output of an earlier step, or runs in memory with PEFT: planned when it runs)")
                print("".join(f"Problem: {text}\n" for text in found), end="")
            else:
                plan.problems.extend(found)
                print(plan.describe())
                found = plan.problems
            problems += len(found)
        return EXIT_BAD_INPUT if problems else 0
    for result in run_recipe(recipe, quiet=args.quiet, overwrite=args.overwrite, **common):
        if hasattr(result, "report"):
            _print_result(result)
        else:
            print(f"Written to {result} (in memory, by PEFT's own combination type).")
    return 0


def _output_problems(out: str, overwrite: bool, inputs: list[Any]) -> list[str]:
    """What `check_output` refuses about an output folder (for `--dry-run`): a list of at most one problem."""
    from ..checkpoint.output_folder import check_output
    from ..errors import MergeInputError

    try:
        check_output(out, overwrite=overwrite, inputs=inputs)
    except MergeInputError as error:
        return [_one_line(error)]
    return []


def _command_upload(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import MergeInputError
    from ..publish.hub import upload_folder

    if not Path(args.folder).is_dir():
        raise MergeInputError(f"{args.folder} is not a folder.")
    url = upload_folder(
        args.folder,
        args.repo_id,
        private=True if args.private else False if args.public else None,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.message,
        commit_description=args.description,
    )
    print(f"Uploaded {args.folder} to {args.repo_id}: {url}")
    return 0


def _command_search(args: argparse.Namespace) -> int:
    try:
        from ..search.search_cli import run_search_cli
    except ImportError as error:
        from ..errors import MergeInputError

        raise MergeInputError(f"Weight search is not available in this installation ({error}).") from None
    return int(run_search_cli(args) or 0)


_COMMANDS = {
    "plugins": _command_plugins,
    "demo": _command_demo,
    "merge": _command_merge,
    "run": _command_run,
    "upload": _command_upload,
    "search": _command_search,
}


def _one_line(error: BaseException) -> str:
    """The message of `error` on one line: whitespace and control characters (terminal escapes included) collapsed,
    and every word longer than `MAX_QUOTED` characters (user input) cut short."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(error))
    text = "".join(char if char.isprintable() else " " for char in text)
    words = [word if len(word) <= MAX_QUOTED else word[:MAX_QUOTED] + "..." for word in text.split()]
    return " ".join(words) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run `peft-merge-ext` with `argv` (default: `sys.argv[1:]`) and return the exit code."""
    args = build_parser().parse_args(argv)
    from ..errors import HubUploadError, PeftMergeExtError

    try:
        return _COMMANDS[args.command](args)
    except HubUploadError as error:
        print(f"peft-merge-ext: upload failed: {_one_line(error)}", file=sys.stderr)
        return EXIT_FAILURE
    except (PeftMergeExtError, OSError) as error:  # OSError: a file or folder the system refused
        print(f"peft-merge-ext: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("peft-merge-ext: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
