"""`MergeInfo`: everything a model card, a recipe or a log needs to know about one merge."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..engine.report import MergeReport

__all__ = ["AdapterInfo", "MergeInfo"]


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


@dataclass
class MergeInfo:
    """A merge, described for people.

    Args:
        base_model (`str`, *optional*): The base model's Hub id, `None` when it is only known as a local folder.
        adapters (`list[AdapterInfo]`): The inputs.
        combination_type (`str`, *optional*): The method, `None` when a single adapter is merged as is.
        options (`dict`): The method's options.
        svd_rank (`int`, *optional*): The rank bound.
        merge_into_base (`bool`): `True` for a full merged model, `False` for an adapter.
        dtype (`str`, *optional*): The dtype of the written weights.
        report (`MergeReport`, *optional*): Per-module statistics of the combination.
        eval_results (`list[dict]`, *optional*): Evaluation rows for the card's model-index.
        versions (`dict[str, str]`): Library versions used.
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return asdict(self)
