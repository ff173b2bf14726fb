"""What an output folder holds besides the weights, and the naming rules every output follows.

One implementation each, for the in-memory and the on-disk pipelines: the dtype names users may give, the Hub-id
rule (a name is published only when it is a Hub id, never a local path), `config.json` (quantization removed, dtype
set, ties broken when the merge broke them, no local path), and the tokenizer / generation files copied from the
base.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import MergeInputError

__all__ = [
    "GENERATION_FILES",
    "TOKENIZER_FILES",
    "base_folder",
    "copy_side_files",
    "dtype_name",
    "hub_id_of",
    "parse_dtype",
    "public_name",
    "write_config",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_FILES = ("generation_config.json",)
# Keys of copied JSON files that may hold a local path: replaced by the Hub id when known, else removed.
_PATH_KEYS = ("_name_or_path", "name_or_path", "base_model_name_or_path")
_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
    "fp64": "float64",
    "float64": "float64",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BARE_OR_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CACHE_FOLDER = re.compile(r"models--([^/\\]+?)--([^/\\]+)")


def parse_dtype(dtype: Any) -> Any:
    """A `torch.dtype` from `None`, a `torch.dtype` or a name (`"bf16"`, `"bfloat16"`, `"fp16"`, `"float32"`, ...).

    Raises:
        `MergeInputError`: For anything else.
    """
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise MergeInputError(f"dtype must be a floating-point dtype, got {dtype}.")
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise MergeInputError(
            f"Unknown dtype {str(dtype)[:50]!r}; use one of bf16, fp16, fp32 (or bfloat16, float16, float32)."
        )
    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    """`"bfloat16"` for `torch.bfloat16`."""
    return str(dtype).removeprefix("torch.")


def hub_id_of(name_or_path: str | os.PathLike | None, *, require_namespace: bool = True) -> str | None:
    """The Hub id a model name stands for: the name itself when it is `owner/name` (or, with
    `require_namespace=False`, a bare `name`) and no such local path exists, the id encoded in a Hugging Face cache
    folder, else `None` (a local path is never a Hub id)."""
    if not name_or_path:
        return None
    text = str(name_or_path)
    match = _CACHE_FOLDER.search(text)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    pattern = _HUB_ID if require_namespace else _BARE_OR_HUB_ID
    if not pattern.match(text) or Path(text).expanduser().exists():
        return None
    return text


def public_name(value: str | os.PathLike | None) -> str | None:
    """A Hub id as is; a local path reduced to its folder name (never an absolute path or a user name)."""
    if value is None:
        return None
    hub_id = hub_id_of(value)
    if hub_id is not None:
        return hub_id
    return Path(str(value).rstrip("/\\")).name or None


def base_folder(name_or_path: str | os.PathLike | None) -> Path | None:
    """The base model's local folder: the path itself, or its snapshot in the HF cache (no download)."""
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    hub_id = hub_id_of(name_or_path)
    if hub_id is None:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        return None


def _without_paths(data: dict[str, Any], hub_id: str | None) -> dict[str, Any]:
    for key in _PATH_KEYS:
        if key in data:
            if hub_id is not None:
                data[key] = hub_id
            else:
                data.pop(key)
    return data


def write_config(
    config: Mapping[str, Any],
    folder: Path,
    *,
    dtype: Any = None,
    untied: bool = False,
    hub_id: str | None = None,
    architectures: Sequence[str] | None = None,
) -> None:
    """Write `config.json` of a merged model from the base's config data.

    Quantization settings are removed (the merged weights are full precision), `dtype` is set when given, the
    embeddings are untied when the merge made the tied tensors differ, and any local path is replaced by the Hub id
    (or removed).
    """
    data = dict(config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        data.pop(key, None)
    if architectures:
        data["architectures"] = list(architectures)
    if untied:
        data["tie_word_embeddings"] = False
        if isinstance(data.get("text_config"), dict):
            data["text_config"] = {**data["text_config"], "tie_word_embeddings": False}
    if dtype is not None:
        present = [key for key in ("dtype", "torch_dtype") if key in data]
        for key in present or ["dtype"]:
            data[key] = dtype_name(dtype)
    data = _without_paths(data, hub_id)
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_side_files(sources: Sequence[Path | None], folder: Path, hub_id: str | None) -> list[str]:
    """Copy the tokenizer and generation files of the first source that has each (the base first, then the
    adapters), with local paths in JSON files replaced by the Hub id (or removed). Returns the names written."""
    written = []
    for file_name in (*GENERATION_FILES, *TOKENIZER_FILES):
        for source in sources:
            if source is None or not (source / file_name).is_file():
                continue
            target = folder / file_name
            if file_name.endswith(".json"):
                try:
                    data = json.loads((source / file_name).read_text())
                except (ValueError, UnicodeDecodeError):
                    data = None
                if isinstance(data, dict) and any(key in data for key in _PATH_KEYS):
                    target.write_text(json.dumps(_without_paths(data, hub_id), indent=2, ensure_ascii=False) + "\n")
                    written.append(file_name)
                    break
            shutil.copyfile(source / file_name, target)
            written.append(file_name)
            break
    return written
