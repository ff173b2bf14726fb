"""`LoRAMerger`: the small merge-and-publish API of the project that inspired peft-merge-ext, on top of its parts.

```python
from peft_merge_ext.lora_merger import LoRAMerger

merger = LoRAMerger(base_model="./base", adapters=["./adapter1", "./adapter2"])
merged_model = merger.merge(method="weighted", weights=[0.6, 0.4])
merged_model.save_pretrained("./merged_output")
merger.push_to_hub(repo_id="username/model-name", token="hf_...")
```

`merge` loads the base and the adapters with transformers and PEFT, combines them with any registered combination
type (`average`, `weighted`, `slerp`, `karcher`, plugins) and adds the combined delta to the base weights with the
same function the out-of-core `merge_checkpoint` uses, so both give bit-identical weights. `push_to_hub` writes the
merged checkpoint with `merge_checkpoint` (streaming, with its model card) and uploads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import MergeInputError

__all__ = ["LoRAMerger", "merge_into_base"]


def _lora_model(model: Any) -> Any:
    return getattr(model, "base_model", model)


def _merged_weights(model: Any, adapters: Sequence[str], weights: Any, method: str | None, **options: Any) -> dict:
    """Weight key -> (base layer, merged weight) of every module the adapters touch; the model is not modified."""
    from .engine.request import resolve_request
    from .lowrank.weight_merge import merge_delta_into_weight
    from .peft_bridge.source import merge_live, resolve_model

    source = resolve_model(model)
    svd_rank = options.pop("svd_rank", None)
    request = resolve_request(source.configs, adapters, weights, method, svd_rank, options)
    merged, _ = merge_live(source, request)
    result = {}
    for item in merged:
        base_layer = item.module.handle.get_base_layer()
        result[item.weight_key] = (
            base_layer,
            merge_delta_into_weight(base_layer.weight.data, item.delta, item.module.transpose),
        )
    return result


def merge_into_base(
    model: Any, adapters: Sequence[str], weights: Any = None, method: str | None = None, **options: Any
) -> Any:
    """Combine `adapters` of a `PeftModel` and add the result to the base weights; returns the base model, with
    every LoRA layer removed.

    Args:
        model (`PeftModel`): The model holding the adapters.
        adapters (`Sequence[str]`): Adapter names.
        weights (`Sequence[float]`, *optional*): One weight per adapter (equal weights summing to 1 by default).
        method (`str`, *optional*): A registered combination type; `None` merges a single adapter as is.
        options: The method's options, and `svd_rank`.
    """
    merged = _merged_weights(model, adapters, weights, method, **options)
    for base_layer, weight in merged.values():
        base_layer.weight.data = weight
    return model.unload()


class LoRAMerger:
    """Merge LoRA adapters into their base model and publish the result.

    Args:
        base_model (`str` or `Path`): The base model: a local folder or a Hub id.
        adapters (`Sequence[str | Path]`): PEFT adapter folders (or Hub ids).
        device_map (`str` or `dict`, *optional*): Passed to `from_pretrained` (e.g. `"auto"` to spread the base
            over the available devices).
        dtype (`str` or `torch.dtype`, *optional*): The dtype the base is loaded in (its saved dtype by default).
    """

    def __init__(
        self,
        base_model: str | Path,
        adapters: Sequence[str | Path],
        device_map: Any = None,
        dtype: Any = None,
    ) -> None:
        if isinstance(adapters, (str, Path)) or not adapters:
            raise MergeInputError(f"adapters must be a non-empty list of adapter folders, got {adapters!r}.")
        self.base_model = str(base_model)
        self.adapters = [str(adapter) for adapter in adapters]
        self.device_map = device_map
        self.dtype = dtype
        self.method: str | None = None
        self.weights: list[float] | None = None
        self.options: dict[str, Any] = {}
        self.merged_model: Any = None
        self.names = [f"adapter_{index}" for index in range(len(self.adapters))]

    def _load(self) -> Any:
        from .peft_bridge.loading import load_peft_model

        model, self.names = load_peft_model(
            self.base_model, self.adapters, device_map=self.device_map, dtype=self.dtype
        )
        return model

    def merge(self, method: str | None = "average", weights: Sequence[float] | None = None, **options: Any) -> Any:
        """Combine the adapters and merge them into the base model.

        Args:
            method (`str`, *optional*, defaults to `"average"`): `average`, `weighted`, `slerp`, `karcher` or any
                registered plugin type; `None` merges a single adapter as is.
            weights (`Sequence[float]`, *optional*): One weight per adapter (equal weights by default).
            options: The method's options (e.g. `t=0.3` for `slerp`) and `svd_rank`.

        Returns:
            `transformers.PreTrainedModel`: The merged model (no LoRA layers left), ready for `save_pretrained`.
        """
        from .plugins.registry import get_combination_types

        if method is not None and method not in get_combination_types():
            from .engine.request import unknown_type_error

            raise unknown_type_error(method, peft_types_allowed=False)
        peft_model = self._load()
        self.merged_model = merge_into_base(peft_model, self.names, weights, method, **dict(options))
        self.method, self.weights, self.options = method, None if weights is None else list(weights), dict(options)
        return self.merged_model

    def push_to_hub(self, repo_id: str, token: str | None = None, **kwargs: Any) -> str:
        """Write the merged model (with its model card and recipe) and upload it to the Hub.

        Uses the method and weights of the last `merge` call (`average` with equal weights if `merge` was not
        called). The checkpoint is written by `merge_checkpoint`, streaming from the base and adapter folders.

        Args:
            repo_id (`str`): The target repository, e.g. `"user/model"`.
            token (`str`, *optional*): A Hub token (the logged-in token by default).
            kwargs: `private`, `revision`, `create_pr`, `commit_message`, `commit_description` for the upload;
                `local_dir` to keep the written folder there; `dtype`, `max_shard_size` for the checkpoint.

        Returns:
            `str`: The commit (or pull request) URL.
        """
        from .checkpoint.output_folder import push_folder
        from .errors import HubUploadError
        from .publish.hub import check_hub_access, upload_files
        from .publish.merge_checkpoint import merge_checkpoint

        upload_keys = ("private", "revision", "create_pr")
        upload_options = {key: kwargs.pop(key) for key in upload_keys if key in kwargs}
        message_options = {key: kwargs.pop(key) for key in ("commit_message", "commit_description") if key in kwargs}
        local_dir = kwargs.pop("local_dir", None)
        checkpoint_options = {key: kwargs.pop(key) for key in ("dtype", "max_shard_size") if key in kwargs}
        if kwargs:
            raise MergeInputError(f"Unknown push_to_hub argument(s): {', '.join(sorted(kwargs))}.")
        target = check_hub_access(repo_id, token=token, **upload_options)  # before the long work
        method = self.method if self.merged_model is not None else "average"
        # A failed upload keeps the folder (the error names it and how to retry); a successful one removes ours.
        with push_folder(local_dir, "merged", keep_on=(HubUploadError,)) as folder:
            result = merge_checkpoint(
                self.base_model,
                self.adapters,
                out=folder,
                combination_type=method,
                weights=self.weights,
                overwrite=local_dir is not None,
                quiet=True,
                **checkpoint_options,
                **self.options,
            )
            return upload_files(
                folder,
                result.files,
                target,
                commit_message=message_options.get("commit_message") or "Upload merged model with peft-merge-ext",
                commit_description=message_options.get("commit_description"),
            )
