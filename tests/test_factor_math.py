"""Property tests of the factor-space maths and the built-in combination functions, against dense float64 algebra.

Every example draws small random factors (float64) from a seed chosen by hypothesis; the expected values are
computed densely (`B @ A`, `torch.linalg.svd`, explicit sums), never by calling the code under test twice.
"""

from __future__ import annotations

import math

import pytest
import torch
from dense_reference import dense_karcher, dense_slerp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from peft_merge_ext.lowrank.factor_math import (
    FactoredSpan,
    compress,
    gram_matrix,
    karcher_coefficients,
    linear_combination,
    slerp_coefficients,
)
from peft_merge_ext.plugins.builtin_types import average, karcher, slerp, weighted
from peft_merge_ext.plugins.contract import LowRankDelta, ModuleContext

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPE = torch.float64


def random_delta(generator: torch.Generator, out_features: int, in_features: int, rank: int) -> LowRankDelta:
    """A random delta with factors of very different scales, like trained LoRA factors."""
    b = torch.randn(out_features, rank, generator=generator, dtype=DTYPE)
    a = torch.randn(rank, in_features, generator=generator, dtype=DTYPE) * 0.1
    return LowRankDelta(b, a)


@st.composite
def delta_sets(draw: st.DrawFn, min_count: int = 1, max_count: int = 4) -> list[LowRankDelta]:
    """Between `min_count` and `max_count` deltas of one random shape, each of its own random rank."""
    count = draw(st.integers(min_count, max_count))
    out_features = draw(st.integers(1, 9))
    in_features = draw(st.integers(1, 9))
    ranks = draw(st.lists(st.integers(1, 4), min_size=count, max_size=count))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return [random_delta(generator, out_features, in_features, rank) for rank in ranks]


def dense_rank(matrix: torch.Tensor) -> int:
    """numpy's `matrix_rank` rule on a dense matrix."""
    s = torch.linalg.svdvals(matrix)
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > s[0] * max(matrix.shape) * torch.finfo(matrix.dtype).eps).sum())


def assert_close_dense(actual: torch.Tensor, expected: torch.Tensor, scale: float, rtol: float = 1e-9) -> None:
    """Frobenius error below `rtol * scale` (scale: the size of the inputs, so cancellation does not hurt)."""
    error = float(torch.linalg.matrix_norm(actual - expected))
    assert error <= rtol * max(scale, 1e-300), f"error {error:.3e} exceeds {rtol:.0e} x {scale:.3e}"


def input_scale(deltas: list[LowRankDelta], coefficients: list[float] | None = None) -> float:
    coefficients = coefficients or [1.0] * len(deltas)
    return sum(abs(c) * float(torch.linalg.matrix_norm(d.dense())) for d, c in zip(deltas, coefficients, strict=True))


def context(name: str = "model.layers.0.mlp.down_proj", svd_rank: int | None = None) -> ModuleContext:
    return ModuleContext(name, layer_index=0, num_layers=1, svd_rank=svd_rank)


# ----------------------------------------------------------------------------------------------------------------
# gram_matrix


@PROPERTY_SETTINGS
@given(deltas=delta_sets())
def test_gram_matrix_equals_dense_inner_products(deltas):
    dense = [d.dense() for d in deltas]
    for gram in (gram_matrix(deltas), FactoredSpan.from_deltas(deltas).gram()):
        assert gram.shape == (len(deltas), len(deltas))
        for i, left in enumerate(dense):
            for j, right in enumerate(dense):
                expected = float((left * right).sum())
                bound = 1e-12 * float(torch.linalg.matrix_norm(left) * torch.linalg.matrix_norm(right)) + 1e-300
                assert abs(float(gram[i, j]) - expected) <= bound
        assert torch.equal(gram, gram.T)


@PROPERTY_SETTINGS
@given(deltas=delta_sets(), data=st.data())
def test_factored_span_combines_like_the_stacked_factors(deltas, data):
    """One QR pair serves every combination: `combine(c)` is `sum(c_i D_i)`, truncated like `compress` would."""
    span = FactoredSpan.from_deltas(deltas)
    assert span.shape == deltas[0].shape and span.ranks == tuple(d.rank for d in deltas)
    finite = st.floats(-3, 3, allow_nan=False, allow_infinity=False)
    for _ in range(2):
        coefficients = data.draw(st.lists(finite, min_size=len(deltas), max_size=len(deltas)))
        max_rank = data.draw(st.one_of(st.none(), st.integers(1, 5)))
        merged, stats = span.combine(coefficients, max_rank)
        stacked_b = torch.cat([c * d.B for c, d in zip(coefficients, deltas, strict=True)], dim=1)
        reference, reference_stats = compress(stacked_b, torch.cat([d.A for d in deltas], dim=0), max_rank)
        assert (stats.rank, stats.numerical_rank) == (reference_stats.rank, reference_stats.numerical_rank)
        scale = input_scale(deltas, coefficients)
        if max_rank is None:
            expected = sum(c * d.dense() for c, d in zip(coefficients, deltas, strict=True))
            assert_close_dense(merged.dense(), expected, scale)
        else:  # same optimal error as compressing the explicitly scaled stack
            product = stacked_b @ torch.cat([d.A for d in deltas], dim=0)
            error = float(torch.linalg.matrix_norm(merged.dense() - product))
            reference_error = float(torch.linalg.matrix_norm(reference.dense() - product))
            assert abs(error - reference_error) <= 1e-9 * max(scale, 1e-300)
    with pytest.raises(ValueError, match="coefficients"):
        span.combine([1.0] * (len(deltas) + 1))


# ----------------------------------------------------------------------------------------------------------------
# compress


@PROPERTY_SETTINGS
@given(deltas=delta_sets(), duplicate=st.booleans())
def test_compress_is_exact_at_full_numerical_rank(deltas, duplicate):
    b = torch.cat([d.B for d in deltas], dim=1)
    a = torch.cat([d.A for d in deltas], dim=0)
    if duplicate:  # a rank-deficient input: repeat the columns of B with the rows of A (same product, doubled)
        b, a = torch.cat([b, b], dim=1), torch.cat([a, a], dim=0)
    product = b @ a
    merged, stats = compress(b, a)
    assert_close_dense(merged.dense(), product, float(torch.linalg.matrix_norm(b) * torch.linalg.matrix_norm(a)))
    assert stats.numerical_rank == dense_rank(product)
    assert stats.rank == merged.rank == max(stats.numerical_rank, 1)
    assert stats.energy_kept == 1.0
    assert merged.B.shape == (product.shape[0], merged.rank) and merged.A.shape == (merged.rank, product.shape[1])
    # balanced factors: B^T B == A A^T == diag(S)
    bb, aa = merged.B.T @ merged.B, merged.A @ merged.A.T
    assert torch.allclose(bb, aa, atol=1e-9 * float(bb.abs().max() + 1e-300))
    assert torch.allclose(bb, torch.diag(bb.diagonal()), atol=1e-9 * float(bb.abs().max() + 1e-300))


@PROPERTY_SETTINGS
@given(deltas=delta_sets(), max_rank=st.integers(1, 6))
def test_compress_truncation_is_eckart_young_optimal(deltas, max_rank):
    b = torch.cat([d.B for d in deltas], dim=1)
    a = torch.cat([d.A for d in deltas], dim=0)
    product = b @ a
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    numerical_rank = dense_rank(product)
    keep = min(max_rank, numerical_rank)
    merged, stats = compress(b, a, max_rank)
    scale = float(s[0]) if s.numel() else 0.0
    assert stats.rank == max(keep, 1) and merged.rank == stats.rank
    # The error of the best rank-k approximation is sqrt(sum of the dropped S^2) (Eckart-Young-Mirsky).
    optimal_error = math.sqrt(float((s[keep:] ** 2).sum()))
    error = float(torch.linalg.matrix_norm(merged.dense() - product))
    assert error <= optimal_error + 1e-9 * scale
    assert error >= optimal_error - 1e-9 * scale
    # With a gap after the k-th singular value, the best rank-k approximation is unique: compare the matrices.
    if 0 < keep < s.numel() and s[keep - 1] - s[keep] > 1e-3 * s[0]:
        truncated = (u[:, :keep] * s[:keep]) @ vh[:keep]
        assert_close_dense(merged.dense(), truncated, scale, rtol=1e-7)
    total = float((s[:numerical_rank] ** 2).sum())
    if total > 0:
        assert stats.energy_kept == pytest.approx(float((s[:keep] ** 2).sum()) / total, rel=1e-9)


@PROPERTY_SETTINGS
@given(deltas=delta_sets(min_count=2, max_count=3), data=st.data())
def test_cancellation_gives_the_rank_a_dense_computation_gives(deltas, data):
    """`D - D` is zero, and `D + E - D` has the rank of E: rounding noise of the factored form is not kept as rank."""
    first = deltas[0]
    rest = deltas[1:]
    scale = data.draw(st.floats(0.5, 4))
    _, zero_stats = linear_combination([first, first], [scale, -scale])
    assert zero_stats.numerical_rank == 0
    merged, stats = linear_combination([first, *rest, first], [scale, *[1.0] * len(rest), -scale])
    expected = sum(d.dense() for d in rest)
    assert stats.numerical_rank == dense_rank(expected)
    assert_close_dense(merged.dense(), expected, input_scale([first, *rest], [2 * scale] + [1.0] * len(rest)))


def test_compress_of_a_zero_product_gives_rank_one_zero_factors():
    merged, stats = compress(torch.zeros(5, 3, dtype=DTYPE), torch.ones(3, 4, dtype=DTYPE))
    assert merged.shape == (5, 4) and merged.rank == 1
    assert not merged.dense().any()
    assert stats.numerical_rank == 0


def test_compress_rejects_a_non_positive_max_rank():
    with pytest.raises(ValueError, match="max_rank"):
        compress(torch.ones(3, 1, dtype=DTYPE), torch.ones(1, 3, dtype=DTYPE), 0)


# ----------------------------------------------------------------------------------------------------------------
# weighted / average / linear_combination


@PROPERTY_SETTINGS
@given(
    deltas=delta_sets(min_count=2),
    data=st.data(),
)
def test_weighted_is_linear(deltas, data):
    finite = st.floats(-3, 3, allow_nan=False, allow_infinity=False)
    first = data.draw(st.lists(finite, min_size=len(deltas), max_size=len(deltas)))
    second = data.draw(st.lists(finite, min_size=len(deltas), max_size=len(deltas)))
    alpha, beta = data.draw(finite), data.draw(finite)
    combined = [alpha * x + beta * y for x, y in zip(first, second, strict=True)]
    result = weighted(deltas, combined, context()).dense()
    expected_sum = sum(c * d.dense() for c, d in zip(combined, deltas, strict=True))
    by_parts = alpha * weighted(deltas, first, context()).dense() + beta * weighted(deltas, second, context()).dense()
    scale = input_scale(deltas, [abs(alpha * x) + abs(beta * y) for x, y in zip(first, second, strict=True)])
    assert_close_dense(result, expected_sum, scale)
    assert_close_dense(result, by_parts, scale)


@PROPERTY_SETTINGS
@given(deltas=delta_sets(), data=st.data())
def test_average_normalizes_the_weights(deltas, data):
    weights = data.draw(st.lists(st.floats(0.1, 5), min_size=len(deltas), max_size=len(deltas)))
    result = average(deltas, weights, context()).dense()
    total = sum(weights)
    expected = sum(w / total * d.dense() for w, d in zip(weights, deltas, strict=True))
    assert_close_dense(result, expected, input_scale(deltas))
    equal = average(deltas, [1.0] * len(deltas), context()).dense()
    assert_close_dense(equal, sum(d.dense() for d in deltas) / len(deltas), input_scale(deltas))


def test_linear_combination_rejects_mismatched_lengths():
    delta = LowRankDelta(torch.ones(2, 1, dtype=DTYPE), torch.ones(1, 2, dtype=DTYPE))
    with pytest.raises(ValueError, match="coefficients"):
        linear_combination([delta, delta], [1.0])


# ----------------------------------------------------------------------------------------------------------------
# slerp


@PROPERTY_SETTINGS
@given(deltas=delta_sets(min_count=2, max_count=2), t=st.floats(0, 1))
def test_slerp_matches_the_dense_formula(deltas, t):
    result = slerp(deltas, [0.5, 0.5], context(), t=t).dense()
    assert_close_dense(result, dense_slerp(deltas[0].dense(), deltas[1].dense(), t), 2 * input_scale(deltas))


@PROPERTY_SETTINGS
@given(deltas=delta_sets(min_count=2, max_count=2))
def test_slerp_endpoints_give_the_inputs(deltas):
    at_zero = slerp(deltas, [1.0, 1.0], context(), t=0.0).dense()
    at_one = slerp(deltas, [1.0, 1.0], context(), t=1.0).dense()
    assert_close_dense(at_zero, deltas[0].dense(), input_scale(deltas))
    assert_close_dense(at_one, deltas[1].dense(), input_scale(deltas))
    # t from the weights: w_2 / (w_1 + w_2)
    from_weights = slerp(deltas, [1.0, 0.0], context()).dense()
    assert_close_dense(from_weights, deltas[0].dense(), input_scale(deltas))


@PROPERTY_SETTINGS
@given(deltas=delta_sets(min_count=2, max_count=2), t=st.floats(0, 1))
def test_slerp_is_symmetric(deltas, t):
    forward = slerp(deltas, [1.0, 1.0], context(), t=t).dense()
    backward = slerp(deltas[::-1], [1.0, 1.0], context(), t=1.0 - t).dense()
    assert_close_dense(forward, backward, 2 * input_scale(deltas))


@pytest.mark.parametrize("factor", [2.0, -0.5, 1.0])
def test_slerp_of_colinear_deltas_is_linear(factor):
    generator = torch.Generator().manual_seed(3)
    first = random_delta(generator, 6, 5, 2)
    second = LowRankDelta(first.B * factor, first.A.clone())
    ctx = context()
    result = slerp([first, second], [1.0, 1.0], ctx, t=0.3).dense()
    assert_close_dense(result, 0.7 * first.dense() + 0.3 * second.dense(), input_scale([first, second]))
    assert ctx.stats["theta_degrees"] == pytest.approx(0.0 if factor > 0 else 180.0, abs=1e-5)


def test_slerp_with_a_zero_delta_is_linear():
    generator = torch.Generator().manual_seed(4)
    first = random_delta(generator, 6, 5, 2)
    zero = LowRankDelta(torch.zeros(6, 1, dtype=DTYPE), torch.zeros(1, 5, dtype=DTYPE))
    coefficients, theta = slerp_coefficients(gram_matrix([first, zero]), 0.25)
    assert coefficients == (0.75, 0.25) and theta is None
    ctx = context()
    result = slerp([first, zero], [1.0, 1.0], ctx, t=0.25).dense()
    assert_close_dense(result, 0.75 * first.dense(), input_scale([first]))
    assert ctx.stats["theta_degrees"] is None


# ----------------------------------------------------------------------------------------------------------------
# karcher


@PROPERTY_SETTINGS
@given(deltas=delta_sets(min_count=2), data=st.data())
def test_karcher_matches_the_dense_iteration(deltas, data):
    weights = data.draw(st.lists(st.floats(0.05, 1), min_size=len(deltas), max_size=len(deltas)))
    dense = [d.dense() for d in deltas]
    unit = [m.flatten() / m.norm() for m in dense]
    # The spherical mean is well defined (and the iteration converges) for points in an open hemisphere.
    assume(all(float(u @ v) > -0.5 for u in unit for v in unit))
    ctx = context()
    result = karcher(deltas, weights, ctx, tol=1e-13, max_iter=500).dense()
    assert ctx.stats["converged"] is True
    assert_close_dense(result, dense_karcher(dense, weights), input_scale(deltas), rtol=1e-8)


@PROPERTY_SETTINGS
@given(deltas=delta_sets(min_count=1, max_count=1), copies=st.integers(2, 4), data=st.data())
def test_karcher_of_identical_inputs_is_the_input(deltas, copies, data):
    weights = data.draw(st.lists(st.floats(0.05, 1), min_size=copies, max_size=copies))
    result = karcher(deltas * copies, weights, context()).dense()
    assert_close_dense(result, deltas[0].dense(), input_scale(deltas))


@PROPERTY_SETTINGS
@given(deltas=delta_sets(min_count=2, max_count=2))
def test_karcher_of_two_equal_norm_inputs_is_the_slerp_midpoint(deltas):
    first, second = deltas
    norm_1 = float(torch.linalg.matrix_norm(first.dense()))
    norm_2 = float(torch.linalg.matrix_norm(second.dense()))
    second = LowRankDelta(second.B * (norm_1 / norm_2), second.A)
    cosine = float((first.dense() * second.dense()).sum()) / norm_1**2
    assume(-0.99 < cosine < 0.999)  # away from the antipodal case and from SLERP's linear fallback
    mean = karcher([first, second], [0.5, 0.5], context()).dense()
    midpoint = slerp([first, second], [0.5, 0.5], context(), t=0.5).dense()
    assert_close_dense(mean, midpoint, 2 * norm_1, rtol=1e-8)


def test_karcher_coefficients_ignore_zero_deltas_for_the_direction():
    generator = torch.Generator().manual_seed(5)
    first = random_delta(generator, 4, 6, 3)
    zero = LowRankDelta(torch.zeros(4, 1, dtype=DTYPE), torch.zeros(1, 6, dtype=DTYPE))
    result = karcher_coefficients(gram_matrix([first, zero]), [0.25, 0.75])
    assert result.converged
    # the direction is the only non-zero input's; the norm is the weighted mean of the norms (0.25 |D| + 0.75 * 0)
    assert result.coefficients.tolist() == pytest.approx([0.25, 0.0], abs=1e-12)


@pytest.mark.parametrize("weights", [[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
def test_karcher_of_opposite_inputs_stays_finite(weights):
    """Opposite directions (here 1 x 1 deltas of opposite signs) have no geodesic between them: no crash, no NaN."""
    first = LowRankDelta(torch.tensor([[2.0]], dtype=DTYPE), torch.tensor([[0.5]], dtype=DTYPE))
    second = LowRankDelta(torch.tensor([[-3.0]], dtype=DTYPE), torch.tensor([[1.0]], dtype=DTYPE))
    ctx = context()
    result = karcher([first, second], weights, ctx).dense()
    assert torch.isfinite(result).all()
    # the norm is the weighted mean of the norms (1 and 3), along one of the two inputs' directions
    assert abs(float(result)) == pytest.approx(weights[0] * 1.0 + weights[1] * 3.0)


def test_karcher_of_opposite_inputs_among_several_stays_finite():
    """A case hypothesis found: 1 x 1 deltas, the two with positive weights of opposite signs."""
    values = [(1.5410, -0.0293), (-2.1788, 0.0568), (-0.7193, -0.0403)]
    deltas = [LowRankDelta(torch.tensor([[b]], dtype=DTYPE), torch.tensor([[a]], dtype=DTYPE)) for b, a in values]
    rank_two_b = torch.tensor([[-1.0845, -1.3986]], dtype=DTYPE)
    rank_two = LowRankDelta(rank_two_b, torch.tensor([[0.0403], [0.0838]], dtype=DTYPE))
    deltas.insert(2, rank_two)
    result = karcher(deltas, [0.0, 0.5625, 0.0, 2.0], context()).dense()
    assert torch.isfinite(result).all()


# ----------------------------------------------------------------------------------------------------------------
# every type, finite outputs, rank bound


@PROPERTY_SETTINGS
@given(
    deltas=delta_sets(min_count=2),
    zero_index=st.one_of(st.none(), st.integers(0, 3)),
    svd_rank=st.one_of(st.none(), st.integers(1, 4)),
    data=st.data(),
)
def test_every_type_gives_finite_factors_within_the_rank_bound(deltas, zero_index, svd_rank, data):
    if zero_index is not None and zero_index < len(deltas):
        shape = deltas[zero_index].shape
        deltas[zero_index] = LowRankDelta(torch.zeros(shape[0], 1, dtype=DTYPE), torch.zeros(1, shape[1], dtype=DTYPE))
    weights = data.draw(st.lists(st.floats(0, 2), min_size=len(deltas), max_size=len(deltas)))
    assume(sum(weights) > 1e-3)
    calls = {
        "weighted": lambda ctx: weighted(deltas, weights, ctx),
        "average": lambda ctx: average(deltas, weights, ctx),
        "karcher": lambda ctx: karcher(deltas, weights, ctx),
        "slerp": lambda ctx: slerp(deltas[:2], weights[:2], ctx, t=data.draw(st.floats(0, 1))),
    }
    if sum(weights[:2]) <= 0:
        del calls["slerp"]
    for name, call in calls.items():
        ctx = context(svd_rank=svd_rank)
        result = call(ctx)
        assert torch.isfinite(result.B).all() and torch.isfinite(result.A).all(), name
        assert result.shape == deltas[0].shape, name
        if svd_rank is not None:
            assert result.rank <= svd_rank, name
        assert ctx.stats["rank"] == result.rank, name
