"""The built-in task-merging types: Core Space TIES / DARE, TSV-Merge, Iso-C, Iso-CTS and KnOTS TIES / DARE.

Registered by the built-in plugin (`plugins.builtin_types`) through the same hook as any third-party type. All work
in factor space at `O((out + in) R^2 + R^3)` per module (`R` = the sum of the adapters' ranks) and never form an
`out x in` matrix; the maths is in `lowrank.core_space` and `lowrank.spectral`. Inputs are the contract's canonical
factors: `D_i = B_i A_i` with the LoRA scaling folded into `B_i`.

Options shared with PEFT's `ties` / `dare_*` (`density`, `majority_sign_method`) have PEFT's meaning, and PEFT's
drop-in `add_weighted_adapter(..., density=0.3)` passes them on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import MergeInputError
from ..lowrank.core_space import (
    MAJORITY_SIGN_METHODS,
    CoreSpace,
    ElementwiseMerge,
    knots_components,
    merge_elementwise,
    module_seed,
)
from ..lowrank.factor_math import compress, compress_in_bases
from ..lowrank.spectral import iso_c_factors, iso_cts_factors, tsv_factors
from .contract import LowRankDelta, ModuleContext
from .validation import check_adapter_count, check_fraction, check_non_negative, check_not_all_zero

__all__ = [
    "core_dare",
    "core_ties",
    "iso_c",
    "iso_cts",
    "knots_dare",
    "knots_ties",
    "register_task_merging_types",
    "tsv",
]

CORE_SPACE_URL = "https://arxiv.org/abs/2509.17786"
TSV_URL = "https://arxiv.org/abs/2412.00081"
ISO_URL = "https://arxiv.org/abs/2502.04959"
KNOTS_URL = "https://arxiv.org/abs/2410.19735"


def _zero(like: LowRankDelta) -> LowRankDelta:
    out_features, in_features = like.shape
    return LowRankDelta(like.B.new_zeros(out_features, 1), like.A.new_zeros(1, in_features))


def _finish(
    left: torch.Tensor, core: torch.Tensor, right: torch.Tensor, context: ModuleContext, **stats: Any
) -> LowRankDelta:
    """Compress `left @ core @ right^T` (orthonormal `left`, `right`) to its numerical rank (or optimally to
    `svd_rank`) and record the module's statistics."""
    merged, compression = compress_in_bases(left, core, right, context.svd_rank)
    context.record(
        rank=compression.rank,
        numerical_rank=compression.numerical_rank,
        energy_kept=compression.energy_kept,
        **stats,
    )
    return merged


def _generator(seed: int, context: ModuleContext, deltas: Sequence[LowRankDelta]) -> torch.Generator:
    """DARE's generator for one module, on the tensors' device, seeded by `module_seed(seed, module name)`."""
    generator = torch.Generator(device=deltas[0].B.device)
    generator.manual_seed(module_seed(seed, context.name))
    return generator


def _core_space(
    deltas: Sequence[LowRankDelta], weights: Sequence[float], context: ModuleContext, how: ElementwiseMerge
) -> LowRankDelta:
    space = CoreSpace.from_deltas(deltas)
    if space.left.shape[1] == 0 or space.right.shape[1] == 0:  # every adapter is zero here (e.g. untrained B = 0)
        context.record(rank=1, numerical_rank=0, energy_kept=1.0, kept_fraction=1.0, sign_conflict_rate=0.0)
        return _zero(deltas[0])
    merged, stats = merge_elementwise(space.cores(), weights, how)
    return _finish(
        *space.expand(merged),
        context,
        core_shape=f"{space.left.shape[1]}x{space.right.shape[1]}",
        kept_fraction=stats.kept_fraction,
        sign_conflict_rate=stats.sign_conflict_rate,
    )


def core_ties(
    deltas: Sequence[LowRankDelta],
    weights: Sequence[float],
    context: ModuleContext,
    density: float = 0.5,
    majority_sign_method: str = "total",
) -> LowRankDelta:
    """Core Space TIES: PEFT's `ties` on the cores `M_i = U^T D_i V`, result `U M V^T`.

    `U` holds the left singular vectors of `[B_1 ... B_k]` and `V` the right singular vectors of `[A_1; ...; A_k]`
    (numerical rank). The result does not depend on the sign convention of the singular vectors: flipping column
    `j` of `U` flips row `j` of every core, which changes neither the magnitudes that pruning ranks nor which
    entries agree with the elected sign, and the merged row comes back flipped, so `U M V^T` is unchanged (the same
    holds for `V` and columns). The one exception is a tied vote, which PEFT resolves as `+` (common with
    `majority_sign_method="frequency"`); a fixed convention (`lowrank.core_space.fix_signs`) makes even those
    deterministic. It does depend on how each adapter's product is split into `B_i` and `A_i`:
    `B_i G` and `G^{-1} A_i` give the same `D_i` but other singular vectors of the stacked factors, hence other
    core coordinates for the element-wise pruning. The contract's canonical split is used (the stored LoRA factors,
    scaling folded into `B`), as in the paper.

    Args:
        density (`float`, defaults to 0.5): The fraction of each core's entries kept by magnitude, in `(0, 1]`.
        majority_sign_method (`str`, defaults to `"total"`): `"total"` or `"frequency"`, as PEFT.
    """
    return _core_space(deltas, weights, context, ElementwiseMerge(density, majority_sign_method))


def core_dare(
    deltas: Sequence[LowRankDelta],
    weights: Sequence[float],
    context: ModuleContext,
    density: float = 0.5,
    majority_sign_method: str = "total",
    elect_sign: bool = True,
    seed: int = 0,
) -> LowRankDelta:
    """Core Space DARE: PEFT's `dare_ties` (or `dare_linear`) on the cores `M_i = U^T D_i V`, result `U M V^T`.

    Each core entry is kept with probability `density` and rescaled by `1 / density`; the random drop uses a
    `torch.Generator` on the tensors' device seeded with `module_seed(seed, module name)`, so one seed reproduces
    the whole merge. The mask depends on positions only, so the sign convention of `U` and `V` does not matter.

    Args:
        density (`float`, defaults to 0.5): The keep probability, in `(0, 1]`.
        majority_sign_method (`str`, defaults to `"total"`): As PEFT; unused with `elect_sign=False`.
        elect_sign (`bool`, defaults to `True`): `True` is `dare_ties` (elect a sign, average the agreeing
            entries); `False` is `dare_linear` (sum the weighted, rescaled cores).
        seed (`int`, defaults to 0): The seed of the random drop.
    """
    how = ElementwiseMerge(density, majority_sign_method, elect_sign, _generator(seed, context, deltas))
    return _core_space(deltas, weights, context, how)


def _knots(
    deltas: Sequence[LowRankDelta], weights: Sequence[float], context: ModuleContext, how: ElementwiseMerge
) -> LowRankDelta:
    q_b, left, values, components = knots_components(deltas)
    if values.numel() == 0:
        context.record(rank=1, numerical_rank=0, energy_kept=1.0, kept_fraction=1.0, sign_conflict_rate=0.0)
        return _zero(deltas[0])
    merged, stats = merge_elementwise(components, weights, how)
    q_a, r_a = torch.linalg.qr(merged.T)  # U S V_merged^T = Q_b (P S R_a^T) Q_a^T
    return _finish(
        q_b,
        left @ (values[:, None] * r_a.T),
        q_a,
        context,
        aligned_rank=values.numel(),
        kept_fraction=stats.kept_fraction,
        sign_conflict_rate=stats.sign_conflict_rate,
    )


def knots_ties(
    deltas: Sequence[LowRankDelta],
    weights: Sequence[float],
    context: ModuleContext,
    density: float = 0.5,
    majority_sign_method: str = "total",
) -> LowRankDelta:
    """KnOTS-TIES: `[D_1 ... D_k] = U S [V_1^T ... V_k^T]`, PEFT's `ties` on the `V_i^T`, result `U S V_merged^T`.

    Sign conventions do not matter (a flipped singular pair flips row `j` of every `V_i^T` together).

    Args:
        density (`float`, defaults to 0.5): The fraction of each `V_i^T`'s entries kept by magnitude, in `(0, 1]`.
        majority_sign_method (`str`, defaults to `"total"`): `"total"` or `"frequency"`, as PEFT.
    """
    return _knots(deltas, weights, context, ElementwiseMerge(density, majority_sign_method))


def knots_dare(
    deltas: Sequence[LowRankDelta],
    weights: Sequence[float],
    context: ModuleContext,
    density: float = 0.5,
    majority_sign_method: str = "total",
    elect_sign: bool = True,
    seed: int = 0,
) -> LowRankDelta:
    """KnOTS-DARE: PEFT's `dare_ties` (`elect_sign=False`: `dare_linear`) on the aligned task components `V_i^T`.

    Args:
        density (`float`, defaults to 0.5): The keep probability, in `(0, 1]`.
        majority_sign_method (`str`, defaults to `"total"`): As PEFT; unused with `elect_sign=False`.
        elect_sign (`bool`, defaults to `True`): `dare_ties` (`True`) or `dare_linear` (`False`).
        seed (`int`, defaults to 0): The seed of the random drop (see `core_dare`).
    """
    how = ElementwiseMerge(density, majority_sign_method, elect_sign, _generator(seed, context, deltas))
    return _knots(deltas, weights, context, how)


def tsv(
    deltas: Sequence[LowRankDelta], weights: Sequence[float], context: ModuleContext, keep: float | None = None
) -> LowRankDelta:
    """TSV-Merge: the top `ceil(keep * r_i)` singular triplets of each `D_i`, bases decorrelated by their polar
    factors, result `U_perp blockdiag(w_i S_i') V_perp^T`; `svd_rank` truncates it optimally.

    Args:
        keep (`float`, *optional*): The fraction of each adapter's numerical rank `r_i` kept, in `(0, 1]`;
            `None` (the default) is `1 / k`.
    """
    fraction = 1.0 / len(deltas) if keep is None else float(keep)
    delta, kept = tsv_factors(deltas, weights, fraction)
    merged, compression = compress(delta.B, delta.A, context.svd_rank)
    context.record(
        rank=compression.rank,
        numerical_rank=compression.numerical_rank,
        energy_kept=compression.energy_kept,
        kept_triplets=kept,
    )
    return merged


def iso_c(deltas: Sequence[LowRankDelta], weights: Sequence[float], context: ModuleContext) -> LowRankDelta:
    """Iso-C: `mean(S) U V^T` for the thin SVD `sum(w_i D_i) = U S V^T` at its numerical rank. With `svd_rank=r`
    the `r` strongest directions of the sum are kept, each at the same level `mean(S)` (an optimal truncation:
    all singular values of the result are equal)."""
    result = iso_c_factors(deltas, weights, context.svd_rank)
    context.record(rank=result.delta.rank, common_rank=result.common_rank, mean_singular_value=result.level)
    return result.delta


def iso_cts(
    deltas: Sequence[LowRankDelta],
    weights: Sequence[float],
    context: ModuleContext,
    common_space_fraction: float = 0.8,
) -> LowRankDelta:
    """Iso-CTS: the top singular directions of `sum(w_i D_i)` (common subspace) plus, for each adapter, the top
    directions of `w_i D_i` projected off that subspace (task-specific subspaces), decorrelated by their polar
    factors, all at the mean of their singular values. With `svd_rank=r` the `r` directions with the largest
    singular values before flattening are kept, at the same level.

    Args:
        common_space_fraction (`float`, defaults to 0.8, the paper's value): The share of the total size
            `T = min(out, in, sum of the adapters' numerical ranks)` given to the common subspace, in `[0, 1]`; the
            rest is split equally between the adapters (rounded as the paper does, see
            `lowrank.spectral.common_space_size`). 1 keeps only common directions (Iso-C on the top `T`).
    """
    result = iso_cts_factors(deltas, weights, float(common_space_fraction), context.svd_rank)
    context.record(
        rank=result.delta.rank,
        common_rank=result.common_rank,
        task_rank=result.task_rank,
        mean_singular_value=result.level,
    )
    return result.delta


def _check_elementwise(name: str, weights: list[float], options: dict[str, Any]) -> None:
    check_adapter_count(name, weights)
    check_non_negative(name, weights)
    check_fraction(name, "density", options.get("density"))
    method = options.get("majority_sign_method")
    if method not in MAJORITY_SIGN_METHODS:
        raise MergeInputError(
            f"combination_type={name!r}: majority_sign_method must be 'total' or 'frequency' (as PEFT), got "
            f"{method!r:.100}."
        )
    if "seed" in options:
        seed = options["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MergeInputError(
                f"combination_type={name!r}: seed must be an integer (e.g. seed=0), got {seed!r:.100}; it makes the "
                "random drop reproducible."
            )
        if not isinstance(options.get("elect_sign"), bool):
            raise MergeInputError(
                f"combination_type={name!r}: elect_sign must be True (dare_ties) or False (dare_linear), got "
                f"{options.get('elect_sign')!r:.100}."
            )


def _validator(name: str) -> Callable[[list[float], dict[str, Any]], None]:
    def validate(weights: list[float], options: dict[str, Any]) -> None:
        if name.startswith(("core_", "knots_")):
            _check_elementwise(name, weights, options)
            return
        check_adapter_count(name, weights)
        check_not_all_zero(name, weights)
        if name == "tsv" and options.get("keep") is not None:
            check_fraction(name, "keep", options["keep"])
        if name == "iso_cts":
            check_fraction(name, "common_space_fraction", options.get("common_space_fraction"), allow_zero=True)

    validate.__name__ = f"validate_{name}"
    return validate


DESCRIPTIONS = {
    "core_ties": (
        core_ties,
        f"Core Space TIES: PEFT ties on the cores M_i = U^T B_i A_i V (U, V: singular vectors of the stacked B_i "
        f"and A_i), result U M V^T; exact, R x R work ({CORE_SPACE_URL}).",
    ),
    "core_dare": (
        core_dare,
        f"Core Space DARE: PEFT dare_ties (elect_sign=False: dare_linear) on the cores M_i = U^T B_i A_i V, "
        f"seeded; result U M V^T ({CORE_SPACE_URL}).",
    ),
    "tsv": (
        tsv,
        f"TSV-Merge: top ceil(keep r_i) singular triplets of each B_i A_i, bases decorrelated by polar factors, "
        f"U_perp blockdiag(w_i S_i') V_perp^T ({TSV_URL}).",
    ),
    "iso_c": (iso_c, f"Iso-C: mean(S) U V^T for sum(w_i B_i A_i) = U S V^T, an isotropic spectrum ({ISO_URL})."),
    "iso_cts": (
        iso_cts,
        f"Iso-CTS: common subspace of sum(w_i B_i A_i) plus task-specific directions orthogonal to it, "
        f"decorrelated, at the mean singular value ({ISO_URL}).",
    ),
    "knots_ties": (
        knots_ties,
        f"KnOTS-TIES: [B_1 A_1 ... B_k A_k] = U S [V_1^T ... V_k^T], PEFT ties on the V_i^T, result U S V_merged^T "
        f"({KNOTS_URL}).",
    ),
    "knots_dare": (
        knots_dare,
        f"KnOTS-DARE: PEFT dare_ties (elect_sign=False: dare_linear) on the aligned task components V_i^T, "
        f"seeded; result U S V_merged^T ({KNOTS_URL}).",
    ),
}


def register_task_merging_types(register: Any) -> None:
    """Register the task-merging types with the built-in plugin's `register` callback."""
    for name, (function, description) in DESCRIPTIONS.items():
        register(name, function, description=description, validate=_validator(name))
