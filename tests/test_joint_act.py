"""joint-act (issue 28 §2): the Gaussian optimal transport map across units in a low-rank
subspace, applied by the one transport, folded exactly where a Linear layer takes it, saved,
inverted, and refused where it cannot go."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

import actsteer
from actsteer import ActSteerError
from actsteer.maps import JointMap, support_bounds
from actsteer.methods import get_method
from actsteer.methods.joint_act import fit_joint, gaussian_monge


def correlated(n: int, dim: int, seed: int, shift: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing + shift


def test_full_rank_is_the_closed_form_gaussian_map():
    source, target = correlated(400, 6, 0, 0.0), correlated(400, 6, 1, 2.0)
    amap = fit_joint(source.float(), target.float(), rank=6, shrink=False)
    ss = np.cov(source.numpy().T, bias=True)
    st = np.cov(target.numpy().T, bias=True)
    root = np.real(sqrtm(ss))
    inverse_root = np.linalg.inv(root)
    a_matrix = inverse_root @ np.real(sqrtm(root @ st @ root)) @ inverse_root
    points = correlated(20, 6, 2, 1.0)
    expected = (points - source.mean(0)).numpy() @ a_matrix.T + target.mean(0).numpy()
    got = amap(points.float(), 1.0, "all").double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the map moves the source's moments onto the target's
    moved = amap(source.float(), 1.0, "all").double()
    np.testing.assert_allclose(moved.mean(0), target.mean(0), atol=1e-4)
    np.testing.assert_allclose(np.cov(moved.numpy().T, bias=True), st, atol=1e-3)


def orthogonal_design(n: int, scales: torch.Tensor, mean: torch.Tensor, seed: int) -> torch.Tensor:
    """Samples whose (biased) sample covariance is exactly diag(scales²)."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, scales.shape[0], generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(raw - raw.mean(0))
    return q * n**0.5 * scales + mean


def test_diagonal_covariances_give_gaussian_act():
    scales_s, scales_t = torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.tensor([2.0, 1.0, 1.5, 0.2])
    source = orthogonal_design(200, scales_s.double(), torch.tensor([0.0, 1, 2, 3]), 0).float()
    target = orthogonal_design(200, scales_t.double(), torch.tensor([1.0, -1, 0, 5]), 1).float()
    joint = fit_joint(source, target, rank=4, shrink=False)
    gaussian = get_method("gaussian-act").fit(source, target)
    a = torch.randn(30, 4) * 3
    torch.testing.assert_close(joint(a, 1.0, "all"), gaussian(a, 1.0, "all"), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gaussian_monge(torch.diag(scales_s**2), torch.diag(scales_t**2)),
                               torch.diag(scales_t / scales_s))  # fmt: skip


def test_low_rank_moves_the_mean_and_leaves_the_complement_alone():
    source, target = correlated(64, 20, 3, 0.0), correlated(64, 20, 4, 0.5)
    amap = fit_joint(source.float(), target.float(), rank=3)
    basis = amap.basis.double()
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64), atol=1e-5)
    torch.testing.assert_close(
        amap(source.mean(0, keepdim=True).float(), 1.0, "all")[0], target.mean(0).float(),
        atol=1e-4, rtol=1e-4,
    )  # fmt: skip
    a = correlated(10, 20, 5, 1.0).float()
    change = (amap(a, 0.6, "all") - a).double()
    off = change - change @ basis @ basis.T
    assert off.abs().max() < 1e-5, "the identity off the subspace"
    assert torch.equal(amap(a, 0.0, "all"), a), "λ = 0 moves nothing"


def test_a_bounded_support_moves_each_unit_only_inside_its_source_range():
    source = correlated(40, 5, 0, 0.0).float()
    amap = fit_joint(source, correlated(40, 5, 1, 1.0).float(), 2)
    amap.bounds = support_bounds(source)
    a = 1.5 * correlated(30, 5, 2, 0.3).float()
    lo, hi = amap.bounds["q0-100"]
    within = (a > lo) & (a < hi)
    assert within.any() and (~within).any()
    bounded, free = amap(a, 0.7, "q0-100"), amap(a, 0.7, "all")
    assert torch.equal(bounded[~within], a[~within]), "units outside their range stay"
    assert torch.equal(bounded[within], free[within]), "units inside move as with 'all'"
    per_token = torch.full((30,), 0.7)
    assert torch.equal(amap(a, per_token, "q0-100"), bounded)
    with pytest.raises(ActSteerError, match="support"):
        amap.transport("q5-95-typo")


@pytest.fixture(scope="module")
def joint_steerings(tiny_llama, tokenizer, neutral, football):
    return {
        modules: actsteer.fit(
            tiny_llama, tokenizer, neutral[:48], football[:48], modules=modules,
            method="joint-act", progress=False,
        )
        for modules in ("post-attn-ln", "attn-out", "residual")
    }  # fmt: skip


def test_hooks_steer_per_row_and_lambda_zero_is_the_plain_model(
    tiny_llama, tokenizer, neutral, joint_steerings
):
    steering = joint_steerings["post-attn-ln"]
    assert steering.default_support == "q0-100"
    ids = tokenizer(neutral[60:62], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        plain = tiny_llama(ids).logits
        with steering.applied(tiny_llama, 0.0):
            zero = tiny_llama(ids).logits
        with steering.applied(tiny_llama, torch.tensor([1.0, 0.0])):
            rows = tiny_llama(ids).logits
        with steering.applied(tiny_llama, 1.0):
            full = tiny_llama(ids).logits
    assert torch.equal(zero, plain)
    assert (full - plain).abs().max() > 1e-3
    torch.testing.assert_close(rows[0], full[0])
    torch.testing.assert_close(rows[1], plain[1])


@pytest.mark.parametrize("modules", ["post-attn-ln", "attn-out"])
def test_folding_matches_the_hooks(tiny_llama, tokenizer, neutral, joint_steerings, modules):
    steering = joint_steerings[modules]
    ids = tokenizer(neutral[70:72], return_tensors="pt", padding=True).input_ids
    with torch.no_grad(), steering.applied(tiny_llama, 0.8, "all"):
        hooked = tiny_llama(ids).logits
    folded = steering.fold(copy.deepcopy(tiny_llama), 0.8, "all")
    with torch.no_grad():
        got = folded(ids).logits
    torch.testing.assert_close(got, hooked, rtol=1e-4, atol=1e-4)


def test_folding_a_block_output_and_exporting_a_control_vector_are_refused(
    tiny_llama, joint_steerings, tmp_path
):
    with pytest.raises(ActSteerError, match="cannot fold the joint map of 'model.layers.0'"):
        joint_steerings["residual"].fold(copy.deepcopy(tiny_llama), 1.0, "all")
    from actsteer.gguf_vectors import write_control_vector

    with pytest.raises(ActSteerError, match="control vector needs affine maps.*joint"):
        write_control_vector(
            joint_steerings["residual"].maps, tiny_llama, tmp_path / "v.gguf", 1.0, "all"
        )


def test_save_load_and_inverse(tmp_path, tiny_llama, tokenizer, neutral, joint_steerings):
    steering = joint_steerings["attn-out"]
    loaded = actsteer.Steering.load(steering.save(tmp_path / "j.safetensors"))
    assert loaded.digest() == steering.digest()
    for name, amap in steering.maps.items():
        assert isinstance(loaded.maps[name], JointMap)
        assert torch.equal(loaded.maps[name].core, amap.core)
    amap = next(iter(steering.maps.values()))
    a = torch.randn(12, amap.dim)
    torch.testing.assert_close(amap.inverse()(amap(a, 1.0), 1.0), a, atol=1e-4, rtol=1e-4)
    ids = tokenizer(neutral[80:81], return_tensors="pt").input_ids
    with torch.no_grad():
        plain = tiny_llama(ids).logits
        with (
            steering.applied(tiny_llama, 1.0, "all"),
            steering.inverse().applied(tiny_llama, 1.0, "all"),
        ):
            both = tiny_llama(ids).logits
    torch.testing.assert_close(both, plain, atol=1e-3, rtol=1e-3)
