"""What a merge was, for people and for reruns: `AdapterInfo`, the versioned `Lineage` record and `MergeInfo`.

Every adapter a combination creates carries a `Lineage`: its source adapters (with their content digests, Hub ids
when known, and their own lineage), weights, method, options, `svd_rank`, a per-module report summary and the
library versions. It is kept with the adapter in memory and saved beside it (`LINEAGE_FILE`, a file PEFT ignores), so
a combined adapter of combined adapters describes the whole tree, and a model card can publish a recipe that
rebuilds it step by step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import MergeInputError
from .report import MergeReport

__all__ = ["LINEAGE_FILE", "LINEAGE_FORMAT", "AdapterInfo", "Lineage", "MergeInfo", "library_versions"]

LINEAGE_FILE = "peft_merge_ext_lineage.json"
LINEAGE_FORMAT = "peft-merge-ext/lineage"
LINEAGE_VERSION = 1
VERSIONED_LIBRARIES = ("torch", "transformers", "peft", "safetensors", "huggingface_hub", "accelerate")


def library_versions() -> dict[str, str]:
    """The versions of peft-merge-ext and the libraries a merge depends on (those installed)."""
    return dict(_library_versions())


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str]:
    """Looked up once per process (package metadata is read from disk)."""
    from importlib.metadata import PackageNotFoundError, version

    from .._version import __version__

    versions = {"peft-merge-ext": __version__}
    for name in VERSIONED_LIBRARIES:
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


@dataclass
class AdapterInfo:
    """One input adapter.

    Args:
        name (`str`): Its name in the model (or the folder name for on-disk adapters). Never an absolute path.
        source (`str`, *optional*): A Hub id or the folder *name* it came from (never a full local path).
        weight (`float`): Its weight in the combination.
        rank (`int`): `r` (the largest rank when `rank_pattern` is used).
        alpha (`float`): `lora_alpha`.
        target_modules (`list[str]`): Its target modules.
        use_rslora (`bool`): Whether it uses rank-stabilized scaling.
        sha256 (`str`, *optional*): SHA-256 of its weights.
        sha256_of (`str`, *optional*): What `sha256` hashes: `"adapter_model.safetensors"` (the file's bytes, the
            same digest the Hub shows for that LFS file) or `"tensors"` (module name, dtype, shape and bytes of the
            LoRA factors in model order, for adapters that only exist in memory).
        hub_id (`str`, *optional*): Its Hub repository, when it was loaded from (or published to) the Hub.
        lineage (`Lineage`, *optional*): How it was made, when a combination made it.
    """

    name: str
    source: str | None
    weight: float
    rank: int
    alpha: float
    target_modules: list[str]
    use_rslora: bool = False
    sha256: str | None = None
    sha256_of: str | None = None
    hub_id: str | None = None
    lineage: Lineage | None = None
    pending_sha256: Any = field(default=None, repr=False, compare=False)

    def resolve(self) -> AdapterInfo:
        """Compute a digest left for later (`pending_sha256`), here and in the lineage below; returns `self`.

        `add_weighted_adapter` does not hash its sources while it combines (that would slow it down by the size of
        the adapters); it keeps a callable that hashes them when a card or a saved record first needs the digest,
        and that gives `None` if a source changed in between.
        """
        if self.sha256 is None and self.pending_sha256 is not None:
            self.sha256 = self.pending_sha256()
            if self.sha256 is None:
                self.sha256_of = "unknown: the adapter changed after the combination"
        self.pending_sha256 = None
        if self.lineage is not None:
            for source in self.lineage.sources:
                source.resolve()
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (the lineage nested as a dict)."""
        self.resolve()
        data = {
            key: getattr(self, key)
            for key in ("name", "source", "weight", "rank", "alpha", "target_modules", "use_rslora", "sha256")
        }
        data.update(sha256_of=self.sha256_of, hub_id=self.hub_id)
        data["lineage"] = self.lineage.to_dict() if self.lineage is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterInfo:
        """The inverse of `to_dict`."""
        values = {key: data.get(key) for key in ("name", "source", "sha256", "sha256_of", "hub_id")}
        lineage = data.get("lineage")
        return cls(
            **values,
            weight=float(data.get("weight", 1.0)),
            rank=int(data.get("rank") or 0),
            alpha=float(data.get("alpha") or 0.0),
            target_modules=list(data.get("target_modules") or []),
            use_rslora=bool(data.get("use_rslora", False)),
            lineage=Lineage.from_dict(lineage) if lineage else None,
        )


@dataclass
class Lineage:
    """How a combined adapter was made (a versioned, JSON-serializable record).

    Args:
        method (`str`, *optional*): The combination type; `None` for one adapter taken as it is.
        provider (`str`): Who computed it: the plugin and its distribution, or `"peft"`.
        sources (`list[AdapterInfo]`): The source adapters with their weights, digests and own lineage.
        options (`dict`): The type's options.
        svd_rank (`int`, *optional*): The rank bound.
        base_model (`str`, *optional*): The base model's Hub id, when known.
        report_summary (`dict`): Aggregates of the per-module statistics (`MergeReport.summary()`).
        versions (`dict[str, str]`): Library versions used.
        search (`dict`, *optional*): For weights found by `search_weights`: optimizer, budget, seed, best and
            initial objective values.
        output_format (`str`): The file format the adapter was written in (`"gguf"`: a llama.cpp LoRA file).
        gguf_type (`str`, *optional*): For GGUF, the type of its factors.
    """

    method: str | None
    provider: str
    sources: list[AdapterInfo]
    options: dict[str, Any] = field(default_factory=dict)
    svd_rank: int | None = None
    base_model: str | None = None
    report_summary: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    search: dict[str, Any] | None = None
    output_format: str = "safetensors"
    gguf_type: str | None = None

    @property
    def weights(self) -> list[float]:
        """The weights of the sources, in order."""
        return [source.weight for source in self.sources]

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data, with its format and version."""
        return {
            "format": LINEAGE_FORMAT,
            "version": LINEAGE_VERSION,
            "method": self.method,
            "provider": self.provider,
            "sources": [source.to_dict() for source in self.sources],
            "options": self.options,
            "svd_rank": self.svd_rank,
            "base_model": self.base_model,
            "report_summary": self.report_summary,
            "versions": self.versions,
            "search": self.search,
            **({"output_format": self.output_format, "gguf_type": self.gguf_type} if self.gguf_type else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Lineage:
        """Read a record written by `to_dict`.

        Raises:
            `MergeInputError`: For data that is not a lineage record, or a newer version of the format.
        """
        if not isinstance(data, dict) or data.get("format") != LINEAGE_FORMAT:
            raise MergeInputError(f"Not a peft-merge-ext lineage record (expected format {LINEAGE_FORMAT!r}).")
        version = data.get("version")
        if not isinstance(version, int) or version > LINEAGE_VERSION:
            raise MergeInputError(
                f"Lineage record version {version!r} is newer than this peft-merge-ext understands "
                f"({LINEAGE_VERSION}); upgrade peft-merge-ext."
            )
        return cls(
            method=data.get("method"),
            provider=str(data.get("provider") or ""),
            sources=[AdapterInfo.from_dict(source) for source in data.get("sources") or []],
            options=dict(data.get("options") or {}),
            svd_rank=data.get("svd_rank"),
            base_model=data.get("base_model"),
            report_summary=dict(data.get("report_summary") or {}),
            versions=dict(data.get("versions") or {}),
            search=data.get("search"),
            output_format=str(data.get("output_format") or "safetensors"),
            gguf_type=data.get("gguf_type"),
        )


@dataclass
class MergeInfo:
    """A merge, described for people.

    Args:
        base_model (`str`, *optional*): The base model's Hub id, `None` when it is only known as a local folder.
        adapters (`list[AdapterInfo]`): The inputs (each with its own lineage when a combination made it).
        combination_type (`str`, *optional*): The method, `None` when a single adapter is merged as is.
        options (`dict`): The method's options.
        svd_rank (`int`, *optional*): The rank bound.
        merge_into_base (`bool`): `True` for a full merged model, `False` for an adapter.
        dtype (`str`, *optional*): The dtype of the written weights.
        report (`MergeReport`, *optional*): Per-module statistics of the combination.
        eval_results (`list[dict]`, *optional*): Evaluation rows for the card's model-index.
        versions (`dict[str, str]`): Library versions used.
        provider (`str`): Who computed the combination.
        extras (`dict`): What was merged beyond `B @ A` (`engine.features.describe_edits`): DoRA magnitudes, LoRA
            biases, replaced tensors and rows, expert tensors, untied weights; empty when nothing was.
        output_format (`str`): The file format written: `"safetensors"` (Hugging Face) or `"gguf"` (llama.cpp).
        gguf_type (`str`, *optional*): For GGUF, the type of the weights (`f32`, `f16`, `bf16`, `q8_0`).
        mergekit_config (`dict`, *optional*): For a merge run from a mergekit configuration, that configuration
            (local paths reduced to folder names): the card's recipe.
    """

    base_model: str | None
    adapters: list[AdapterInfo]
    combination_type: str | None
    options: dict[str, Any] = field(default_factory=dict)
    svd_rank: int | None = None
    merge_into_base: bool = True
    dtype: str | None = None
    report: MergeReport | None = None
    eval_results: list[dict[str, Any]] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    provider: str = "peft-merge-ext"
    extras: dict[str, Any] = field(default_factory=dict)
    output_format: str = "safetensors"
    gguf_type: str | None = None
    mergekit_config: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        adapters = [adapter.to_dict() for adapter in self.adapters]
        data = asdict(dataclasses.replace(self, adapters=[]))
        data["adapters"] = adapters
        return data

    def to_lineage(self) -> Lineage:
        """The lineage record of the adapter this merge produces (for `merge_into_base=False`). A combined adapter
        saved again as it is keeps its own record: copying adds no level to the tree."""
        if self.combination_type is None and len(self.adapters) == 1:
            source = self.adapters[0]
            if source.weight == 1.0 and source.lineage is not None:
                if self.gguf_type is None:
                    return source.lineage
                return dataclasses.replace(source.lineage, output_format=self.output_format, gguf_type=self.gguf_type)
        return Lineage(
            method=self.combination_type,
            provider=self.provider,
            sources=list(self.adapters),
            options=dict(self.options),
            svd_rank=self.svd_rank,
            base_model=self.base_model,
            report_summary=self.report.summary() if self.report is not None else {},
            versions=dict(self.versions),
            output_format=self.output_format,
            gguf_type=self.gguf_type,
        )
