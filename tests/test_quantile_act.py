"""quantile-act (issue 28 §1): the exact 1-D optimal transport map per unit through matched
quantiles, applied by the one transport, saved, gated, and refused where only affine maps go."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import actsteer
from actsteer import ActSteerError
from actsteer.maps import AffineMap, QuantileMap
from actsteer.methods import get_method
from actsteer.methods.quantile_act import fit_quantile

MODULES = "post-attn-ln"


@pytest.mark.parametrize(("levels", "quantiles"), [("extremes", (0, 1)), ("centres", (0.25, 0.75))])
def test_two_knots_are_the_affine_map_through_the_two_quantiles(levels, quantiles):
    torch.manual_seed(0)
    source, target = torch.randn(300, 5), 3 * torch.rand(300, 5) - 1
    amap = fit_quantile(source, target, knots=2, prior=0.0, levels=levels)
    at = torch.tensor(quantiles, dtype=torch.float32)
    (lo, hi), (low, high) = (torch.quantile(s, at, dim=0) for s in (source, target))
    omega = (high - low) / (hi - lo)
    line = AffineMap(omega, low - omega * lo)
    a = 4 * torch.randn(50, 5)  # beyond the knots too: the one segment extends
    for lam in (0.0, 0.3, 1.0):
        torch.testing.assert_close(amap(a, lam, "all"), line(a, lam, "all"), rtol=1e-5, atol=1e-5)


def test_recovers_a_known_monotone_map_between_one_dimensional_samples():
    torch.manual_seed(0)
    source = torch.randn(20000, 1)
    target = source**3 + source  # T(a) = a³ + a, monotone
    amap = fit_quantile(source, target, knots=64, prior=0.0)
    a = torch.linspace(-1.5, 1.5, 101).unsqueeze(1)
    error = (amap(a, 1.0, "all") - (a**3 + a)).abs().max()
    assert error < 0.03, f"max error {error:.3f} inside the source's bulk"
    line = get_method("linear-act").fit(source, target)
    assert (line(a, 1.0, "all") - (a**3 + a)).abs().max() > 1.0, "an affine map cannot"


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    samples=st.integers(2, 60),
    knots=st.integers(2, 40),
    prior=st.sampled_from([0.0, 8.0, 100.0]),
    lam=st.floats(0, 1),
)
def test_never_reorders_a_units_activations(seed, samples, knots, prior, lam):
    """Under support "all" (a bounded support leaves the activations outside it alone, so
    there it is monotone inside the support only, as an affine map is)."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(samples, 3, generator=generator) * torch.tensor([1.0, 5.0, 0.01])
    target = torch.randn(samples + 3, 3, generator=generator).exp()
    amap = fit_quantile(source, target, knots=knots, prior=prior)
    assert (amap.y[:, 1:] >= amap.y[:, :-1]).all()
    a = torch.cat([source, 8 * torch.randn(200, 3, generator=generator)]).sort(dim=0).values
    moved = amap(a, lam, "all")
    # float32 rounding of neighbouring segments' lines may differ by an ulp where they meet
    slack = 4 * torch.finfo(torch.float32).eps * (moved.abs() + 1)
    assert (moved[1:] >= moved[:-1] - slack[1:]).all()


def test_knots_are_the_matched_quantiles_shrunk_toward_the_affine_fit():
    torch.manual_seed(1)
    source, target = torch.randn(40, 4), 2 * torch.randn(40, 4) + 1
    plain = fit_quantile(source, target, knots=8, prior=0.0, levels="centres")
    levels = (torch.arange(8, dtype=torch.float64) + 0.5) / 8  # the centres of 8 equal shares
    expected_x = torch.quantile(source.double(), levels, dim=0).t().float()
    torch.testing.assert_close(plain.x, expected_x)
    shrunk = fit_quantile(
        source, target, knots=8, prior=40.0, levels="centres"
    )  # α = 40 / (40 + 40)
    omega, beta = get_method("linear-act").fit(source, target).line()
    affine_y = omega[:, None] * plain.x + beta[:, None]
    torch.testing.assert_close(shrunk.y, 0.5 * plain.y + 0.5 * affine_y, rtol=1e-5, atol=1e-5)


def test_a_map_with_falling_knots_is_refused():
    with pytest.raises(ActSteerError, match="non-decreasing"):
        QuantileMap(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ActSteerError, match="one shape"):
        QuantileMap(torch.zeros(3, 4), torch.zeros(3, 5))


def test_channels_on_axis_one_are_units_and_every_strength_shape_fits():
    torch.manual_seed(2)
    amap = fit_quantile(torch.randn(100, 3), torch.randn(100, 3).exp(), knots=8)
    transport = amap.transport()
    image = torch.randn(2, 3, 4, 4)
    lam = torch.tensor([1.0, 0.25])
    units_last = image.movedim(1, -1)
    want = torch.stack([transport(units_last[i].reshape(-1, 3), lam[i]) for i in range(2)])
    got = transport(image, lam).movedim(1, -1).reshape(2, -1, 3)
    torch.testing.assert_close(got, want)
    tokens = torch.randn(2, 5, 3)
    per_token = torch.rand(2, 5)
    by_hand = torch.stack(
        [transport(tokens[i, j : j + 1], per_token[i, j])[0] for i in range(2) for j in range(5)]
    )
    torch.testing.assert_close(transport(tokens, per_token).reshape(10, 3), by_hand)


@pytest.fixture(scope="module")
def quantile_steering(tiny_llama, tokenizer, neutral, football):
    return actsteer.fit(
        tiny_llama, tokenizer, neutral[:40], football[:40], modules=MODULES,
        method="quantile-act", progress=False,
    )  # fmt: skip


def test_hooks_apply_the_map_and_lambda_zero_is_the_plain_model(
    tiny_llama, tokenizer, neutral, quantile_steering
):
    ids = tokenizer(neutral[60:62], return_tensors="pt", padding=True).input_ids
    name = quantile_steering.modules[1]
    module = dict(tiny_llama.named_modules())[name]
    seen = []
    with torch.no_grad():
        handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
        plain = tiny_llama(ids).logits
        handle.remove()
        with quantile_steering.applied(tiny_llama, 0.0):
            zero = tiny_llama(ids).logits
        with quantile_steering.applied(tiny_llama, 0.7):
            handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
            steered = tiny_llama(ids).logits
            handle.remove()
    assert torch.equal(zero, plain), "λ = 0 is the plain model bit for bit"
    assert (steered - plain).abs().max() > 1e-3
    # the module's own output is steered after the upstream maps moved its input
    unhooked, hooked = seen
    assert not torch.equal(unhooked, hooked)
    amap = quantile_steering.maps[name]
    assert isinstance(amap, QuantileMap)


def test_gated_strength_is_lambda_times_gate(tiny_llama, tokenizer, neutral, football):
    steering = actsteer.fit(
        tiny_llama, tokenizer, neutral[:40], football[:40],
        modules="model.layers.1.post_attention_layernorm", method="quantile-act", gate="token",
        progress=False,
    )  # fmt: skip
    name = steering.modules[0]
    module = dict(tiny_llama.named_modules())[name]
    outputs = []
    ids = tokenizer(football[50:51], return_tensors="pt").input_ids
    with torch.no_grad():
        handle = module.register_forward_hook(lambda m, a, out: outputs.append(out))
        tiny_llama(ids)
        handle.remove()
        with steering.applied(tiny_llama, 0.8) as steered:
            handle = module.register_forward_hook(lambda m, a, out: outputs.append(out))
            tiny_llama(ids)
            handle.remove()
            gate = next(iter(steered.gates.values())).last
    plain, got = outputs
    by_hand = steering.maps[name].transport(steering.default_support)(plain, 0.8 * gate)
    torch.testing.assert_close(got, by_hand)
    assert 0 < float(gate.min()) < float(gate.max()) < 1


def test_save_and_load_keep_the_knots_and_affine_files_keep_their_format(
    tmp_path, quantile_steering, tiny_llama, tokenizer, neutral, football
):
    path = quantile_steering.save(tmp_path / "q.safetensors")
    loaded = actsteer.Steering.load(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()["actsteer"]
    assert '"format_version": 3' in header
    for name, amap in quantile_steering.maps.items():
        assert isinstance(loaded.maps[name], QuantileMap)
        assert torch.equal(loaded.maps[name].x, amap.x)
        assert torch.equal(loaded.maps[name].y, amap.y)
    assert loaded.digest() == quantile_steering.digest()
    affine = actsteer.fit(
        tiny_llama, tokenizer, neutral[:40], football[:40], modules=MODULES, progress=False
    )
    with safe_open(str(affine.save(tmp_path / "a.safetensors")), framework="pt") as f:
        assert '"format_version": 1' in f.metadata()["actsteer"]


def test_folding_and_control_vectors_refuse_it_saying_why(tiny_llama, quantile_steering, tmp_path):
    with pytest.raises(ActSteerError, match="folding into weights needs an affine map.*quantile"):
        quantile_steering.fold(copy.deepcopy(tiny_llama), 1.0, support="all")
    from actsteer.gguf_vectors import write_control_vector

    with pytest.raises(ActSteerError, match="control vector needs affine maps"):
        write_control_vector(quantile_steering.maps, tiny_llama, tmp_path / "v.gguf", 1.0, "all")
    assert not (tmp_path / "v.gguf").exists()


def test_inverse_undoes_it_and_composition_applies_both(
    tiny_llama, tokenizer, neutral, quantile_steering
):
    name = quantile_steering.modules[0]
    amap = quantile_steering.maps[name]
    a = torch.randn(30, amap.dim)
    back = amap.inverse()(amap(a, 1.0, "all"), 1.0, "all")
    torch.testing.assert_close(back, a, rtol=1e-4, atol=1e-4)
    ids = tokenizer(neutral[70:71], return_tensors="pt").input_ids
    inverse = quantile_steering.inverse()
    with torch.no_grad():
        plain = tiny_llama(ids).logits
        with (
            quantile_steering.applied(tiny_llama, 1.0, "all"),
            inverse.applied(tiny_llama, 1.0, "all"),
        ):
            both = tiny_llama(ids).logits
    torch.testing.assert_close(both, plain, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("support", ["q0-100", "all"])
def test_the_fused_kernel_computes_the_torch_ops_bit_for_bit(dtype, support):
    from actsteer.kernels import fused_kernel

    if fused_kernel() is None:
        pytest.skip("the fused kernel is not built here (no compiler, or not opted into)")
    torch.manual_seed(3)
    source = torch.randn(64, 40) * torch.linspace(0.1, 5, 40)
    amap = get_method("quantile-act").fit(source, torch.randn(64, 40).exp())
    fused, ops = amap.transport(support), amap.transport(support, fused=False)
    assert fused.fused is not None and ops.fused is None
    for shape, lam in (
        ((8, 40), torch.tensor(0.7)),
        ((3, 50, 40), torch.rand(3)),
        ((3, 50, 40), torch.rand(3, 50)),
        ((2000, 40), torch.tensor(1.0)),  # shared among threads
    ):
        a = (torch.randn(*shape) * 4).to(dtype)
        assert torch.equal(fused(a, lam), ops(a, lam)), (shape, dtype)


def test_with_the_kernel_the_hooks_are_its_bound_hooks_and_steer_as_torch_ops_do(
    monkeypatch, tiny_llama, tokenizer, neutral, quantile_steering
):
    from actsteer.hooks import ModuleHook
    from actsteer.kernels import fused_kernel

    if fused_kernel() is None:
        pytest.skip("the fused kernel is not built here")
    ids = tokenizer(neutral[60:63], return_tensors="pt", padding=True).input_ids
    logits = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("ACTSTEER_FUSED_KERNEL", switch)
        for lam in (torch.tensor(0.8), torch.tensor([0.2, 1.0, 0.5])):
            with torch.no_grad(), quantile_steering.applied(tiny_llama, lam) as handle:
                logits[switch, lam.ndim] = tiny_llama(ids).logits
                bound = [not isinstance(h, ModuleHook) for h in handle.forward_hooks.values()]
            assert all(bound) == (switch == "1"), "the kernel's own hooks where it serves"
    for rows in (0, 1):
        assert torch.equal(logits["1", rows], logits["0", rows])
