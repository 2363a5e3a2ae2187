"""The steering hook's transport on tensors of every size equals the map's reference formula."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actsteer import Steering
from actsteer.maps import AffineMap, support_bounds


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    tokens=st.sampled_from([1, 3, 40]),
    strength=st.floats(0.05, 1.0),
    support=st.sampled_from(["q0-100", "q5-95", "all"]),
)
def test_hook_output_equals_the_reference_map(seed, tokens, strength, support):
    g = torch.Generator().manual_seed(seed)
    width = 256
    source = torch.randn(200, width, generator=g)
    amap = AffineMap(torch.rand(width, generator=g) + 0.5, torch.randn(width, generator=g))
    amap.bounds = support_bounds(source)
    module = nn.Identity()
    steering = Steering({"": amap}, {"method": "linear-act"})
    a = torch.randn(8, tokens, width, generator=g) * 1.5  # some outside the source range
    a[0, 0, :4] = amap.bounds["q0-100"][0][:4]  # exactly on the bounds: inside
    a[0, 0, 4:8] = amap.bounds["q0-100"][1][4:8]
    with torch.inference_mode(), steering.applied(module, strength, support):
        hooked = module(a)
    expected = amap(a, strength, support)
    unmoved = expected == a
    assert torch.equal(hooked[unmoved], a[unmoved]), "outside the support: unchanged"
    assert torch.equal(hooked, expected), "inside: the map's own arithmetic, bit for bit"
