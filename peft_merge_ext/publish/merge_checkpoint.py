"""Out-of-core merge: base checkpoint on disk + LoRA adapter folders -> merged checkpoint (or combined adapter).

The base model is never loaded: its safetensors files are read one tensor at a time in storage order
(`checkpoint.base_checkpoint`); each targeted weight gets its merged delta, computed just before it is needed (so one
module's factors are in memory at a time) by the same `engine.combine` the in-memory path uses, and added by the same
`lowrank.weight_merge` function, so both paths give bit-identical tensors. A background thread writes each result
straight to its place in the planned output shards while the next one is computed; untouched tensors are copied
file to file by the kernel. Peak memory is about the largest merged tensor twice plus what the writer may hold (at
most max(64 MB, one output tensor)), whatever the model size.

Everything is validated (`checkpoint_plan.plan_checkpoint_merge`) before the output folder is created, and the first
module's combination runs before anything is written; the output folder appears atomically, never half-written.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.combine import MergedModule, ReportBuilder
from ..engine.merge_info import MergeInfo, library_versions
from .checkpoint_plan import MergePlan, plan_checkpoint_merge

__all__ = ["CheckpointMergeResult", "MergePlan", "gguf_problems", "merge_checkpoint", "plan_checkpoint_merge"]


@dataclass
class CheckpointMergeResult:
    """The result of `merge_checkpoint`.

    Args:
        path (`Path`): The output folder.
        files (`list[str]`): Every file the merge wrote (weights, index, config, tokenizer files, card, ...).
        merge_info (`MergeInfo`): The merge, as described in the model card.
        url (`str`, *optional*): The commit URL when the folder was uploaded.
        seconds (`float`): Wall time.
    """

    path: Path
    files: list[str]
    merge_info: Any
    url: str | None = None
    seconds: float = 0.0

    @property
    def report(self) -> Any:
        """The `MergeReport` of the combination."""
        return self.merge_info.report


class _Deltas:
    """The merged delta of each targeted weight, computed when that weight is written."""

    def __init__(self, plan: MergePlan) -> None:
        from ..engine.combine import num_layers

        self.plan = plan
        self.report = ReportBuilder(plan.request, plan.module_order)
        self.layers = num_layers(plan.base_config, plan.source.module_names())
        self._cache: dict[str, Any] = {}

    def __call__(self, key: str) -> Any:
        if key in self._cache:
            return self._cache.pop(key)
        plan = self.plan
        return self.report.combine(plan.source.module(plan.targets[key], plan.transpose[key]), self.layers)

    def probe(self) -> None:
        """Compute the first targeted weight's delta now, so a failing combination stops before any output."""
        first = next((t.name for t in self.plan.tensors if t.name in self.plan.targets), None)
        if first is not None:
            self._cache[first] = self(first)

    def all_modules(self) -> list[MergedModule]:
        """Every module's merged factors, in model order (for a combined adapter; small: rank x (in + out) each)."""
        order = {name: index for index, name in enumerate(self.plan.module_order)}
        names = sorted(self.plan.source.module_names(), key=lambda name: (order.get(name, len(order)), name))
        merged = []
        for name in names:
            module = self.plan.source.module(name)
            merged.append(MergedModule(module, self.report.combine(module, self.layers)))
        if self.plan.request.uniform_rank is not None:
            from ..engine.serving import snap_to_uniform_rank

            merged = snap_to_uniform_rank(merged, self.plan.request, self.report)
        return merged


def build_merge_info(plan: MergePlan, report: Any) -> MergeInfo:
    """The `MergeInfo` of a planned merge (for the model card, the recipe and the lineage)."""
    from collections import Counter

    from ..checkpoint.side_files import dtype_name, hub_id_of
    from ..engine.features import describe_edits

    infos = [plan.source.describe(a, w) for a, w in zip(plan.adapters, plan.request.weights, strict=True)]
    if plan.out_dtype is not None:
        dtype = dtype_name(plan.out_dtype)
    else:
        counts = Counter(dtype_name(t.dtype) for t in plan.tensors if t.dtype.is_floating_point)
        dtype = counts.most_common(1)[0][0] if counts else None
    base_model = hub_id_of(plan.base)
    if base_model is None:
        recorded = {hub_id_of(a.base_model_name_or_path) for a in plan.adapters if a.base_model_name_or_path}
        if len(recorded) == 1:
            base_model = next(iter(recorded))
    return MergeInfo(
        base_model=base_model,
        adapters=infos,
        combination_type=plan.request.method,
        options=dict(report.options),
        svd_rank=plan.request.svd_rank,
        merge_into_base=plan.merge_into_base,
        dtype=dtype,
        report=report,
        versions=library_versions(),
        provider=plan.request.provider,
        extras=describe_edits(plan.edits, plan.checkpoint.untied if plan.checkpoint is not None else ()),
    )


def merge_checkpoint(
    base: str | Path | None,
    adapters: Sequence[str | Path],
    *,
    out: str | Path,
    combination_type: str | None = None,
    weights: Sequence[float] | None = None,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    device: Any = None,
    push_to: str | None = None,
    svd_rank: int | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    private: bool | None = None,
    token: str | bool | None = None,
    merge_into_base: bool = True,
    inputs: Sequence[str | Path] = (),
    output_format: str | None = None,
    gguf_type: str | None = None,
    **combination_options: Any,
) -> CheckpointMergeResult:
    """Merge LoRA adapters into a base checkpoint on disk, streaming, without loading the model.

    Args:
        base (`str` or `Path`): The base model folder, or a Hub id already in the Hugging Face cache (optional with
            `merge_into_base=False`).
        adapters (`Sequence[str | Path]`): PEFT adapter folders (or cached Hub ids).
        out (`str` or `Path`): The output folder (must not exist or be empty unless `overwrite=True`).
        combination_type (`str`, *optional*): A registered combination type (`weighted`, `average`, `slerp`,
            `karcher` or a plugin's). `None`: a single adapter is merged as is, several are summed (`weighted`), as
            PEFT does with several active adapters and as `save_merged` does.
        weights (`Sequence[float]`, *optional*): One weight per adapter, 1.0 each by default.
        dtype (`str` or `torch.dtype`, *optional*): Output dtype of floating tensors (`"bf16"`, `"fp16"`, `"fp32"`);
            the base's dtypes by default.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): Output shard size limit.
        device (`str` or `torch.device`, *optional*): Where deltas are computed (`"cuda"` when available).
        push_to (`str`, *optional*): A Hub repo id to upload the finished folder to (checked before merging).
        svd_rank (`int`, *optional*): Upper bound on the merged rank per module.
        allow_pickle (`bool`, *optional*, defaults to `False`): Accept `.bin` pickle weights
            (`torch.load(weights_only=True)`).
        overwrite (`bool`, *optional*, defaults to `False`): Replace an output folder peft-merge-ext wrote before.
        quiet (`bool`, *optional*, defaults to `False`): No progress bar.
        private (`bool`, *optional*): Visibility of a repo created by `push_to`.
        token (`str` or `bool`, *optional*): Hub token for `push_to`.
        merge_into_base (`bool`, *optional*, defaults to `True`): `False` writes the combined adapter instead.
        inputs (`Sequence`, *optional*): More paths the output must not touch (a recipe file, ...).
        output_format (`str`, *optional*): `"safetensors"` (default) or `"gguf"`: one llama.cpp file written tensor
            by tensor (`model-<TYPE>.gguf`; with `merge_into_base=False` the combined adapter as a llama.cpp LoRA,
            `adapter-<TYPE>.gguf`), for Llama, Mistral and Qwen2 bases with a byte-level BPE tokenizer.
        gguf_type (`str`, *optional*): With `output_format="gguf"`: `f32`, `f16` (default), `bf16` or `q8_0`.
        combination_options: The combination type's options (e.g. `t=0.3` for `slerp`).

    Returns:
        `CheckpointMergeResult`: The folder, files, `MergeInfo` (with the merge report) and upload URL.

    Raises:
        `MergeInputError`: Any invalid input, before the output folder is created.
        `HubUploadError`: When the upload fails (checked before merging; the folder stays for `peft-merge-ext
            upload`).
    """
    from ..checkpoint.output_folder import check_output, output_folder
    from ..checkpoint.side_files import parse_dtype
    from ..checkpoint.writer import parse_size
    from ..errors import MergeInputError
    from .output import write_manifest

    started = time.perf_counter()
    try:
        parse_size(max_shard_size)
    except ValueError as error:
        raise MergeInputError(str(error)) from None
    parse_dtype(dtype)
    from ..gguf_output.options import parse_output_format

    output = parse_output_format(output_format, gguf_type)
    plan = plan_checkpoint_merge(
        base,
        adapters,
        combination_type=combination_type,
        weights=weights,
        dtype=dtype,
        svd_rank=svd_rank,
        allow_pickle=allow_pickle,
        device=device,
        merge_into_base=merge_into_base,
        **combination_options,
    )
    owned = [*(a.folder for a in plan.adapters), *([plan.base_folder] if plan.base_folder else []), *inputs]
    check_output(out, overwrite=overwrite, inputs=owned)
    hub_target = None
    if push_to is not None:
        from .hub import check_hub_access

        hub_target = check_hub_access(push_to, token=token, private=private)
    export = _plan_gguf(plan, output.gguf_type) if output.is_gguf else None
    deltas = _Deltas(plan)
    if plan.merge_into_base:
        deltas.probe()
    with output_folder(out, overwrite=overwrite, inputs=owned) as temporary:
        files = _write(plan, deltas, temporary, max_shard_size, quiet, export)
        info = build_merge_info(plan, deltas.report.build())
        info.output_format, info.gguf_type = output.name, output.gguf_type
        files += _write_side_files(plan, info, temporary, push_to or Path(out).name)
        write_manifest(temporary, files)
    url = None
    if hub_target is not None:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        from .hub import upload_files

        silence = quiet and not are_progress_bars_disabled()
        if silence:
            disable_progress_bars()
        try:
            url = upload_files(
                Path(out),
                files,
                hub_target,
                commit_message="Upload merged model with peft-merge-ext"
                if merge_into_base
                else "Upload LoRA adapter with peft-merge-ext",
            )
        finally:
            if silence:
                enable_progress_bars()
    return CheckpointMergeResult(Path(out), files, info, url, time.perf_counter() - started)


def _plan_gguf(plan: MergePlan, gguf_type: str) -> Any:
    """Check and plan the GGUF output (architecture, tensors, tokenizer) before the output folder exists."""
    from ..checkpoint.side_files import hub_id_of
    from ..errors import MergeInputError
    from ..gguf_output.export import plan_lora_export, plan_model_export

    if plan.base_config is None:
        raise MergeInputError(
            "GGUF output needs the base model (its config.json names the llama.cpp architecture); pass base=."
        )
    base_id = hub_id_of(plan.base)
    if not plan.merge_into_base:
        modules = [plan.source.module(name) for name in plan.source.module_names()]
        return plan_lora_export(plan.base_config, modules, gguf_type, base_id)
    folders = [plan.base_folder, *(a.folder for a in plan.adapters)]
    return plan_model_export(plan.base_config, plan.checkpoint.specs(plan.out_dtype), folders, gguf_type, base_id)


def gguf_problems(plan: MergePlan, output_format: str | None, gguf_type: str | None) -> list[str]:
    """What GGUF output would refuse for `plan` (for `--dry-run`): at most one problem."""
    from ..errors import MergeInputError
    from ..gguf_output.options import parse_output_format

    try:
        output = parse_output_format(output_format, gguf_type)
        if output.is_gguf and (plan.checkpoint is not None or not plan.merge_into_base):
            _plan_gguf(plan, output.gguf_type)
    except MergeInputError as error:
        return [str(error)]
    return []


def _write(
    plan: MergePlan, deltas: _Deltas, folder: Path, max_shard_size: int | str, quiet: bool, export: Any = None
) -> list[str]:
    from ..checkpoint.adapter_output import adapter_state_dict, combined_adapter_config, write_adapter
    from ..checkpoint.side_files import hub_id_of
    from .output import stream_weights

    if plan.merge_into_base:
        checkpoint = plan.checkpoint
        specs = checkpoint.specs(plan.out_dtype)
        items = checkpoint.merged_items(deltas, plan.transpose, plan.out_dtype, plan.device, edits=plan.edits)
        if export is not None:  # converted in this thread (torch uses every core): no queue of waiting tensors
            writer = export.writer(folder)
            return stream_weights(folder, specs, items, max_shard_size, quiet=quiet, background=False, writer=writer)
        return stream_weights(folder, specs, items, max_shard_size, quiet=quiet)
    merged = deltas.all_modules()
    if export is not None:
        return export.write(folder, merged)
    dtype = plan.out_dtype
    state = adapter_state_dict(
        [(m.module.name, m.module.kind, m.module.kernel, m.delta, dtype or m.module.storage_dtype) for m in merged]
    )
    base_id = hub_id_of(plan.base) if plan.base_folder is not None else None
    config = combined_adapter_config(
        plan.adapters[0].config.raw, {m.module.name: m.delta.rank for m in merged}, base_id
    )
    return write_adapter(folder, config, state)


def _write_side_files(plan: MergePlan, info: MergeInfo, folder: Path, repo_id: str) -> list[str]:
    from ..checkpoint.side_files import copy_side_files, write_config
    from .output import write_card

    files = []
    if plan.merge_into_base and info.output_format == "gguf":
        pass  # the GGUF file holds the config and the tokenizer
    elif plan.merge_into_base:
        write_config(
            plan.base_config,
            folder,
            dtype=plan.out_dtype,
            untied=bool(plan.checkpoint.untied),
            hub_id=info.base_model,
        )
        files.append("config.json")
        files += copy_side_files([plan.base_folder, *(a.folder for a in plan.adapters)], folder, info.base_model)
    else:
        from ..checkpoint.adapter_output import write_lineage

        files.append(write_lineage(folder, info.to_lineage()))
    notes = []
    if plan.checkpoint is not None and plan.checkpoint.untied:
        names = ", ".join(f"`{key}`" for key in sorted(set(plan.checkpoint.untied)))
        notes.append(
            f"The base ties {names}, but an adapter changes them, so the merged model stores them separately "
            "(`tie_word_embeddings: false`)."
        )
    files.append(write_card(info, folder, repo_id=repo_id, notes=notes, base_card_folder=plan.base_folder))
    return files
