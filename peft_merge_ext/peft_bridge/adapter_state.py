"""Temporarily switch the active LoRA adapter of a PEFT model, then put everything back exactly as it was.

PEFT's `set_adapter` also flips `requires_grad` of adapter weights, so the active adapters, the `PeftModel`'s own
`active_adapter`, every parameter's `requires_grad` and the train/eval mode are all recorded and restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MergeInputError

__all__ = ["AdapterState", "activate", "delete_adapter", "lora_model_of", "using_adapter"]


def lora_model_of(model: Any) -> Any:
    """The PEFT `LoraModel` of a `PeftModel` (or `model` itself when it already is one).

    Raises:
        `MergeInputError`: When `model` holds no LoRA adapters.
    """
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, BaseTuner):
        return model
    candidate = getattr(model, "base_model", None)
    if isinstance(candidate, BaseTuner):
        return candidate
    raise MergeInputError(
        f"Expected a PEFT model with LoRA adapters (PeftModel or LoraModel), got {type(model).__name__}; load the "
        "adapters first, e.g. with PeftModel.from_pretrained(base_model, adapter_path, adapter_name=...)."
    )


@dataclass
class AdapterState:
    """What PEFT's adapter switching and temporary adapters change, recorded so it can be put back exactly.

    The one implementation used by `save_merged` (PEFT's own types run into a temporary adapter), `search_weights`
    (scratch adapters) and `evaluate` (switching adapters): the adapter configs, the active adapters (also the
    `PeftModel`'s own `active_adapter`), every parameter's `requires_grad` and every module's train/eval mode.
    """

    model: Any
    configs: dict[str, Any]
    active_adapters: list[str]
    peft_active_adapter: Any
    requires_grad: list[tuple[Any, bool]]
    training: list[tuple[Any, bool]]

    @classmethod
    def capture(cls, model: Any) -> AdapterState:
        """Record the state of `model` (a `PeftModel` or `LoraModel`)."""
        lora_model = lora_model_of(model)
        return cls(
            model=model,
            configs=dict(lora_model.peft_config),
            active_adapters=list(lora_model.active_adapters),
            peft_active_adapter=model.__dict__.get("active_adapter") if model is not lora_model else None,
            requires_grad=[(parameter, parameter.requires_grad) for parameter in model.parameters()],
            training=[(module, module.training) for module in model.modules()],
        )

    def restore(self, keep: Sequence[str] = ()) -> None:
        """Delete adapters added since `capture` (except those in `keep`), then put back the configs, active adapters,
        `requires_grad` flags and train/eval modes."""
        lora_model = lora_model_of(self.model)
        for name in [name for name in lora_model.peft_config if name not in self.configs and name not in keep]:
            delete_adapter(lora_model, name, self.active_adapters)
        kept = {name: lora_model.peft_config[name] for name in keep if name in lora_model.peft_config}
        lora_model.peft_config.clear()
        lora_model.peft_config.update({**self.configs, **kept})
        if list(lora_model.active_adapters) != self.active_adapters:
            lora_model.set_adapter(self.active_adapters)
        if self.model is not lora_model and self.peft_active_adapter is not None:
            self.model.active_adapter = self.peft_active_adapter
        for parameter, flag in self.requires_grad:
            parameter.requires_grad_(flag)
        for module, flag in self.training:
            module.training = flag


def delete_adapter(lora_model: Any, name: str, fallback_active: list[str] | None = None) -> None:
    """Delete adapter `name` from a `LoraModel` (deactivated first: PEFT warns when deleting an active one)."""
    if name not in lora_model.peft_config:
        return
    active = [adapter for adapter in lora_model.active_adapters if adapter != name]
    if len(active) != len(lora_model.active_adapters):
        others = [adapter for adapter in lora_model.peft_config if adapter != name]
        lora_model.set_adapter(active or fallback_active or others[:1])
    lora_model.delete_adapter(name)


def activate(model: Any, adapter: str) -> None:
    """Make `adapter` the only active adapter of `model` (no other state is restored; see `using_adapter`)."""
    lora_model = lora_model_of(model)
    lora_model.set_adapter(adapter)
    if model is not lora_model:
        model.active_adapter = adapter


@contextlib.contextmanager
def using_adapter(model: Any, adapter: str | None) -> Iterator[None]:
    """Run the block with `adapter` as the only active adapter and `model` in eval mode, then restore everything.

    Args:
        model (`PeftModel` or `LoraModel`): The model.
        adapter (`str`, *optional*): The adapter to activate; `None` keeps the current adapters (only the eval mode
            is switched, and restored).

    Raises:
        `MergeInputError`: When `adapter` is not one of the model's adapters.
    """
    if adapter is not None:
        config = lora_model_of(model).peft_config
        if adapter not in config:
            raise MergeInputError(
                f"Unknown adapter {adapter!r}; the model has: {', '.join(map(repr, config)) or 'none'}."
            )
    state = AdapterState.capture(model) if adapter is not None else None
    training = model.training
    try:
        if adapter is not None:
            activate(model, adapter)
        model.eval()
        yield
    finally:
        if state is not None:
            state.restore()
        model.train(training)
