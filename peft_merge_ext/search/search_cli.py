"""`peft-merge-ext search`: load a base and adapters from local folders, search the weights, print and save them.

The eval file is JSONL, one example per line; the searched adapter and `search.json` go to `--out` through
`checkpoint.output_folder`.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import EvaluationInputError, MergeInputError

__all__ = ["run_search_cli"]


def _read_eval_file(path: str) -> list[Any]:
    """The examples of the JSONL eval file `path`, one JSON object a line (blank lines skipped)."""
    examples = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvaluationInputError(f"{path}:{line_number} is not valid JSON: {error}.") from None
            if not isinstance(record, dict):
                raise EvaluationInputError(f'{path}:{line_number} must be a JSON object like {{"text": "..."}}.')
            examples.append(record)
    if not examples:
        raise EvaluationInputError(f'{path} holds no examples; write one {{"text": "..."}} object per line.')
    return examples


def run_search_cli(args: Any) -> int:
    """Run `peft-merge-ext search`: load a base and adapters from local folders, search, print, optionally save.

    Args:
        args (`argparse.Namespace`): `base`, `adapter` (list of folders), `eval_file` (JSONL, one `{"text": ...}`
            per line; `{"prompt", "completion"}` also works), and optionally `method` (default `"weighted"`),
            `budget` (40), `seed` (0), `out` (a folder for the searched adapter plus `search.json`), `svd_rank`,
            `device`, `batch_size`.

    Returns:
        `int`: The exit code (0).
    """
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer

    adapters = list(getattr(args, "adapter", None) or [])
    if not adapters:
        raise MergeInputError("Give the adapters to combine with --adapter PATH (once per adapter).")
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise MergeInputError(f"Output folder {out} already exists and is not empty; choose another --out.")
    examples = _read_eval_file(args.eval_file)
    needs_tokenizer = any("input_ids" not in example for example in examples)
    tokenizer = None
    if needs_tokenizer:
        for source in (args.base, adapters[0]):
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
                break
            except Exception:  # a folder without tokenizer files; try the next one
                continue
        if tokenizer is None:
            raise EvaluationInputError(
                f"The eval file holds text, but neither {args.base} nor {adapters[0]} has tokenizer files; save the "
                "tokenizer next to the base model (tokenizer.save_pretrained(base_folder))."
            )
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    from ..peft_bridge.loading import load_peft_model
    from .weight_search import search_weights

    model, names = load_peft_model(args.base, adapters)
    model.to(device)
    result = search_weights(
        model,
        names,
        examples,
        combination_type=getattr(args, "method", None) or "weighted",
        budget=getattr(args, "budget", None) or 40,
        seed=getattr(args, "seed", None) or 0,
        svd_rank=getattr(args, "svd_rank", None),
        tokenizer=tokenizer,
        batch_size=getattr(args, "batch_size", None) or 8,
    )
    print(f"combination_type: {result.combination_type} (optimizer: {result.optimizer}, {len(result.history)} trials)")
    for path, name, weight in zip(adapters, names, result.weights, strict=True):
        print(f"  {name}: {weight:.6g}  ({path})")
    print(f"eval loss: {result.value:.6g} (initial weights {result.history[0].weights}: {result.initial_value:.6g})")
    if out is not None:
        import shutil
        import tempfile

        from ..checkpoint.output_folder import output_folder

        with (
            output_folder(out, inputs=[args.base, *adapters]) as folder,
            tempfile.TemporaryDirectory(dir=folder) as scratch,
        ):
            model.save_pretrained(scratch, selected_adapters=[result.adapter_name])
            saved = Path(scratch) / result.adapter_name
            saved = saved if saved.is_dir() else Path(scratch)
            for item in saved.iterdir():
                shutil.move(str(item), folder / item.name)
            (folder / "search.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"searched adapter saved to {out}")
    return 0
