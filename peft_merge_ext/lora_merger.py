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

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import MergeInputError

__all__ = ["LoRAMerger", "merge_into_base"]


def _lora_model(model: Any) -> Any:
    return getattr(model, "base_model", model)


def _merged_weights(model: Any, adapters: Sequence[str], weights: Any, method: str | None, **options: Any) -> dict:
    """Weight key -> (base layer, merged weight) of every module the adapters touch; the model is not modified."""
    import torch

    from .engine.combine import combine_adapters, prepare_request
    from .lowrank.weight_merge import merge_delta_into_weight
    from .peft_bridge.layers import check_supported, find_lora_modules, read_factors

    lora_model = _lora_model(model)
    svd_rank = options.pop("svd_rank", None)
    adapters = list(adapters)
    if method is None and len(adapters) > 1:
        method = "weighted"  # what PEFT computes with several active adapters
    if method is None:
        if options or svd_rank is not None:
            raise MergeInputError("Options and svd_rank need a method; pass method='weighted' for one adapter.")
        from .engine.combine import check_adapter_configs
        from .plugins.registry import check_weights

        check_adapter_configs(lora_model.peft_config, adapters)
        weight = check_weights([1.0] if weights is None else weights, 1)[0]
        entries = []
        for info in find_lora_modules(lora_model.model, adapters):
            check_supported(info, adapters[0])
            delta = read_factors(info, adapters[0], torch.float32)  # as save_merged and merge_checkpoint do
            if weight != 1.0:
                delta = type(delta)(delta.B * weight, delta.A)
            entries.append((info, delta))
    else:
        if weights is None:
            weights = [1.0] * len(adapters)
        request = prepare_request(lora_model.peft_config, adapters, weights, method, svd_rank, options)
        merged, _ = combine_adapters(lora_model.model, request)
        entries = [(module.info, module.delta) for module in merged]
    result = {}
    for info, delta in entries:
        base_layer = info.module.get_base_layer()
        transpose = info.kind == "embedding" or bool(getattr(info.module, "fan_in_fan_out", False))
        result[f"{info.name}.weight"] = (base_layer, merge_delta_into_weight(base_layer.weight.data, delta, transpose))
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
        import transformers
        from peft import PeftModel

        from .publish.merge_checkpoint import parse_dtype

        config = transformers.AutoConfig.from_pretrained(self.base_model)
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        model_class = model_class or transformers.AutoModelForCausalLM
        kwargs: dict[str, Any] = {}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        if self.dtype is not None:
            kwargs["dtype"] = parse_dtype(self.dtype)
        model = model_class.from_pretrained(self.base_model, **kwargs)
        peft_model = PeftModel.from_pretrained(model, self.adapters[0], adapter_name=self.names[0])
        for name, adapter in zip(self.names[1:], self.adapters[1:], strict=True):
            peft_model.load_adapter(adapter, adapter_name=name)
        return peft_model

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
            from .errors import UnknownCombinationTypeError

            raise UnknownCombinationTypeError(
                f"Unknown method {method!r}; available: {', '.join(sorted(get_combination_types()))}."
            )
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
        from .publish.hub import upload_folder
        from .publish.merge_checkpoint import merge_checkpoint

        upload_keys = ("private", "revision", "create_pr", "commit_message", "commit_description")
        upload_options = {key: kwargs.pop(key) for key in upload_keys if key in kwargs}
        local_dir = kwargs.pop("local_dir", None)
        checkpoint_options = {key: kwargs.pop(key) for key in ("dtype", "max_shard_size") if key in kwargs}
        if kwargs:
            raise MergeInputError(f"Unknown push_to_hub argument(s): {', '.join(sorted(kwargs))}.")
        method = self.method if self.merged_model is not None else "average"
        with tempfile.TemporaryDirectory(prefix="peft-merge-ext-push-") as scratch:
            folder = Path(local_dir) if local_dir is not None else Path(scratch) / "merged"
            merge_checkpoint(
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
            return upload_folder(folder, repo_id, token=token, **upload_options)
