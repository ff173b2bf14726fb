"""`peft-merge-ext demo`: the whole path on a tiny model built locally (no download, a few seconds on a CPU).

1. Build a 2-layer Llama and two LoRA adapters of different ranks (one with rslora).
2. Combine them with the `slerp` plugin type through PEFT's own `add_weighted_adapter` and save the new adapter.
3. Merge the same combination into the base in memory (`save_merged`) and out of core from the saved folders
   (`merge_checkpoint`), and check that both checkpoints are bit-identical.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["build_demo_inputs", "run_demo"]


def build_demo_inputs(folder: str | Path, seed: int = 0) -> tuple[Any, Path, list[Path]]:
    """Build a tiny Llama with two LoRA adapters 'a' and 'b' and save the base and both adapters under `folder`.

    Returns:
        `tuple`: The `PeftModel` holding both adapters, the base folder and the two adapter folders.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(folder / "base")
    targets = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(seed + 1)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), adapter_name="a"
    )
    torch.manual_seed(seed + 2)
    model.add_adapter(
        "b", LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=targets, init_lora_weights=False)
    )
    adapters = []
    for name in ("a", "b"):
        model.save_pretrained(folder / "adapters", selected_adapters=[name])
        saved = folder / "adapters" / name if name != "default" else folder / "adapters"
        adapters.append(saved)
    return model, folder / "base", adapters


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def run_demo(out: str | Path | None = None) -> dict[str, Any]:
    """Run the demo and print a short summary.

    Args:
        out (`str` or `Path`, *optional*): Keep everything in this folder; a temporary folder by default.

    Returns:
        `dict`: What was measured (report summary, files, the largest difference between the two merges).
    """
    import torch
    from safetensors.torch import load_file

    import peft_merge_ext
    from peft_merge_ext.publish.merge_checkpoint import merge_checkpoint
    from peft_merge_ext.publish.save import save_merged

    peft_merge_ext.install()
    with (
        tempfile.TemporaryDirectory(prefix="peft-merge-ext-demo-") as scratch,
        warnings.catch_warnings(),
        _quiet_transformers(),
    ):
        warnings.simplefilter("ignore")
        folder = Path(out) if out is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        model, base_folder, adapter_folders = build_demo_inputs(folder)
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab", combination_type="slerp", t=[0.2, 0.8])
        report = peft_merge_ext.get_merge_report(model, "ab")
        model.save_pretrained(folder / "combined-adapter", selected_adapters=["ab"])
        print("Combined adapters a (r=4) and b (r=8, rslora) with slerp (t from 0.2 to 0.8 over depth) via PEFT's")
        print(f"add_weighted_adapter: {len(report.modules)} modules, provider {report.provider}.")
        summary = report.summary()
        print(
            "  report summary: "
            + ", ".join(
                f"{key} {value['min']:.3g}..{value['max']:.3g}" for key, value in summary.items() if key != "modules"
            )
        )
        for module in report.modules[:3]:
            stats = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in module.stats.items())
            print(f"  {module.name}: {stats}")
        result = merge_checkpoint(
            base_folder,
            adapter_folders,
            out=folder / "merged",
            combination_type="slerp",
            weights=[0.5, 0.5],
            t=[0.2, 0.8],
            quiet=True,
            overwrite=True,
        )
        streamed = {}
        for file_name in result.files:
            if file_name.endswith(".safetensors"):
                streamed.update(load_file(str(result.path / file_name)))
        in_memory_folder = save_merged(
            model,
            folder / "merged-in-memory",
            adapters=["a", "b"],
            weights=[0.5, 0.5],
            combination_type="slerp",
            t=[0.2, 0.8],
            overwrite=True,
        )
        in_memory = {}
        for path in sorted(in_memory_folder.glob("*.safetensors")):
            in_memory.update(load_file(str(path)))
        keys = sorted(in_memory)
        if set(keys) != set(streamed):
            raise RuntimeError("save_merged and merge_checkpoint wrote different tensors.")
        difference = max((streamed[k].double() - in_memory[k].double()).abs().max().item() for k in keys)
        identical = all(torch.equal(streamed[k], in_memory[k]) for k in keys)
        print(
            f"Merged the same combination into the base twice: in memory with save_merged ({in_memory_folder.name}/) "
            f"and streamed from the saved folders with merge_checkpoint ({result.path.name}/)."
        )
        print(
            f"save_merged vs merge_checkpoint: max |difference| {difference:.3g} "
            f"({'bit-identical' if identical else 'different'}) over {len(keys)} tensors."
        )
        if out is not None:
            print(f"Files kept in {folder}: base/, adapters/, combined-adapter/, merged-in-memory/, merged/.")
            print(f"Model card of the merged model: {folder / 'merged' / 'README.md'}")
        return {
            "report": report.summary(),
            "files": result.files,
            "max_difference": difference,
            "identical": identical,
        }
