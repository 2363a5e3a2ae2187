"""The affine map math: estimators, coupling, support and inverse (pure torch)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsteer.errors import ActSteerError
from actsteer.maps import AffineMap, check_samples, couple, quantile_grid, support_bounds
from actsteer.methods.gaussian_act import fit_gaussian
from actsteer.methods.linear_act import fit_linear
from actsteer.methods.mean_act import fit_mean

means = st.floats(-5, 5)
stds = st.floats(0.2, 4)


def gaussian(n: int, mean: float, std: float, units: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, units, generator=g, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(ms=means, ss=stds, mt=means, st_=stds)
def test_linear_act_on_gaussians_recovers_the_gaussian_transport(ms, ss, mt, st_):
    """For Gaussian source and target, the OT map is ω = σt/σs, β = μt − ω μs."""
    source, target = gaussian(20_000, ms, ss, seed=1), gaussian(20_000, mt, st_, seed=2)
    omega, beta = fit_linear(source.float(), target.float())
    expected_omega = st_ / ss
    assert torch.allclose(
        omega.double(), torch.full((3,), expected_omega, dtype=torch.float64), rtol=0.03
    )
    assert torch.allclose(beta.double(), mt - omega.double() * ms, atol=0.05 * (1 + st_))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 60), seed=st.integers(0, 1000))
def test_equal_counts_couple_by_plain_sorting(n, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g) * 3
    cx, cy = couple(x, y)
    assert torch.equal(cx, x.sort(0).values)
    assert torch.equal(cy, y.sort(0).values)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 50), m=st.integers(2, 200), seed=st.integers(0, 1000))
def test_unequal_counts_couple_on_a_common_quantile_grid(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 2, generator=g), torch.randn(m, 2, generator=g)
    cx, cy = couple(x, y)
    assert cx.shape == cy.shape == (max(n, m), 2)
    for c, raw in ((cx, x), (cy, y)):
        assert (c[1:] >= c[:-1] - 1e-6).all(), "coupled samples stay sorted"
        assert torch.allclose(c[0], raw.min(0).values) and torch.allclose(c[-1], raw.max(0).values)


def test_unequal_counts_still_estimate_the_transport():
    source, target = gaussian(500, 1.0, 2.0, seed=3), gaussian(4000, -1.0, 0.5, seed=4)
    omega, beta = fit_linear(source.float(), target.float())
    assert torch.allclose(omega, torch.full((3,), 0.25), rtol=0.08)
    assert torch.allclose(beta, torch.full((3,), -1.25), atol=0.1)


def test_quantile_grid_interpolates_between_order_statistics():
    x = torch.tensor([[0.0], [10.0]])
    assert torch.allclose(quantile_grid(x, 3), torch.tensor([[0.0], [5.0], [10.0]]))


def test_zero_variance_units_are_safe():
    source = torch.randn(100, 3)
    source[:, 1] = 2.0
    target = torch.randn(100, 3) + 5
    for fit in (fit_linear, fit_gaussian, fit_mean):
        omega, beta = fit(source, target)
        assert torch.isfinite(omega).all() and torch.isfinite(beta).all()
    omega, beta = fit_linear(source, target)
    assert omega[1] == 1 and torch.isclose(beta[1], target[:, 1].mean() - 2.0, atol=1e-5)
    omega, beta = fit_gaussian(source, target)
    assert omega[1] == 1 and beta[1] == 0


def test_mean_and_gaussian_formulas():
    source, target = (
        gaussian(1000, 1.0, 2.0, seed=5).float(),
        gaussian(800, 3.0, 1.0, seed=6).float(),
    )
    omega, beta = fit_mean(source, target)
    assert torch.equal(omega, torch.ones(3))
    assert torch.allclose(beta, target.mean(0) - source.mean(0), atol=1e-5)
    omega, beta = fit_gaussian(source, target)
    ratio = target.std(0, correction=0) / source.std(0, correction=0)
    assert torch.allclose(omega, ratio, rtol=1e-4)
    assert torch.allclose(beta, target.mean(0) - ratio * source.mean(0), atol=1e-4)


unit_maps = st.builds(lambda seed: torch.Generator().manual_seed(seed), st.integers(0, 10_000))


@settings(max_examples=50, deadline=None)
@given(g=unit_maps, strength=st.floats(0, 1))
def test_strength_interpolates_between_identity_and_the_map(g, strength):
    amap = AffineMap(torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g))
    a = torch.randn(7, 5, generator=g)
    full = amap.omega * a + amap.beta
    assert torch.allclose(amap(a, strength), a + strength * (full - a), atol=1e-5)
    assert torch.equal(amap(a, 0.0), a)


@settings(max_examples=50, deadline=None)
@given(g=unit_maps)
def test_inverse_after_map_is_identity_inside_the_support(g):
    source = torch.randn(50, 4, generator=g) * 2
    target = torch.randn(60, 4, generator=g) + 3
    omega, beta = fit_linear(source, target)
    amap = AffineMap(omega, beta, support_bounds(source))
    lo, hi = amap.bounds["q0-100"]
    # source samples strictly inside the open support (the extremes lie on its bounds)
    inside = source[5:20].clamp(lo.nextafter(hi), hi.nextafter(lo))
    for support in ("q0-100", "all"):
        moved = amap(inside, 1.0, support)
        back = amap.inverse()(moved, 1.0, support)
        assert torch.allclose(back, inside, atol=1e-4)


def test_why_the_inverse_is_exact_only_with_support_all():
    """Under a bounded support T is the identity outside (lo, hi), so an activation it leaves
    alone can fall inside the image of (lo, hi), where T⁻¹ moves it: no inverse undoes that
    (what Steering.inverse's docstring says). With support "all" T⁻¹ ∘ T is the identity;
    at λ < 1, (T⁻¹)_λ ∘ T_λ is not (the interpolations are not each other's inverse)."""
    source = torch.linspace(0, 1, 101).unsqueeze(1)
    amap = AffineMap(torch.tensor([2.0]), torch.tensor([0.0]), support_bounds(source))
    untouched = torch.tensor([[1.5]])  # outside (0, 1), inside T's image (0, 2)
    assert torch.equal(amap(untouched, 1.0, "q0-100"), untouched)
    assert torch.allclose(amap.inverse()(untouched, 1.0, "q0-100"), torch.tensor([[0.75]]))
    assert torch.allclose(amap.inverse()(amap(untouched, 1.0, "all"), 1.0, "all"), untouched)
    half = amap.inverse()(amap(untouched, 0.5, "all"), 0.5, "all")
    assert not torch.allclose(half, untouched)  # 1.5 → 2.25 → 1.6875


def test_support_leaves_values_outside_untouched():
    source = torch.linspace(-1, 1, 101).unsqueeze(1)
    amap = AffineMap(torch.tensor([2.0]), torch.tensor([10.0]), support_bounds(source))
    a = torch.tensor([[-3.0], [-1.0], [0.5], [1.0], [3.0]])
    out = amap(a, 1.0, "q0-100")
    assert torch.equal(out[[0, 4]], a[[0, 4]]), "outside [min, max] of the source: unchanged"
    assert torch.equal(out[[1, 3]], a[[1, 3]]), "on a bound: unchanged (the support is open)"
    assert torch.allclose(out[2], 2 * a[2] + 10), "strictly inside: transported"
    narrow = amap(torch.tensor([[-0.95], [0.0]]), 1.0, "q5-95")
    assert narrow[0, 0] == -0.95 and narrow[1, 0] == 10.0
    assert torch.allclose(amap(a, 1.0, "all"), 2 * a + 10)


def test_unknown_support_is_a_clear_error():
    amap = AffineMap(torch.ones(2), torch.zeros(2), support_bounds(torch.randn(10, 2)))
    with pytest.raises(ActSteerError, match="support 'q2-98'"):
        amap(torch.zeros(1, 2), 1.0, "q2-98")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (torch.randn(1, 3), "at least 2"),
        (torch.randn(0, 3), "at least 2"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "NaN or infinite"),
    ],
)
def test_unusable_samples_are_clear_errors(source, message):
    target = torch.randn(10, source.shape[1])
    with pytest.raises(ActSteerError, match=message):
        check_samples(source, target)
