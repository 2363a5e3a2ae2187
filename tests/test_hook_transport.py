"""The one transport (actsteer.transport), as the steering hooks apply it, equals the map's
reference formula bit for bit on both of its paths (the fused kernel of actsteer.kernels and
plain torch ops), for every layout and strength source it serves."""

from __future__ import annotations

import gc
import shutil
import types
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from actsteer import ActSteerError, Steering, kernels
from actsteer.hooks import SteeringHandle, sees_output_first
from actsteer.maps import AffineMap, support_bounds
from actsteer.sources import ConditionalHalf

PATHS = ["fused", "torch-ops"]


class CountingKernel:
    """The fused kernel, counting the calls it served (so a test knows which path ran) and
    those it declined (returned None for, or handed to the Python hook)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.calls = 0
        self.declined = 0

    def transport(self, *args):
        return self.counted(self.kernel.transport(*args))

    def transport_tokens(self, *args):
        return self.counted(self.kernel.transport_tokens(*args))

    def counted(self, out):
        self.calls += out is not None
        self.declined += out is None
        return out

    def hook(self, *params_and_fallback):
        *params, fallback = params_and_fallback

        def declined(*args):
            self.declined += 1
            return fallback(*args)

        bound = self.kernel.hook(*params, declined)

        def counted(*args):
            before = self.declined
            out = bound(*args)
            self.calls += self.declined == before
            return out

        return counted


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> CountingKernel | None:
    """Run the test with the fused kernel (counting its calls), and again with torch ops."""
    if request.param == "torch-ops":
        monkeypatch.setattr("actsteer.transport.fused_kernel", lambda: None)
        return None
    kernel = kernels.fused_kernel()
    if kernel is None:
        pytest.skip("the fused kernel cannot be built here (no C++ compiler)")
    counting = CountingKernel(kernel)
    monkeypatch.setattr("actsteer.transport.fused_kernel", lambda: counting)
    return counting


def ran_fused(path: CountingKernel | None, before: int = 0) -> bool:
    return path is not None and path.calls > before


def fitted_map(g: torch.Generator, width: int) -> AffineMap:
    """A map with random ω, β and the supports of 200 random source samples."""
    source = torch.randn(200, width, generator=g)
    amap = AffineMap(torch.rand(width, generator=g) + 0.5, torch.randn(width, generator=g))
    amap.bounds = support_bounds(source)
    return amap


class Probe(nn.Module):
    """An identity module whose parameter gives the hook its dtype (as a model layer would)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros((), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def hooked(amap: AffineMap, a: torch.Tensor, strength, support: str) -> torch.Tensor:
    module = Probe(a.dtype)
    steering = Steering({"": amap})
    with torch.inference_mode(), steering.applied(module, strength, support):
        return module(a)


def reference(amap: AffineMap, a: torch.Tensor, strength, support: str) -> torch.Tensor:
    """The map's own formula row by row (AffineMap.__call__), its λ-folded scale, shift and
    bounds rounded to a's dtype for models in another dtype than float32."""
    lams = strength.tolist() if isinstance(strength, torch.Tensor) else [strength] * len(a)
    bounds = amap.support(support)
    rows = []
    for row, lam in zip(a, lams, strict=True):
        scale = (1 + lam * (amap.omega - 1)).to(a.dtype)
        moved = torch.addcmul((lam * amap.beta).to(a.dtype), row, scale)
        if bounds is not None:
            lo, hi = (b.to(a.dtype) for b in bounds)
            moved = torch.where((row > lo) & (row < hi), moved, row)
        rows.append(moved)
    return torch.stack(rows)


def uses_kernel(amap: AffineMap, support: str) -> bool:
    steering = Steering({"": amap})
    hook = SteeringHandle(steering, Probe(), 1.0, support).hooks[""]
    return hook.transport.kernel is not None


def conditional_half(handle: SteeringHandle, a: torch.Tensor) -> torch.Tensor:
    """The hook's transport of a classifier-free-guidance batch [unconditional; conditional]
    at the strength its ConditionalHalf source makes of the handle's λ."""
    hook = handle.hooks[""]
    lam = ConditionalHalf(types.SimpleNamespace(split=True))(hook.lam, a)
    return hook.transport(a, lam)


# the `path` fixture holds for every generated input: one code path per test run
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10_000),
    tokens=st.sampled_from([1, 3, 40]),
    strength=st.floats(0.05, 1.0),
    support=st.sampled_from(["q0-100", "q5-95", "all"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    per_row=st.booleans(),
)
def test_hook_output_equals_the_reference_map(
    path, seed, tokens, strength, support, dtype, per_row
):
    g = torch.Generator().manual_seed(seed)
    amap = fitted_map(g, 256)
    a = torch.randn(8, tokens, 256, generator=g) * 1.5  # some outside the source range
    a[0, 0, :4] = amap.bounds["q0-100"][0][:4]  # exactly on the bounds: outside (open support)
    a[0, 0, 4:8] = amap.bounds["q0-100"][1][4:8]
    a = a.to(dtype)
    lam = torch.linspace(0.1, 1.0, 8) * strength if per_row else strength
    calls = path.calls if path else 0
    out = hooked(amap, a, lam, support)
    assert ran_fused(path, calls) == (path is not None)
    expected = reference(amap, a, lam, support)
    if dtype == torch.float32 and not per_row:
        assert torch.equal(expected, amap(a, strength, support)), "the reference is the map's"
    unmoved = expected == a
    assert torch.equal(out[unmoved], a[unmoved]), "outside the support: unchanged"
    assert torch.equal(out, expected), "inside: the map's own arithmetic, bit for bit"


@pytest.mark.parametrize("spatial", [(4, 4), (1, 1)])
def test_per_channel_map_on_feature_maps(path, spatial):
    """A (B, C, H, W) output: one map per channel, the same arithmetic at every pixel."""
    g = torch.Generator().manual_seed(0)
    amap = fitted_map(g, 16)
    a = torch.randn(3, 16, *spatial, generator=g) * 1.5
    lam = torch.tensor([0.0, 0.5, 1.0])
    out = hooked(amap, a, lam, "q0-100")
    assert ran_fused(path) == (path is not None)
    expected = reference(amap, a.movedim(1, -1), lam, "q0-100").movedim(-1, 1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("shape", [(4, 5, 32), (4, 32, 3, 3)])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("support", ["q0-100", "all"])
def test_conditional_half_of_a_guidance_batch(path, shape, per_row, support):
    """The conditional half only: the first half passes unchanged, the rest is transported
    (with its own λ per row)."""
    g = torch.Generator().manual_seed(1)
    amap = fitted_map(g, 32)
    lam = torch.tensor([0.3, 0.9]) if per_row else 0.7
    handle = SteeringHandle(Steering({"": amap}), Probe(), lam, support)
    a = torch.randn(*shape, generator=g) * 1.5
    with torch.inference_mode():
        out = conditional_half(handle, a)
    assert ran_fused(path) == (path is not None)
    assert torch.equal(out[:2], a[:2])
    units_last = a[2:].movedim(1, -1) if a.ndim == 4 else a[2:]
    expected = reference(amap, units_last, lam, support)
    assert torch.equal(out[2:], expected.movedim(-1, 1) if a.ndim == 4 else expected)


@pytest.mark.parametrize("shape", [(6, 300, 64), (6, 5, 64, 64)])
def test_outputs_split_over_threads_inside_a_row(path, shape):
    """Outputs large enough for the kernel to share among two threads, the second thread's part
    beginning inside a row: each row still gets its own λ, the first half none."""
    g = torch.Generator().manual_seed(12)
    amap = fitted_map(g, shape[1] if len(shape) == 4 else shape[-1])
    lam = torch.tensor([0.2, 0.6, 1.0])
    handle = SteeringHandle(Steering({"": amap}), Probe(), lam, "q0-100")
    a = torch.randn(*shape, generator=g) * 1.5
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            out = conditional_half(handle, a)
    finally:
        torch.set_num_threads(threads)
    assert ran_fused(path) == (path is not None)
    assert torch.equal(out[:3], a[:3])
    units_last = a[3:].movedim(1, -1) if a.ndim == 4 else a[3:]
    expected = reference(amap, units_last, lam, "q0-100")
    assert torch.equal(out[3:], expected.movedim(-1, 1) if a.ndim == 4 else expected)


def test_the_kernel_binds_no_hook_to_parameters_it_cannot_read():
    """Parameters of mixed or integer dtypes, or of sizes that disagree: no kernel hook (the
    Python hook serves instead)."""
    kernel = kernels.fused_kernel()
    if kernel is None:
        pytest.skip("the fused kernel cannot be built here (no C++ compiler)")
    ones, inf = torch.ones(4), torch.full((4,), torch.inf)

    def bind(scale, shift, lo, hi):
        return kernel.hook(scale, shift, lo, hi, 0, False, lambda *args: None)

    assert bind(ones, ones, -inf, inf) is not None
    assert bind(ones, ones.double(), -inf, inf) is None
    assert bind(ones, ones[:3], -inf, inf) is None
    assert bind(*(t.int() for t in (ones, ones, ones, ones))) is None


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_hooks_use_the_fused_kernel_where_a_compiler_exists():
    amap = fitted_map(torch.Generator().manual_seed(2), 8)
    assert uses_kernel(amap, "q0-100")
    assert uses_kernel(amap, "all")


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setenv("ACTSTEER_CACHE", str(tmp_path))
    kernels._built_kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not build the fused steering kernel"):
            assert kernels.fused_kernel() is None
        amap = fitted_map(torch.Generator().manual_seed(4), 8)
        assert not uses_kernel(amap, "q0-100"), "the hook keeps the torch ops"
    finally:
        kernels._built_kernel.cache_clear()


def test_the_kernel_is_opt_in(monkeypatch):
    """Without the cpu-kernel extra (its ninja) the transport runs torch ops and nothing is
    built; ACTSTEER_FUSED_KERNEL=1 opts in all the same."""
    monkeypatch.setattr(kernels, "_extra_installed", lambda: False)
    monkeypatch.delenv("ACTSTEER_FUSED_KERNEL", raising=False)
    assert kernels.fused_kernel() is None
    amap = fitted_map(torch.Generator().manual_seed(3), 8)
    assert not uses_kernel(amap, "q0-100")
    monkeypatch.setenv("ACTSTEER_FUSED_KERNEL", "1")
    if shutil.which("c++") is not None:
        assert kernels.fused_kernel() is not None


def test_the_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("ACTSTEER_FUSED_KERNEL", "0")
    assert kernels.fused_kernel() is None
    amap = fitted_map(torch.Generator().manual_seed(3), 8)
    assert not uses_kernel(amap, "q0-100")


def test_an_output_of_another_width_is_a_clear_error(path):
    amap = fitted_map(torch.Generator().manual_seed(5), 8)
    with pytest.raises(ActSteerError, match="shape \\(2, 3, 16\\) with a map of 8 units"):
        hooked(amap, torch.randn(2, 3, 16), 1.0, "q0-100")


class Marked(torch.Tensor):
    """A tensor subclass (such subclasses may override torch functions)."""


@pytest.mark.parametrize("case", ["non-contiguous", "gradient", "subclass"])
def test_outputs_the_kernel_declines_take_the_torch_ops(path, case):
    """A transposed output, one carrying a gradient, or a tensor subclass: same result through
    torch ops."""
    g = torch.Generator().manual_seed(6)
    amap = fitted_map(g, 16)
    steering = Steering({"": amap})
    a = torch.randn(16, 4, 2, generator=g).transpose(0, 2) * 1.5  # (2, 4, 16), not contiguous
    if case == "gradient":
        a = a.contiguous().requires_grad_()
    if case == "subclass":
        a = a.contiguous().as_subclass(Marked)
    module = Probe()
    with steering.applied(module, 0.8, "q0-100"):
        out = module(a)
    assert not ran_fused(path)
    assert path is None or path.declined >= 1
    assert torch.equal(out.detach(), reference(amap, a.detach(), 0.8, "q0-100"))
    if case == "gradient":
        out.sum().backward()
        moved = reference(amap, a.detach(), 0.8, "q0-100") != a.detach()
        scale = 1 + 0.8 * (amap.omega - 1)
        assert torch.allclose(a.grad, torch.where(moved, scale, torch.ones(()))), "dout/da = ω̃"


def test_one_per_row_strength_on_a_larger_batch_is_a_clear_error(path):
    """A (1,) strength is one λ per row, not a scalar: a batch of 3 rows does not fit it."""
    amap = fitted_map(torch.Generator().manual_seed(7), 8)
    with pytest.raises(ActSteerError, match="per-row strength has 1 values but the batch has 3"):
        hooked(amap, torch.randn(3, 2, 8), torch.tensor([0.5]), "q0-100")


def test_an_output_of_five_dimensions_is_a_clear_error(path):
    """A (B, C, F, H, W) video feature map is no layout the maps know: refused, not guessed."""
    amap = fitted_map(torch.Generator().manual_seed(8), 8)
    with pytest.raises(ActSteerError, match="cannot steer a module output of shape"):
        hooked(amap, torch.randn(2, 3, 4, 5, 8), 1.0, "q0-100")


class KeepingNorm(nn.LayerNorm):
    """A LayerNorm that keeps its last output: not a fresh tensor no one else holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = super().forward(x)
        return self.last


def steered_norm_output(module: nn.Module, amap: AffineMap, x: torch.Tensor, monkeypatch):
    """(norm output as F.layer_norm returned it, the hooked module's output) under steering."""
    returned = []
    layer_norm = torch.nn.functional.layer_norm

    def recording(*args, **kwargs):
        returned.append(layer_norm(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(torch.nn.functional, "layer_norm", recording)
    with torch.no_grad(), Steering({"": amap}).applied(module, 0.8):
        out = module(x)
    return returned[0] if returned else None, out


def test_a_norms_fresh_output_is_transported_in_place(path, monkeypatch):
    """A LayerNorm's own output, seen by no hook before ours: overwritten, not copied (fused
    path), with its version counter bumped as for any in-place op; same values either way."""
    g = torch.Generator().manual_seed(9)
    amap = fitted_map(g, 16)
    norm, x = nn.LayerNorm(16), torch.randn(3, 5, 16, generator=g) * 2
    with torch.no_grad():
        expected = reference(amap, norm(x), 0.8, "q0-100")
    returned, out = steered_norm_output(norm, amap, x, monkeypatch)
    assert torch.equal(out, expected)
    assert (out is returned) == (path is not None)
    assert out._version == (1 if path is not None else 0)


@pytest.mark.parametrize("case", ["hook seen first", "subclass", "identity"])
def test_outputs_others_may_hold_are_never_overwritten(path, case, monkeypatch):
    """Another hook saw the output first, a norm subclass keeps it, or a module returns its
    input: the hook writes a new tensor and leaves theirs as it was."""
    g = torch.Generator().manual_seed(10)
    amap = fitted_map(g, 16)
    x = torch.randn(3, 5, 16, generator=g) * 2
    module = KeepingNorm(16) if case == "subclass" else Probe() if case == "identity" else None
    module = module or nn.LayerNorm(16)
    with torch.no_grad():
        plain = module(x).clone()
    seen = []
    if case == "hook seen first":
        module.register_forward_hook(lambda m, a, o: seen.append(o))
    _, out = steered_norm_output(module, amap, x, monkeypatch)
    assert torch.equal(out, reference(amap, plain, 0.8, "q0-100"))
    held = seen[0] if seen else module.last if case == "subclass" else x
    assert torch.equal(held, plain), "what another holds is unchanged"


def test_the_kernel_hook_is_registered_and_freed_with_the_handle():
    """Where the kernel applies, the module calls the kernel's own hook (no Python frame per
    call); removing the handle frees it and the Python hook it falls back to."""
    if kernels.fused_kernel() is None:
        pytest.skip("the fused kernel cannot be built here (no C++ compiler)")
    amap = fitted_map(torch.Generator().manual_seed(11), 8)
    module = nn.LayerNorm(8)
    handle = SteeringHandle(Steering({"": amap}), module, 1.0, "all")
    registered = next(iter(module._forward_hooks.values()))
    assert registered is handle.forward_hooks[""]
    assert isinstance(registered, types.BuiltinFunctionType)
    fallback = weakref.ref(handle.hooks[""])
    handle.remove()
    del handle, registered
    gc.collect()
    assert fallback() is None, "nothing keeps the hook alive after remove()"


def test_whether_a_hook_sees_the_output_first_reads_torchs_global_hooks():
    """sees_output_first reads torch's private table of global forward hooks (the one private
    torch name the library uses): this fails on a torch that lacks it or stops filling it."""
    module = nn.LayerNorm(4)
    assert sees_output_first(module)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert not sees_output_first(module)
    finally:
        handle.remove()
    module.register_forward_hook(lambda m, a, o: None)
    assert not sees_output_first(module)
