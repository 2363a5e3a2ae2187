"""Per-request steering of a flattened batch (actsteer.integrations.batch), without vLLM:
request specs, stages in each request's own order, λ per token from request boundaries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actsteer import ActSteerError, Steering, SteeringInfo
from actsteer.integrations.batch import (
    BatchSteering,
    build_stages,
    load_table,
    parse_request,
    parse_table,
    token_strengths,
)
from actsteer.maps import AffineMap


def steering(method: str, seed: int, bounded: bool = False) -> Steering:
    g = torch.Generator().manual_seed(seed)
    omega, beta = 1 + 0.5 * torch.randn(4, generator=g), torch.randn(4, generator=g)
    bounds = {"q0-100": (-torch.ones(4), torch.ones(4))} if bounded else {}
    return Steering({"m": AffineMap(omega, beta, bounds)}, SteeringInfo(method=method))


@pytest.fixture
def served():
    return {"detox": steering("linear-act", 0), "push": steering("actadd", 1)}


def test_a_request_names_steerings_in_order_as_an_object_or_a_string(served):
    assert parse_request({"push": 3, "detox": 0.5}, served) == (("push", 3.0), ("detox", 0.5))
    assert parse_request("detox=0.25, push=-2", served) == (("detox", 0.25), ("push", -2.0))
    assert parse_request("detox", served) == (("detox", 1.0),)  # the default strength
    assert parse_request({}, served) == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"nope": 1}, r"unknown steering 'nope'; this engine serves: detox, push"),
        ({"detox": 1.5}, r"steering 'detox': .*\[0(\.0)?, 1(\.0)?\]"),
        ("detox=abc", r"strength of steering 'detox' must be a number, got 'abc'"),
        ({"detox": True}, r"must be a number"),
        ({"detox": float("nan")}, r"must be finite"),
        ("detox=1,detox=0", r"asked for twice"),
        (0.5, r'extra_args\["actsteer"\] must be an object'),
    ],
)
def test_a_bad_request_is_a_clear_error(served, value, message):
    with pytest.raises(ActSteerError, match=message):
        parse_request(value, served)


def test_no_steering_served_says_how_to_serve_one():
    with pytest.raises(ActSteerError, match=r"none \(set ACTSTEER_VLLM_STEERINGS"):
        parse_request({"detox": 1}, {})


def test_the_table_names_files(tmp_path, served):
    served["detox"].save(tmp_path / "d.safetensors")
    path = tmp_path / "d.safetensors"
    assert parse_table(f"a={path}, b = x ,") == {"a": path, "b": Path("x")}
    assert list(load_table(f"detox={tmp_path}/d.safetensors")) == ["detox"]
    with pytest.raises(ActSteerError, match="is not name=path"):
        parse_table("detox")
    with pytest.raises(ActSteerError, match="twice"):
        parse_table("a=x,a=y")
    with pytest.raises(ActSteerError, match="no file"):
        load_table(f"a={tmp_path}/missing.safetensors")


def test_stages_follow_each_requests_own_order_and_drop_zero_strengths():
    requests = {0: (("a", 1.0), ("b", 0.5)), 2: (("b", 0.25), ("a", 0.75)), 3: (("a", 0.0),)}
    stages = build_stages(requests, 4)
    names = [name for name, _ in stages]
    # rank 0: a for request 0, b for request 2; rank 1: b for request 0, a for request 2
    assert sorted(names[:2]) == ["a", "b"] and sorted(names[2:]) == ["a", "b"]
    lam = {(i // 2, name): v.tolist() for i, (name, v) in enumerate(stages)}
    assert lam[(0, "a")] == [1.0, 0, 0, 0] and lam[(0, "b")] == [0, 0, 0.25, 0]
    assert lam[(1, "b")] == [0.5, 0, 0, 0] and lam[(1, "a")] == [0, 0, 0.75, 0]
    assert build_stages({1: (("a", 0.0),)}, 2) == []


def test_token_strengths_follow_request_boundaries_and_padding_gets_zero():
    lam = torch.tensor([0.5, 0.0, 1.0])
    boundaries = torch.tensor([0, 3, 4, 6])  # a prefill of 3, a decode, a chunk of 2
    assert token_strengths(lam, boundaries, 8).tolist() == [0.5] * 3 + [0.0] + [1.0] * 2 + [0, 0]


def test_per_token_stages_equal_each_request_steered_alone(served):
    """Tokens of a flattened batch steered by stages = each request's rows steered by its
    steerings in its order (AffineMap applied one after the other), untouched where none."""
    support = {"detox": "q0-100", "push": "all"}
    served["detox"] = steering("linear-act", 0, bounded=True)
    batch = BatchSteering(served)
    batch.requests = {
        0: (("detox", 1.0), ("push", 2.0)),
        1: (),
        2: (("push", -1.0), ("detox", 0.5)),
    }
    batch.set_batch(3)
    boundaries = torch.tensor([0, 2, 5, 6])
    a = torch.randn(7, 4)  # the last token is padding
    batch.begin_pass(boundaries)
    steered = a.clone()
    for name, lam in batch.token_stages(7):
        steered = served[name].maps["m"].transport(support[name])(steered, lam)
    expected = a.clone()
    for index, spec in batch.requests.items():
        rows = slice(int(boundaries[index]), int(boundaries[index + 1]))
        for name, strength in spec:
            expected[rows] = served[name].maps["m"](expected[rows], strength, support[name])
    assert torch.equal(steered, expected)
    assert torch.equal(steered[2:5], a[2:5]) and torch.equal(steered[6], a[6])
    assert batch.token_stages(7) is batch.token_stages(7)  # built once per pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("support", ["q0-100", "all"])
def test_transport_on_the_fused_kernel_equals_the_plain_path(dtype, support, monkeypatch):
    """The one-pass kernel the vLLM hooks run on CPU gives the torch ops' result bit for bit
    (inside and outside the support, per-token λ, a padding token at λ = 0), and where the
    bounds are exact in the dtype, AffineMap's own."""
    from actsteer import kernels

    kernel = kernels.fused_kernel()
    if kernel is None:
        pytest.skip("the fused kernel cannot be built here (no C++ compiler)")
    calls = []

    class Counting:
        def __getattr__(self, name):  # the kernel's other entries, uncounted
            return getattr(kernel, name)

        def transport_tokens(self, *args):
            calls.append(args[-1].shape)
            return kernel.transport_tokens(*args)

    monkeypatch.setattr("actsteer.transport.fused_kernel", lambda: Counting())
    amap = steering("linear-act", 3, bounded=True).maps["m"]
    a = (2 * torch.randn(9, 4, generator=torch.Generator().manual_seed(4))).to(dtype)
    lam = torch.tensor([0.25, 0.5, 0.5, 1.0, 1.0, 1.0, -0.5, 2.0, 0.0])
    fused = amap.transport(support)(a, lam)
    assert calls == [(9, 4)]  # the kernel did the work
    plain = amap.transport(support, fused=False)(a, lam)
    assert fused.dtype == dtype and torch.equal(fused, plain)
    if dtype in (torch.float32, torch.float64):  # bounds exact in the dtype: AffineMap's own
        for row in range(9):
            assert torch.equal(fused[row], amap(a[row : row + 1], float(lam[row]), support)[0])
    assert torch.equal(fused[-1], a[-1]) and not torch.equal(fused, a)
    if support == "q0-100":
        outside = (a.float() < -1) | (a.float() > 1)
        assert outside.any() and torch.equal(fused[outside], a[outside])


def test_transport_declined_by_the_kernel_takes_the_plain_path():
    """A tensor the kernel does not take (not contiguous) is steered by the torch ops, the same
    way."""
    amap = steering("linear-act", 5, bounded=True).maps["m"]
    wide = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))
    a, lam = wide[:, ::2], torch.tensor([1.0, 0.5, 0.0, 2.0])
    assert not a.is_contiguous()
    steered = amap.transport("q0-100")(a, lam)
    assert torch.equal(steered, amap.transport("q0-100")(a.contiguous(), lam))
    assert torch.equal(steered, amap.transport("q0-100", fused=False)(a, lam))
