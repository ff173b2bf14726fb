"""GGUF outputs of a merge, planned before anything is written: the merged model (`plan_model_export`: a writer the
pipeline streams into) and the combined adapter as a llama.cpp LoRA (`write_lora_gguf`).

Everything that can be refused (architecture, tensor names, rotary scaling, tokenizer) is checked by the `plan_*`
calls, which the merge functions run before creating the output folder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MergeInputError
from .model import GGUFModelLayout, plan_gguf_model, rope_permute, tensor_qtype
from .writer import GGUFFileWriter, TensorPlan

__all__ = ["ModelExport", "gguf_file_name", "plan_lora_export", "plan_model_export"]


def gguf_file_name(gguf_type: str, adapter: bool = False) -> str:
    """`model-Q8_0.gguf`, `adapter-F16.gguf`: the file a GGUF merge writes (llama.cpp's naming of the type)."""
    return f"{'adapter' if adapter else 'model'}-{gguf_type.upper()}.gguf"


def _general(writer: Any, kind: str, base_model: str | None, parameters: int) -> None:
    """The `general.*` metadata: type, name (the base's Hub id, or `merged-model`: never a local path), size label,
    base model, quantization version."""
    import gguf

    writer.add_type(kind)
    writer.add_name(base_model or "merged-model")
    if parameters:
        writer.add_size_label(gguf.size_label(parameters, 0, 0, 0))
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model.rsplit("/", 1)[-1])
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


@dataclass
class ModelExport:
    """A planned GGUF model file: its name and how to make its writer inside the output folder."""

    file_name: str
    layout: GGUFModelLayout
    make: Callable[[Path], GGUFFileWriter]

    def writer(self, folder: Path) -> GGUFFileWriter:
        """The writer of the file in `folder` (nothing is written before the first tensor)."""
        return self.make(folder / self.file_name)


def plan_model_export(
    config: Mapping[str, Any],
    specs: Sequence[Any],
    tokenizer_folders: Sequence[Path | None],
    gguf_type: str,
    base_model: str | None,
) -> ModelExport:
    """Plan the GGUF file of a merged model.

    Args:
        config (`Mapping`): The base's `config.json` data.
        specs (`Sequence[TensorSpec]`): The merged tensors in the order the pipeline produces them.
        tokenizer_folders (`Sequence[Path | None]`): Where the tokenizer files are (the base's folder first).
        gguf_type (`str`): `f32`, `f16`, `bf16` or `q8_0`.
        base_model (`str`, *optional*): The base's Hub id (recorded as `general.base_model.*`).

    Returns:
        `ModelExport`: The file name and writer factory.

    Raises:
        `MergeInputError`: An unsupported architecture, rotary scaling, tensor or tokenizer.
    """
    import gguf

    from .model import llama3_rope_factors
    from .vocab import plan_vocab

    layout = plan_gguf_model(config, specs, gguf_type)
    vocab = plan_vocab(tokenizer_folders, layout.hparams["vocab_size"], layout.arch)
    plans: dict[str, TensorPlan | None] = {spec.name: None for spec in specs}
    computed = []
    parameters = 0
    for tensor in layout.tensors:
        prepare = functools.partial(rope_permute, heads=tensor.heads) if tensor.heads else None
        plan = TensorPlan(tensor.name, tensor.shape, tensor.qtype, prepare)
        count = 1
        for size in tensor.shape:
            count *= size
        if tensor.source is None:
            computed.append((plan, llama3_rope_factors(layout.extra["rope"], layout.extra["head_dim"])))
            continue
        plans[tensor.source] = plan
        parameters += count

    def metadata(writer: Any) -> None:
        _general(writer, gguf.GGUFType.MODEL, base_model, parameters)
        layout.add_metadata(writer)
        vocab.add_to(writer)

    def make(path: Path) -> GGUFFileWriter:
        return GGUFFileWriter(path, layout.arch, metadata, specs, plans, computed)

    return ModelExport(gguf_file_name(gguf_type), layout, make)


@dataclass
class LoraExport:
    """A planned GGUF LoRA file: `write(folder, merged)` writes it."""

    file_name: str
    arch: str
    names: Mapping[str, str]
    heads: Mapping[str, int]
    gguf_type: str
    base_model: str | None

    def write(self, folder: Path, merged: Sequence[Any]) -> list[str]:
        """Write the adapter's factors (`MergedModule`s, scaling folded in) into `folder`; returns the file name."""
        import gguf
        import torch

        from ..checkpoint.writer import TensorSpec

        tensors: list[tuple[TensorPlan, Any]] = []
        ranks = set()
        for module in merged:
            name = self.names[module.module.name]
            b = module.delta.B.to(torch.float32)
            a = module.delta.A.to(torch.float32)
            heads = self.heads.get(module.module.name)
            if heads:
                b = rope_permute(b, heads)  # rows of the delta are the weight's rows
            ranks.add(module.delta.rank)
            for suffix, value in ((".lora_a", a), (".lora_b", b)):
                key = name + suffix
                tensors.append((TensorPlan(key, value.shape, tensor_qtype(key, value.shape, self.gguf_type)), value))
        # llama.cpp scales every pair by alpha / rank (one alpha per file); the factors already hold the combined
        # scaling, so alpha = the rank when all ranks agree (scale 1, as convert_lora_to_gguf.py writes), else 0,
        # which llama.cpp reads as scale 1 for every pair.
        alpha = float(next(iter(ranks))) if len(ranks) == 1 else 0.0

        def metadata(writer: Any) -> None:
            _general(writer, gguf.GGUFType.ADAPTER, self.base_model, 0)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

        specs = [TensorSpec(plan.name, plan.shape, value.dtype) for plan, value in tensors]
        plans = {plan.name: plan for plan, _ in tensors}
        writer = GGUFFileWriter(folder / self.file_name, self.arch, metadata, specs, plans)
        try:
            for plan, value in tensors:
                writer.write(plan.name, value)
            return writer.finish()
        finally:
            writer.close()


def plan_lora_export(
    config: Mapping[str, Any], modules: Sequence[Any], gguf_type: str, base_model: str | None
) -> LoraExport:
    """Plan the GGUF LoRA file of a combined adapter whose `modules` (`LoraModule`s: `name`, `kind`, `out_features`,
    `in_features`) target a base with `config`.

    Raises:
        `MergeInputError`: An unsupported architecture, or a module llama.cpp cannot apply a LoRA to (embeddings,
            convolutions, a module without a GGUF tensor).
    """
    from ..checkpoint.writer import TensorSpec

    names, heads = {}, {}
    for module in modules:
        if module.kind != "linear" or getattr(module, "transpose", False):
            raise MergeInputError(
                f"GGUF LoRA output supports adapters on linear layers; {module.name!r} is a {module.kind} layer. "
                "Write the adapter as safetensors (the default format), or merge it into the base (GGUF model output)."
            )
    specs = [TensorSpec(f"{module.name}.weight", (1, 1), _float32()) for module in modules]
    layout = plan_gguf_model(config, specs, gguf_type, adapter=True)
    tied = layout.hparams.get("tie_word_embeddings", False)
    for module, tensor in zip(modules, layout.tensors, strict=True):
        if tensor.name == "output.weight" and tied:
            raise MergeInputError(
                f"The adapter changes {module.name!r}, which the base ties to its embeddings; llama.cpp stores that "
                "weight once and cannot apply a LoRA to it. Merge into the base instead (GGUF model output)."
            )
        names[module.name] = tensor.name
        if tensor.heads:
            heads[module.name] = tensor.heads
    return LoraExport(gguf_file_name(gguf_type, adapter=True), layout.arch, names, heads, gguf_type, base_model)


def _float32() -> Any:
    import torch

    return torch.float32
