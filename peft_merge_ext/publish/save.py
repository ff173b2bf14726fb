"""`save_merged` / `push_merged`: publish ONE model (or one combined adapter) from a model carrying LoRA adapters.

The pipeline, each step in one place: the live factor source (`peft_bridge.source`) -> the request
(`engine.request.resolve_request`: default method, weights, options) -> combine (`peft_bridge.source.merge_live`:
`engine.combine` for registered types and single adapters, PEFT itself for PEFT's types) -> the weights (the
in-memory base, `peft_bridge.weights`, or for a quantized base its checkpoint on disk,
`checkpoint.base_checkpoint`) -> the writer (`publish.output.stream_weights`) -> the output folder
(`checkpoint.output_folder`, atomic; `checkpoint.side_files`) -> the card (`publish.card`, with lineage and recipe).

The user's model is never modified: merged weights are computed module by module and each is written straight to its
place in safetensors shards planned up front. Extra memory is one merged tensor at a time, plus, for modules
offloaded by accelerate, one onloaded module.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint.side_files import base_folder, dtype_name, hub_id_of, parse_dtype
from ..engine.merge_info import MergeInfo, library_versions
from ..errors import MergeInputError

__all__ = ["MergeArguments", "save_merged", "save_to_folder"]


@dataclass
class _Plan:
    """A validated in-memory merge: the request, its merged factors and its description."""

    source: Any
    request: Any
    merged: list[Any]
    info: MergeInfo
    dtype: Any
    base_name: str | None
    base_folder: Path | None
    checkpoint: Path | None
    notes: list[str] = field(default_factory=list)
    edits: dict[str, Any] = field(default_factory=dict)
    gguf: Any = None  # the planned GGUF output (gguf_output.export), when format="gguf"


def _check_card_inputs(tags: Any, eval_results: Any) -> None:
    if tags is not None and (isinstance(tags, str) or not all(isinstance(tag, str) for tag in tags)):
        raise MergeInputError(f"tags must be a list of strings, got {str(tags)[:100]!r}.")
    if eval_results is not None:
        from huggingface_hub import EvalResult

        for row in eval_results:
            if isinstance(row, EvalResult):
                continue
            try:
                EvalResult(**dict(row))
            except (TypeError, ValueError) as error:
                raise MergeInputError(
                    f"Bad eval_results row {str(row)[:200]}: {error}. Each row needs task_type, dataset_type, "
                    "dataset_name, metric_type and metric_value (see huggingface_hub.EvalResult)."
                ) from None


@dataclass
class MergeArguments:
    """The arguments of one `save_merged` / `push_merged` call that decide what is merged and written."""

    adapters: Sequence[str] | None
    weights: Sequence[float] | None
    combination_type: str | None
    merge_into_base: bool
    max_shard_size: int | str
    tags: Sequence[str] | None
    dtype: Any
    eval_results: list[dict[str, Any]] | None
    base_model: str | None
    base_checkpoint: str | os.PathLike | None
    repo_id: str | None
    options: dict[str, Any]
    caller: tuple[str, list[str]] = ("save_merged", [])
    format: str | None = None
    gguf_type: str | None = None

    @classmethod
    def of(cls, scope: dict[str, Any], function: Any) -> MergeArguments:
        """The arguments found in the `locals()` of `function` (`save_merged` or `push_merged`), which also names
        the caller and its own parameters for the error about a misspelled one."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("options", "caller")]
        values = {name: scope.get(name) for name in names}
        return cls(
            **values, options=scope["combination_options"], caller=(function.__name__, _own_parameters(function))
        )


def _resolve(model: Any, args: MergeArguments) -> tuple[Any, Any, Any]:
    """Validate everything that needs no computation: the source, the request, the shard size and the dtype.

    `args.caller` (`save_merged` or `push_merged`) names the function whose `**combination_options` took the options,
    so that a misspelled parameter (`adapter=`) is reported as such rather than as an option of the combination type.
    """
    from ..checkpoint.writer import parse_size
    from ..engine.request import resolve_request
    from ..peft_bridge.source import resolve_model

    source = resolve_model(model)
    try:
        parse_size(args.max_shard_size)
    except ValueError as error:
        raise MergeInputError(str(error)) from None
    if not isinstance(args.merge_into_base, bool):
        raise MergeInputError(f"merge_into_base must be True or False, got {args.merge_into_base!r}.")
    out_dtype = parse_dtype(args.dtype)
    adapters = args.adapters
    if adapters is None:
        adapters = list(source.active)
        if not adapters:
            raise MergeInputError("No adapter to merge: the model has no active adapter and none was given.")
    elif isinstance(adapters, str):
        adapters = [adapters]
    options = dict(args.options)
    svd_rank = options.pop("svd_rank", None)
    request = resolve_request(
        source.configs,
        adapters,
        args.weights,
        args.combination_type,
        svd_rank,
        options,
        parameters=args.caller,
        merge_into_base=args.merge_into_base,
    )
    from ..engine.serving import check_serving_target

    check_serving_target(request, args.merge_into_base)
    return source, request, out_dtype


def _own_parameters(function: Any) -> list[str]:
    """The named parameters of `function` (not its `**kwargs`)."""
    import inspect

    return [
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def _plan(model: Any, args: MergeArguments) -> _Plan:
    """Validate everything, then compute the merged factors (small: rank x (in + out) per module)."""
    from ..engine.features import describe_edits
    from ..gguf_output.options import parse_output_format
    from ..peft_bridge.source import merge_live
    from ..peft_bridge.weights import check_loadable, factors_onloaded, is_quantized

    output = parse_output_format(args.format, args.gguf_type)
    source, request, out_dtype = _resolve(model, args)
    base = source.base
    name = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    hub_id = args.base_model or hub_id_of(name)
    check_loadable(base)
    checkpoint = None
    if args.merge_into_base and is_quantized(base):
        checkpoint = _checkpoint_for_quantized(name, args.base_checkpoint)
    with factors_onloaded(base, request.adapters, request.is_peft_type):
        merged, report = merge_live(source, request)
        infos = [source.describe(a, w) for a, w in zip(request.adapters, request.weights, strict=True)]
        edits = source.edits(request) if args.merge_into_base else {}
    info = MergeInfo(
        base_model=hub_id,
        adapters=infos,
        combination_type=request.method,
        options=dict(report.options),
        svd_rank=request.svd_rank,
        merge_into_base=args.merge_into_base,
        dtype=dtype_name(out_dtype or _model_dtype(base)),
        report=report,
        eval_results=list(args.eval_results) if args.eval_results else None,
        versions=library_versions(),
        provider=request.provider,
        extras=describe_edits(edits),
        output_format=output.name,
        gguf_type=output.gguf_type,
    )
    plan = _Plan(source, request, merged, info, out_dtype, name, base_folder(name), checkpoint)
    plan.edits = edits
    return plan


def _model_dtype(base: Any) -> Any:
    import torch

    for parameter in base.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _checkpoint_for_quantized(name: str | None, base_checkpoint: str | os.PathLike | None) -> Path:
    folder = Path(base_checkpoint) if base_checkpoint is not None else base_folder(name)
    if folder is None or not folder.is_dir():
        hub_id = hub_id_of(name)
        where = f"{hub_id!r} is not in the HF cache" if hub_id else "the base has no Hub id or local folder"
        raise MergeInputError(
            "The base model is quantized: merging into dequantized-then-requantized weights would lose precision, "
            f"so the full-precision base checkpoint is needed and none was found ({where}). Download it "
            "(hf download <base-id>) or pass base_checkpoint='path/to/base-folder'."
        )
    config_file = folder / "config.json"
    if config_file.is_file() and "quantization_config" in json.loads(config_file.read_text()):
        raise MergeInputError(
            f"The base checkpoint {folder.name!r} is itself quantized (its config.json has a quantization_config). "
            "Pass base_checkpoint= the folder of the original full-precision weights."
        )
    return folder


def _plan_gguf(plan: _Plan) -> Any:
    """Check and plan the GGUF output of `plan` (architecture, tensors, tokenizer) before any folder exists."""
    from ..gguf_output.export import plan_lora_export, plan_model_export

    base = plan.source.base
    config = {**base.config.to_dict(), "architectures": [type(base).__name__]}
    gguf_type = plan.info.gguf_type
    if not plan.info.merge_into_base:
        return plan_lora_export(config, [m.module for m in plan.merged], gguf_type, plan.info.base_model)
    if plan.checkpoint is not None:
        raise MergeInputError(
            "GGUF output from a quantized in-memory base is not supported; merge its full-precision checkpoint with "
            "merge_checkpoint(..., output_format='gguf') (CLI: peft-merge-ext merge --format gguf)."
        )
    from ..peft_bridge.weights import MergedWeightsSource

    weights = MergedWeightsSource(base, plan.merged, plan.dtype, plan.edits)
    return plan_model_export(config, weights.specs(), [plan.base_folder], gguf_type, plan.info.base_model), weights


def _write_gguf(plan: _Plan, folder: Path) -> list[str]:
    """Write the planned GGUF file (model or LoRA) of `plan` into `folder`; returns the file names written."""
    from ..checkpoint.adapter_output import write_lineage
    from .output import stream_weights

    if not plan.info.merge_into_base:
        return [*plan.gguf.write(folder, plan.merged), write_lineage(folder, plan.info.to_lineage())]
    export, weights = plan.gguf
    specs = weights.specs()
    items = zip(specs, (tensor for _, tensor in weights.tensors()), strict=True)
    files = stream_weights(folder, specs, items, "5GB", background=False, writer=export.writer(folder))
    if weights.untied:
        plan.notes.append(
            "An adapter changes the tied embeddings, so the GGUF file stores `output.weight` on its own."
        )
    return files


def _write(plan: _Plan, folder: Path, max_shard_size: int | str) -> list[str]:
    """Write the weights and side files of `plan` into `folder`; returns the file names written."""
    if plan.gguf is not None:
        return _write_gguf(plan, folder)
    from ..checkpoint.adapter_output import adapter_state_dict, combined_adapter_config, write_adapter, write_lineage
    from ..checkpoint.side_files import copy_side_files, write_config
    from .output import stream_weights

    base = plan.source.base
    if not plan.info.merge_into_base:
        entries = [
            (m.module.name, m.module.kind, m.module.kernel, m.delta, plan.dtype or m.module.storage_dtype)
            for m in plan.merged
        ]
        template = plan.source.configs[plan.request.adapters[0]].to_dict()
        ranks = {m.module.name: m.delta.rank for m in plan.merged}
        config = combined_adapter_config(template, ranks, plan.info.base_model)
        files = write_adapter(folder, config, adapter_state_dict(entries))
        return [*files, write_lineage(folder, plan.info.to_lineage())]
    if plan.checkpoint is not None:
        from ..checkpoint.base_checkpoint import BaseCheckpoint

        checkpoint = BaseCheckpoint(plan.checkpoint)
        tied = dict(getattr(base, "all_tied_weights_keys", None) or {})
        checkpoint.untie(tied, {m.weight_key for m in plan.merged}, plan.edits)
        by_key = {m.weight_key: m for m in plan.merged}
        missing = [key for key in by_key if key not in checkpoint.by_name]
        if missing:
            raise MergeInputError(f"The base checkpoint has no weight for LoRA module(s) {missing[:5]}; cannot merge.")
        from ..peft_bridge.weights import check_edit_keys

        edits = {key: edit for key, edit in plan.edits.items() if key in checkpoint.by_name or key not in tied}
        check_edit_keys(list(checkpoint.by_name), edits, "base checkpoint")
        specs = checkpoint.specs(plan.dtype)
        transpose = {key: m.module.transpose for key, m in by_key.items()}
        items = checkpoint.merged_items(lambda key: by_key[key].delta, transpose, plan.dtype, edits=edits)
        untied = checkpoint.untied
        plan.notes.append(
            "The base was quantized in memory; the adapters were merged into the full-precision weights of the base "
            "checkpoint, not into dequantized weights."
        )
    else:
        from ..peft_bridge.weights import MergedWeightsSource

        weights = MergedWeightsSource(base, plan.merged, plan.dtype, plan.edits)
        specs = weights.specs()
        items = zip(specs, (tensor for _, tensor in weights.tensors()), strict=True)
        untied = weights.untied
    # Written in this thread: the model is in memory already, so extra memory stays at one merged tensor.
    files = stream_weights(folder, specs, items, max_shard_size, background=False)
    if untied:
        plan.info.extras["untied"] = sorted(set(untied))
        names = ", ".join(f"`{key}`" for key in sorted(set(untied)))
        plan.notes.append(
            f"The base ties {names}, but an adapter changes them, so the merged model stores them separately "
            "(`tie_word_embeddings: false`)."
        )
    config = base.config.to_diff_dict() if hasattr(base.config, "to_diff_dict") else base.config.to_dict()
    write_config(
        config,
        folder,
        dtype=plan.dtype or _model_dtype(base),
        untied=bool(untied),
        hub_id=plan.info.base_model,
        architectures=[type(base).__name__],
    )
    files.append("config.json")
    files += copy_side_files([plan.checkpoint or plan.base_folder], folder, plan.info.base_model)
    generation_config = getattr(base, "generation_config", None)
    if generation_config is not None and getattr(base, "can_generate", lambda: False)():
        generation_config.save_pretrained(folder)
        files.append("generation_config.json")
    return list(dict.fromkeys(files))


def save_merged(
    model: Any,
    save_directory: str | os.PathLike,
    *,
    adapters: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    combination_type: str | None = None,
    merge_into_base: bool = True,
    max_shard_size: int | str = "5GB",
    tags: Sequence[str] | None = None,
    dtype: Any = None,
    eval_results: list[dict[str, Any]] | None = None,
    base_model: str | None = None,
    base_checkpoint: str | os.PathLike | None = None,
    overwrite: bool = False,
    repo_id: str | None = None,
    format: str | None = None,
    gguf_type: str | None = None,
    **combination_options: Any,
) -> Path:
    """Write the model with its adapter(s) merged in (or the combined adapter alone) to `save_directory`.

    The model is not modified. Tensors are computed module by module and streamed into safetensors shards inside a
    temporary folder renamed to `save_directory` at the end, so a failure never leaves a half-written folder.

    Args:
        model (`PeftModel` or `PreTrainedModel`): A PEFT model, or a transformers model with adapters loaded by
            `model.load_adapter`.
        save_directory (`str` or `os.PathLike`): The output folder (must not exist or be empty unless `overwrite`).
        adapters (`list[str]`, *optional*): The adapters to merge; the active adapter(s) by default.
        weights (`list[float]`, *optional*): One weight per adapter, 1.0 each by default.
        combination_type (`str`, *optional*): Any registered plugin type (`weighted`, `average`, `slerp`, `karcher`,
            ...) or one of PEFT's (`svd`, `cat`, `ties`, ...). `None`: a single adapter as is, several summed.
        merge_into_base (`bool`, *optional*, defaults to `True`): `False` writes the combined adapter
            (`adapter_model.safetensors` + `adapter_config.json` + its lineage, loadable by
            `PeftModel.from_pretrained`).
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): Shard size limit.
        tags (`list[str]`, *optional*): Extra model card tags.
        dtype (`torch.dtype` or `str`, *optional*): Dtype of the written floating-point weights (`"bf16"`,
            `"bfloat16"`, `torch.bfloat16`, ...); the base weights' own dtype by default.
        eval_results (`list[dict]`, *optional*): Rows for the card's `model-index` (keys of
            `huggingface_hub.EvalResult`).
        base_model (`str`, *optional*): The base's Hub id for the card, when the model was loaded from a local folder.
        base_checkpoint (`str` or `os.PathLike`, *optional*): Folder of the full-precision base checkpoint, used (and
            required when not found locally or in the HF cache) when the in-memory base is quantized.
        overwrite (`bool`, *optional*, defaults to `False`): Replace an existing output that peft-merge-ext wrote.
        repo_id (`str`, *optional*): The Hub repo the folder is meant for (used in the card's usage snippet).
        format (`str`, *optional*): `"safetensors"` (default) or `"gguf"`: one llama.cpp file, `model-<TYPE>.gguf`
            (Llama, Mistral, Qwen2 with a byte-level BPE tokenizer), or with `merge_into_base=False` the combined
            adapter as a llama.cpp LoRA, `adapter-<TYPE>.gguf` (needs `pip install "peft-merge-ext[gguf]"`).
        gguf_type (`str`, *optional*): With `format="gguf"`: `f32`, `f16` (default), `bf16` or `q8_0`.
        combination_options: The combination type's options (`t=...` for slerp, `svd_rank`, `density`, ...).

    Returns:
        `Path`: The output folder.

    Raises:
        `MergeInputError`: For any invalid argument, before anything is written: a misspelled parameter is named as
            such (`adapter=`: "unexpected argument 'adapter'; did you mean 'adapters'?"), an adapter holding NaN or
            Inf is named with its module.
        `CombinationError`: When the combination type refuses its inputs or returns an unusable result.
    """
    _check_card_inputs(tags, eval_results)
    return save_to_folder(model, Path(save_directory), overwrite, MergeArguments.of(locals(), save_merged))[0]


def save_to_folder(
    model: Any, destination: Path, overwrite: bool, args: MergeArguments, fingerprint: str = ""
) -> tuple[Path, list[str]]:
    """Merge and write one output folder (weights, side files, card, manifest); returns it and the files written."""
    from ..checkpoint.output_folder import check_output, output_folder
    from ..peft_bridge.source import resolve_model
    from .output import write_card, write_manifest

    name = getattr(resolve_model(model).base, "name_or_path", None)
    inputs = [folder for folder in [base_folder(name)] if folder is not None]
    check_output(destination, overwrite=overwrite, inputs=inputs)
    plan = _plan(model, args)
    if plan.info.output_format == "gguf":
        plan.gguf = _plan_gguf(plan)
    with output_folder(destination, overwrite=overwrite, inputs=inputs) as folder:
        files = _write(plan, folder, args.max_shard_size)
        files.append(
            write_card(
                plan.info,
                folder,
                repo_id=args.repo_id or destination.name,
                tags=args.tags,
                notes=plan.notes,
                base_card_folder=plan.base_folder,
            )
        )
        write_manifest(folder, files, fingerprint)
    return destination, files
