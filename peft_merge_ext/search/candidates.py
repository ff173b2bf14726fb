"""How `search_weights` builds each candidate merge into the model's scratch adapter, and the best one at the end.

`PluginCandidates` combines a registered (factor-space) type and rewrites the factors of one scratch adapter in place
when they fit its rank; `PeftCandidates` goes through PEFT's own `add_weighted_adapter` (re-seeded for DARE). Both
check the adapters and options before the model is modified, and `add_final` adds the chosen combination with the
search recorded in its lineage.
"""

from __future__ import annotations

from typing import Any

from ..peft_bridge.adapter_state import delete_adapter

__all__ = ["PeftCandidates", "PluginCandidates"]


class PluginCandidates:
    """Candidates of a registered (factor-space) type, written into one scratch adapter that is reused."""

    def __init__(self, lora_model: Any, adapters: list[str], combination_type: str, svd_rank: Any, options: dict):
        self.lora_model, self.adapters, self.combination_type = lora_model, adapters, combination_type
        self.svd_rank, self.options = svd_rank, options
        self.created = False
        # Validates adapters, options and svd_rank before anything is modified.
        self.request([1.0] * len(adapters))

    def request(self, weights: list[float]) -> Any:
        from ..engine.request import resolve_request

        return resolve_request(
            self.lora_model.peft_config, self.adapters, weights, self.combination_type, self.svd_rank, self.options
        )

    def build(self, weights: list[float], name: str) -> None:
        from ..peft_bridge.adapters import add_combined_adapter
        from ..peft_bridge.layers import slot_rank, write_factors
        from ..peft_bridge.source import LiveFactorSource, merge_live

        request = self.request(weights)
        if self.created:
            model = self.lora_model
            source = LiveFactorSource(model.model, model.peft_config, list(model.active_adapters), model)
            merged, _ = merge_live(source, request)
            slots = [slot_rank(m.module.handle, name) for m in merged]
            if all(slot >= m.delta.rank for slot, m in zip(slots, merged, strict=True)):
                for slot, m in zip(slots, merged, strict=True):
                    write_factors(m.module.handle, name, _pad(m.delta, slot), m.module.storage_dtype)
                return
            self.remove(name)
        add_combined_adapter(self.lora_model, name, request)
        self.created = True

    def remove(self, name: str) -> None:
        if self.created:
            delete_adapter(self.lora_model, name)
            self.created = False

    def add_final(self, weights: list[float], name: str, search: dict[str, Any]) -> None:
        from ..peft_bridge.adapters import add_combined_adapter

        add_combined_adapter(self.lora_model, name, self.request(weights), search=search)


class PeftCandidates:
    """Candidates of one of PEFT's own types, through PEFT's `add_weighted_adapter` (re-seeded for DARE)."""

    def __init__(self, lora_model: Any, adapters: list[str], combination_type: str, svd_rank: Any, options: dict):
        from ..engine.request import resolve_request

        resolve_request(lora_model.peft_config, adapters, [1.0] * len(adapters), combination_type, svd_rank, options)
        self.lora_model, self.adapters, self.combination_type = lora_model, adapters, combination_type
        self.arguments = {"svd_rank": svd_rank, **options}
        self.created = False
        self.seed = 0

    def _add(self, weights: list[float], name: str) -> None:
        import torch

        devices = sorted({p.device.index or 0 for p in self.lora_model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            self.lora_model.add_weighted_adapter(
                self.adapters, weights, name, combination_type=self.combination_type, **self.arguments
            )

    def build(self, weights: list[float], name: str) -> None:
        self.remove(name)
        self.created = True
        self._add(weights, name)

    def remove(self, name: str) -> None:
        if self.created:
            delete_adapter(self.lora_model, name)
            self.created = False

    def add_final(self, weights: list[float], name: str, search: dict[str, Any]) -> None:
        from ..peft_bridge.adapters import freeze_adapter
        from ..peft_bridge.records import get_lineage

        self._add(weights, name)
        freeze_adapter(self.lora_model, name)
        lineage = get_lineage(self.lora_model.peft_config[name])
        if lineage is not None:
            lineage.search = search


def _pad(delta: Any, rank: int) -> Any:
    """The same product `B @ A` with zero columns / rows appended up to `rank`."""
    import torch

    from ..plugins.contract import LowRankDelta

    extra = rank - delta.rank
    if extra == 0:
        return delta
    b = torch.cat([delta.B, delta.B.new_zeros(delta.B.shape[0], extra)], dim=1)
    a = torch.cat([delta.A, delta.A.new_zeros(extra, delta.A.shape[1])], dim=0)
    return LowRankDelta(b, a)
