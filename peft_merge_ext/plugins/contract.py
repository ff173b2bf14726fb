"""The combination contract: what a combination function receives and returns.

A combination function works on ONE module at a time and never sees PEFT internals:

```python
def my_type(deltas: list[LowRankDelta], weights: list[float], context: ModuleContext, **options):
    ...
    return LowRankDelta(B, A)  # or a dense (out x in) tensor, factorized by the framework
```

Every input delta is given as factors in one canonical orientation, `delta = B @ A` of shape `out x in`, with the
LoRA scaling (`lora_alpha / r`, rslora, `alpha_pattern` and `rank_pattern`) already folded into `B`. Conv kernels
are flattened: `A` is `r x (in * prod(kernel))`. Embeddings use `out = embedding_dim`, `in = num_embeddings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["LowRankDelta", "ModuleContext"]


@dataclass(frozen=True)
class LowRankDelta:
    """A weight update `B @ A` held as its factors.

    Args:
        B (`torch.Tensor`): The left factor, shape `(out, r)`.
        A (`torch.Tensor`): The right factor, shape `(r, in)`.
    """

    B: torch.Tensor
    A: torch.Tensor

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LowRankDelta needs B of shape (out, r) and A of shape (r, in), got B {tuple(self.B.shape)} and "
                f"A {tuple(self.A.shape)}."
            )

    @property
    def rank(self) -> int:
        """The inner dimension `r` (an upper bound on the matrix rank)."""
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """The `(out, in)` shape of the dense delta."""
        return (self.B.shape[0], self.A.shape[1])

    def dense(self) -> torch.Tensor:
        """Materialize `B @ A`. Costs `out x in` memory: meant for tests and small modules."""
        return self.B @ self.A

    def to(self, *args: Any, **kwargs: Any) -> LowRankDelta:
        """Move or cast both factors, like `torch.Tensor.to`."""
        return LowRankDelta(self.B.to(*args, **kwargs), self.A.to(*args, **kwargs))


@dataclass
class ModuleContext:
    """What a combination function knows about the module it combines.

    Args:
        name (`str`): The module's name inside the base model, e.g. `"model.layers.3.self_attn.q_proj"`.
        layer_index (`int`, *optional*): The index of the transformer block holding the module, `None` outside blocks
            (embeddings, `lm_head`).
        num_layers (`int`, *optional*): The number of blocks of the model.
        svd_rank (`int`, *optional*): The upper bound on the output rank asked for by the user, `None` for no bound.
        stats (`dict`): Per-module statistics the function records with `record(...)`; published in the merge report.
    """

    name: str
    layer_index: int | None = None
    num_layers: int | None = None
    svd_rank: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def depth(self) -> float | None:
        """Relative depth `layer_index / (num_layers - 1)` in `[0, 1]`, or `None` outside numbered blocks."""
        if self.layer_index is None or self.num_layers is None:
            return None
        if self.num_layers <= 1:
            return 0.0
        return min(max(self.layer_index / (self.num_layers - 1), 0.0), 1.0)

    def record(self, **stats: Any) -> None:
        """Record per-module statistics (plain numbers or strings) for the merge report."""
        self.stats.update(stats)
