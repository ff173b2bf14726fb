"""The model card of a merged model or combined adapter, built from a `MergeInfo`.

The card is `huggingface_hub.ModelCard` rendered from the Jinja template shipped in `peft_merge_ext/templates/`, with
`ModelCardData` front matter. Plugins add sections through the `extend_model_card(card, merge_info)` hook. The card
never holds a token, an absolute local path or a user name: local folders appear by their folder name only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoint.side_files import hub_id_of, public_name
from ..engine.merge_info import AdapterInfo, MergeInfo

__all__ = ["TEMPLATE_PATH", "base_model_relation", "build_model_card", "method_formula", "write_model_card"]

TEMPLATE_PATH = Path(__file__).parent / "templates" / "merged_model_card.md"
BASE_TAGS = ("merge", "lora", "peft", "peft-merge-ext")

FORMULAS = {
    None: "ΔW = s · B A with s = alpha / r (alpha / √r with rsLoRA), times the adapter's weight.",
    "weighted": "ΔW = Σᵢ wᵢ · Bᵢ Aᵢ (each Bᵢ Aᵢ with its own LoRA scaling folded in).",
    "average": "ΔW = Σᵢ wᵢ · Bᵢ Aᵢ / Σᵢ wᵢ.",
    "slerp": (
        "ΔW = sin((1−t)θ)/sin θ · ΔW₁ + sin(tθ)/sin θ · ΔW₂, with cos θ = ⟨ΔW₁, ΔW₂⟩ / (‖ΔW₁‖ ‖ΔW₂‖) (Frobenius), "
        "computed per module."
    ),
    "karcher": (
        "ΔW = (Σᵢ w̄ᵢ ‖ΔWᵢ‖) · u, where u is the weighted Karcher (Riemannian) mean of the directions ΔWᵢ / ‖ΔWᵢ‖ "
        "on the unit sphere and w̄ᵢ = wᵢ / Σⱼ wⱼ."
    ),
    "core_ties": (
        "ΔW = U M Vᵀ with U, V the singular vectors of [B₁ … Bₖ] and [A₁; …; Aₖ], M = PEFT's TIES of the cores "
        "Mᵢ = Uᵀ Bᵢ Aᵢ V (weights wᵢ); Core Space merging, https://arxiv.org/abs/2509.17786 ."
    ),
    "core_dare": (
        "ΔW = U M Vᵀ with M = PEFT's DARE (dare_ties, or dare_linear with elect_sign=False, seeded) of the cores "
        "Mᵢ = Uᵀ Bᵢ Aᵢ V; Core Space merging, https://arxiv.org/abs/2509.17786 ."
    ),
    "tsv": (
        "ΔW = U⊥ blockdiag(wᵢ Sᵢ′) V⊥ᵀ, where Bᵢ Aᵢ = Uᵢ Sᵢ Vᵢᵀ keeps its top ⌈keep · rᵢ⌉ triplets and U⊥, V⊥ are "
        "the polar factors of [U₁′ … Uₖ′], [V₁′ … Vₖ′]; TSV-Merge, https://arxiv.org/abs/2412.00081 ."
    ),
    "iso_c": (
        "ΔW = mean(S) · U Vᵀ for Σᵢ wᵢ Bᵢ Aᵢ = U S Vᵀ (isotropic spectrum); Iso-C, https://arxiv.org/abs/2502.04959 ."
    ),
    "iso_cts": (
        "ΔW = mean(S*) · U⊥ V⊥ᵀ over the top directions of Σᵢ wᵢ Bᵢ Aᵢ (common subspace) and of each wᵢ Bᵢ Aᵢ "
        "projected off it (task-specific), decorrelated by polar factors; Iso-CTS, https://arxiv.org/abs/2502.04959 ."
    ),
    "knots_ties": (
        "ΔW = U S V_mergedᵀ for [B₁A₁ … BₖAₖ] = U S [V₁ᵀ … Vₖᵀ], V_mergedᵀ = PEFT's TIES of the Vᵢᵀ (weights wᵢ); "
        "KnOTS, https://arxiv.org/abs/2410.19735 ."
    ),
    "knots_dare": (
        "ΔW = U S V_mergedᵀ for [B₁A₁ … BₖAₖ] = U S [V₁ᵀ … Vₖᵀ], V_mergedᵀ = PEFT's DARE of the Vᵢᵀ (seeded); "
        "KnOTS, https://arxiv.org/abs/2410.19735 ."
    ),
}
PEFT_FORMULA = (
    "Computed by PEFT's own `add_weighted_adapter(combination_type={name!r})`; see "
    "https://huggingface.co/docs/peft/developer_guides/model_merging ."
)


def base_model_relation(info: MergeInfo) -> str:
    """`adapter` for an adapter repo, `merge` when several adapters were merged into the base, else `finetune`."""
    if not info.merge_into_base:
        return "adapter"
    return "merge" if len(info.adapters) > 1 else "finetune"


def method_formula(info: MergeInfo) -> tuple[str, str]:
    """The method's display name and formula (with the final `W' = W + ΔW` step for a merged model)."""
    from ..plugins.registry import PEFT_COMBINATION_TYPES

    name = info.combination_type
    if name in FORMULAS:
        formula = FORMULAS[name]
    elif info.mergekit_config is not None:
        formula = (
            f"mergekit's `{info.mergekit_config.get('merge_method')}` applied, module by module, to the full weights "
            "Wᵢ = W + ΔWᵢ of each `base+adapter` model (ΔWᵢ = s · Bᵢ Aᵢ, added as PEFT's merge_and_unload does), "
            "with mergekit 0.1.5's defaults and working dtype; tensors no adapter touches are the base's."
        )
    elif name in PEFT_COMBINATION_TYPES:
        formula = PEFT_FORMULA.format(name=name)
    else:
        formula = f"Computed by the plugin combination type `{name}`."
    final = (
        "The merged weights are W' = W + ΔW, computed in float32 from the exact low-rank factors."
        if info.merge_into_base
        else "ΔW is published as one LoRA adapter (factors B A, scaling 1)."
    )
    if info.mergekit_config is not None:
        return name, formula
    return (name or "single adapter"), f"{formula}\n\n{final}"


def _description(name: str | None) -> str:
    if name is None:
        return "the adapter merged as it is"
    try:
        from ..plugins.registry import get_combination_types

        combination = get_combination_types().get(name)
    except Exception:
        combination = None
    return combination.description if combination is not None else ""


def _license(base_model: str | None, base_card_data: Any, base_card_folder: Path | None) -> str | None:
    from huggingface_hub import ModelCard

    if base_card_data is not None:
        data = base_card_data.to_dict() if hasattr(base_card_data, "to_dict") else dict(base_card_data)
        return data.get("license")
    candidates: list[Path] = []
    if base_card_folder is not None:
        candidates.append(Path(base_card_folder) / "README.md")
    if base_model:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_model, "README.md")
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception:
            pass
    for path in candidates:
        if path.is_file():
            try:
                return ModelCard.load(path).data.to_dict().get("license")
            except Exception:
                continue
    return None


def _eval_results(rows: Sequence[Any] | None) -> list[Any] | None:
    if not rows:
        return None
    from huggingface_hub import EvalResult

    return [row if isinstance(row, EvalResult) else EvalResult(**dict(row)) for row in rows]


def _summary_table(info: MergeInfo) -> str:
    if info.report is None:
        return ""
    summary = info.report.summary()
    lines = [f"{summary.pop('modules')} modules.", "", "| statistic | min | mean | max |", "|---|---|---|---|"]
    for key, values in summary.items():
        lines.append(f"| {key} | {values['min']:.4g} | {values['mean']:.4g} | {values['max']:.4g} |")
    return "\n".join(lines)


def _recipe(info: MergeInfo) -> tuple[str, list[str], bool]:
    """The recipe YAML, the paths to fill in, and whether it can be reproduced bit for bit (DARE samples at
    random)."""
    from ..recipe import recipe_from_merge_info

    if info.mergekit_config is not None:  # run from a mergekit configuration: that configuration reruns it
        import yaml

        text = yaml.safe_dump(info.mergekit_config, sort_keys=False, default_flow_style=None).strip()
        return text, [adapter.source or adapter.name for adapter in info.adapters], True
    recipe = recipe_from_merge_info(info)
    random = any(step.method and step.method.startswith("dare") for step in recipe.steps)
    return recipe.to_yaml().strip(), recipe.fill_in, not random


def _lineage_lines(adapter: AdapterInfo, depth: int = 0) -> list[str]:
    """Markdown bullets for one source adapter and, when a combination made it, its own sources (the whole tree)."""
    indent = "  " * depth
    digest = f", sha256 `{adapter.sha256[:16]}…`" if adapter.sha256 else ""
    where = f", [{adapter.hub_id}](https://huggingface.co/{adapter.hub_id})" if adapter.hub_id else ""
    line = f"{indent}- **{adapter.name}** (weight {adapter.weight:g}, rank {adapter.rank}{digest}{where})"
    lineage = adapter.lineage
    if lineage is None:
        return [line]
    options = ", ".join(f"{key}={value!r}" for key, value in lineage.options.items() if value is not None)
    details = "; ".join(
        part
        for part in (
            f"options {options}" if options else "",
            f"svd_rank {lineage.svd_rank}" if lineage.svd_rank is not None else "",
            f"by {lineage.provider}" if lineage.provider else "",
            f"weights found by search_weights ({lineage.search.get('optimizer')}, {lineage.search.get('trials')} "
            f"trials, best objective {lineage.search.get('best_value'):.4g})"
            if lineage.search
            else "",
        )
        if part
    )
    lines = [
        f"{line}: made with `{lineage.method or 'single adapter'}`" + (f" ({details})" if details else "") + " of:"
    ]
    for source in lineage.sources:
        lines.extend(_lineage_lines(source, depth + 1))
    summary = {key: value for key, value in lineage.report_summary.items() if isinstance(value, dict)}
    if summary:
        cells = "; ".join(
            f"{key} {values['min']:.4g}/{values['mean']:.4g}/{values['max']:.4g}" for key, values in summary.items()
        )
        modules = lineage.report_summary.get("modules")
        lines.append(f"{indent}  - per-module statistics over {modules} modules (min/mean/max): {cells}")
    return lines


def _summary(info: MergeInfo, method: str) -> str:
    what = "model" if info.merge_into_base else "LoRA adapter"
    into = " and merging the result into the base weights." if info.merge_into_base else "."
    if info.combination_type is None and len(info.adapters) == 1:
        adapter = info.adapters[0]
        text = f"This {what} was made from the LoRA adapter `{adapter.name}`" + (
            " merged into the base weights." if info.merge_into_base else "."
        )
        if adapter.lineage is not None:
            sources = ", ".join(f"`{s.name}` ({s.weight:g})" for s in adapter.lineage.sources)
            text += f" `{adapter.name}` itself combines {sources} with `{adapter.lineage.method}` (see Lineage)."
        return text
    names = ", ".join(f"`{a.name}` ({a.weight:g})" for a in info.adapters)
    return f"This {what} was made by combining {len(info.adapters)} LoRA adapters, {names}, with `{method}`{into}"


def _lineage_methods(adapters: Sequence[AdapterInfo]) -> list[str]:
    """The methods anywhere in the adapters' lineage trees, first seen first."""
    methods: list[str] = []
    for adapter in adapters:
        if adapter.lineage is not None:
            methods += [adapter.lineage.method or "single-adapter", *_lineage_methods(adapter.lineage.sources)]
    return list(dict.fromkeys(methods))


def _lineage(info: MergeInfo) -> str:
    if not any(adapter.lineage is not None for adapter in info.adapters):
        return ""
    lines = []
    for adapter in info.adapters:
        lines.extend(_lineage_lines(adapter))
    return "\n".join(lines)


def _usage(info: MergeInfo, repo_id: str) -> str:
    if info.output_format == "gguf":
        from ..gguf_output.export import gguf_file_name

        file_name = gguf_file_name(info.gguf_type or "f16", adapter=not info.merge_into_base)
        if info.merge_into_base:
            return f'from llama_cpp import Llama\n\nmodel = Llama.from_pretrained("{repo_id}", filename="{file_name}")'
        return (
            "from llama_cpp import Llama\n\n"
            f'# base.gguf: the base model converted to GGUF; the adapter: {file_name} from "{repo_id}"\n'
            f'model = Llama(model_path="base.gguf", lora_path="{file_name}")'
        )
    if info.merge_into_base:
        return (
            "from transformers import AutoModelForCausalLM\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")'
        )
    base = info.base_model or "<base-model-id>"
    return (
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo_id}")'
    )


def _serving_notes(info: MergeInfo) -> list[str]:
    """How to serve an adapter made with `uniform_rank` / `svd_energy` (see `engine.serving`)."""
    if info.report is None or info.merge_into_base:
        return []
    notes = []
    if "svd_energy" in info.options:
        kept = [m.stats["energy_kept"] for m in info.report.modules if "energy_kept" in m.stats]
        if kept:
            notes.append(
                f"Each module keeps the smallest rank holding {info.options['svd_energy']:g} of its delta's energy "
                f"(sum of squared singular values); energy kept per module: min {min(kept):.4g}, max {max(kept):.4g} "
                "(column `energy_kept` below)."
            )
    if "uniform_rank" in info.options:
        ranks = {m.stats.get("rank") for m in info.report.modules}
        if len(ranks) == 1:
            rank = ranks.pop()
            notes.append(
                f"Every module has rank {rank} (one `r`, no `rank_pattern`, scaling 1, no bias or `modules_to_save`): "
                f"serve it with vLLM `--enable-lora --max-lora-rank {rank}` (or higher)."
            )
    return notes


def _feature_notes(info: MergeInfo) -> list[str]:
    """What was merged beyond `B @ A` (DoRA, biases, replaced modules and rows, expert tensors)."""
    from ..engine.features import card_notes

    return card_notes(info.extras) if info.extras else []


def _sanitized_adapter(adapter: AdapterInfo) -> AdapterInfo:
    lineage = adapter.lineage
    if lineage is not None:
        lineage = dataclasses.replace(lineage, sources=[_sanitized_adapter(source) for source in lineage.sources])
    return dataclasses.replace(
        adapter,
        name=public_name(adapter.name) or adapter.name,
        source=public_name(adapter.source),
        hub_id=hub_id_of(adapter.hub_id),
        lineage=lineage,
    )


def _sanitized(info: MergeInfo) -> MergeInfo:
    """The info with every name public: Hub ids as they are, local paths reduced to folder names."""
    adapters = [_sanitized_adapter(adapter) for adapter in info.adapters]
    return dataclasses.replace(info, adapters=adapters, base_model=hub_id_of(info.base_model))


def build_model_card(
    info: MergeInfo,
    base_card_data: Any = None,
    *,
    repo_id: str | None = None,
    tags: Sequence[str] | None = None,
    notes: Sequence[str] | None = None,
    base_card_folder: str | os.PathLike | None = None,
) -> Any:
    """Build the model card of a merge.

    Args:
        info (`MergeInfo`): The merge.
        base_card_data (`ModelCardData` or `dict`, *optional*): The base model's card data, for its license; read
            from `base_card_folder` or the HF cache when not given (never downloaded).
        repo_id (`str`, *optional*): The repo (or folder name) the card is for, used in the title and usage snippet.
        tags (`list[str]`, *optional*): Extra tags.
        notes (`list[str]`, *optional*): Remarks shown near the top (untied weights, quantized base...).
        base_card_folder (`str` or `os.PathLike`, *optional*): The base model's local folder.

    Returns:
        `huggingface_hub.ModelCard`: The card, after the `extend_model_card` plugin hook ran.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from ..plugins.registry import run_hook

    for adapter in info.adapters:
        adapter.resolve()  # digests left for later by add_weighted_adapter
    info = _sanitized(info)
    name = public_name(repo_id) or "merged-model"
    method, formula = method_formula(info)
    method_tags = [info.combination_type or "single-adapter", *_lineage_methods(info.adapters)]
    format_tags = [info.output_format] if info.output_format != "safetensors" else []
    all_tags = list(
        dict.fromkeys([*BASE_TAGS, *(m.replace("_", "-") for m in method_tags), *format_tags, *(tags or [])])
    )
    card_data = ModelCardData(
        base_model=info.base_model,
        base_model_relation=base_model_relation(info) if info.base_model else None,
        library_name=None  # GGUF: llama.cpp and its many runtimes, no single library
        if info.output_format == "gguf"
        else "transformers"
        if info.merge_into_base
        else "peft",
        tags=all_tags,
        license=_license(info.base_model, base_card_data, Path(base_card_folder) if base_card_folder else None),
        model_name=name,
        eval_results=_eval_results(info.eval_results),
    )
    summary = _summary(info, method)
    notes = [*(notes or []), *_serving_notes(info), *_feature_notes(info)]
    recipe, fill_in, reproducible = _recipe(info)
    parameters: dict[str, Any] = dict(info.options)
    if info.svd_rank is not None:
        parameters["svd_rank"] = info.svd_rank
    if info.dtype:
        parameters["dtype"] = info.dtype
    if info.output_format != "safetensors":
        parameters["format"] = info.output_format
        parameters["gguf_type"] = info.gguf_type
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=name,
        summary=summary,
        base_model=info.base_model,
        notes=list(notes or []),
        adapters=info.adapters,
        method=method,
        method_description=_description(info.combination_type),
        formula=formula,
        parameters=parameters,
        summary_table=_summary_table(info),
        module_table=info.report.to_markdown() if info.report is not None else "",
        recipe=recipe,
        fill_in=fill_in,
        reproducible=reproducible,
        lineage=_lineage(info),
        usage=_usage(info, name if repo_id is None or "/" not in str(repo_id) else str(repo_id)),
        versions=info.versions,
    )
    # A plugin whose hook raises gets one warning; the card is still written, without its section.
    run_hook("extend_model_card", card=card, merge_info=info)
    return card


def write_model_card(info: MergeInfo, directory: str | os.PathLike, base_card_data: Any = None, **kwargs: Any) -> Path:
    """Build the card (see `build_model_card`) and save it as `README.md` in `directory`.

    Returns:
        `Path`: The written `README.md`.
    """
    card = build_model_card(info, base_card_data, **kwargs)
    path = Path(directory) / "README.md"
    card.save(str(path))
    return path
