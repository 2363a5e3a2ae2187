"""Per-request steering inside a compiled graph (actsteer.integrations.slots): on a flattened
batch, the traced table hook equals each request's steerings applied in its order through the
one transport and the token gate, eager and under torch.compile, and new strengths, mixes and
token counts compile nothing."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actsteer.gates import Gate, GateSettings
from actsteer.integrations.batch import request_slots, token_strengths
from actsteer.integrations.slots import PREFIX, TableSteering, TokenSlots
from actsteer.sources import Gated
from actsteer.transport import Transport

UNITS, CAPACITY = 6, 64
NAMES = ("wide", "bounded", "gated")
IDS = {name: number for number, name in enumerate(NAMES, start=1)}


def steerings() -> dict[str, tuple[Transport, tuple[Gate, GateSettings] | None]]:
    """Three maps of one module: unbounded, bounded (only part of the units' range moves) and
    unbounded with a token gate."""
    generator = torch.Generator().manual_seed(0)

    def affine() -> tuple[torch.Tensor, torch.Tensor]:
        omega = torch.rand(UNITS, generator=generator) + 0.5
        return omega, torch.randn(UNITS, generator=generator)

    bounds = (torch.full((UNITS,), -0.5), torch.full((UNITS,), 0.8))
    gate = Gate(torch.randn(UNITS, generator=generator), torch.tensor(0.3))
    return {
        "wide": (Transport(*affine()), None),
        "bounded": (Transport(*affine(), bounds), None),
        "gated": (Transport(*affine()), (gate, GateSettings("token", 0.2, 0.5))),
    }


def steered_layer(served: dict) -> tuple[nn.Module, TokenSlots]:
    """A linear layer of UNITS outputs carrying the table hook of `served`."""
    torch.manual_seed(1)
    layer = nn.Linear(UNITS, UNITS)
    slots = TokenSlots(len(NAMES), CAPACITY, torch.device("cpu"))
    maps = {IDS[name]: value for name, value in served.items()}
    layer.register_forward_hook(
        TableSteering(layer, maps, len(NAMES), slots, torch.float32, stream=False)
    )
    return layer, slots


def plain(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output without its hooks."""
    with torch.no_grad():
        return nn.functional.linear(x, layer.weight, layer.bias)


def by_hand(served, layer, x, requests, boundaries):
    """Each request's rows through its steerings in order: Transport at λ (times the token
    gate, actsteer.sources.Gated) — what the eager plugin computes."""
    out = plain(layer, x)
    for index, spec in requests.items():
        rows = slice(int(boundaries[index]), int(boundaries[index + 1]))
        a = out[rows]
        for name, lam in spec:
            transport, gate = served[name]
            strength = torch.tensor(float(lam))
            if gate is not None:
                strength = Gated(gate[0], gate[1], None)(strength, a)
            a = transport(a, strength)
        out[rows] = a
    return out


specs = st.lists(
    st.lists(
        st.tuples(st.sampled_from(NAMES), st.floats(-1, 1)), max_size=3, unique_by=lambda p: p[0]
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=40, deadline=None)
@given(specs, st.data())
def test_the_table_hook_is_each_requests_steerings_in_its_order(batch, data):
    served = steerings()
    layer, slots = steered_layer(served)
    lengths = [data.draw(st.integers(1, 6)) for _ in batch]
    boundaries = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    requests = {i: tuple(spec) for i, spec in enumerate(batch)}
    x = torch.randn(int(boundaries[-1]) + 2, UNITS)  # two padding tokens past the last request
    slots.fill(*request_slots(requests, len(batch), IDS), boundaries)
    with torch.no_grad():
        found = layer(x)
    expected = by_hand(served, layer, x, requests, boundaries)
    torch.testing.assert_close(found, expected, rtol=1e-6, atol=1e-6)


def test_unsteered_tokens_and_zero_strength_are_bit_identical():
    served = steerings()
    layer, slots = steered_layer(served)
    x = torch.randn(9, UNITS)
    with torch.no_grad():
        unsteered = plain(layer, x)
        requests = {0: (), 1: (("wide", 0.0), ("gated", 0.0)), 2: (("bounded", 0.0),)}
        slots.fill(*request_slots(requests, 3, IDS), torch.tensor([0, 3, 6, 9]))
        assert torch.equal(layer(x), unsteered)
        slots.fill(*request_slots({0: (("wide", 1.0),)}, 1, IDS), None)  # no boundaries
        assert torch.equal(layer(x), unsteered)


def test_only_the_modules_steerings_have_rows_and_the_buffers_are_the_slots():
    served = steerings()
    layer, slots = steered_layer({"gated": served["gated"]})
    local = getattr(layer, PREFIX + "local")
    assert local.tolist() == [0, 0, 0, 1]  # none, wide, bounded → identity; gated → row 1
    assert getattr(layer, PREFIX + "slot_ids") is slots.ids
    assert getattr(layer, PREFIX + "slot_lams") is slots.lams
    x = torch.randn(4, UNITS)
    slots.fill(*request_slots({0: (("wide", 1.0),)}, 1, IDS), torch.tensor([0, 4]))
    with torch.no_grad():
        assert torch.equal(layer(x), plain(layer, x))


def test_fill_spreads_requests_over_tokens_like_the_eager_batch():
    requests = {0: (("wide", 0.5),), 2: (("gated", 1.0), ("wide", -0.25))}
    steering, strength = request_slots(requests, 3, IDS)
    boundaries = torch.tensor([0, 2, 5, 7])
    slots = TokenSlots(len(NAMES), 10, torch.device("cpu"))
    slots.fill(steering, strength, boundaries)
    assert slots.ids[0].tolist() == [1, 1, 0, 0, 0, 3, 3, 0, 0, 0]
    assert slots.ids[1].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert torch.equal(slots.lams[0], token_strengths(strength[0], boundaries, 10))
    assert slots.lams[1].tolist() == [0, 0, 0, 0, 0, -0.25, -0.25, 0, 0, 0]


def test_compiled_it_matches_eager_and_new_strengths_mixes_and_sizes_compile_nothing():
    served = steerings()
    layer, slots = steered_layer(served)
    torch._dynamo.reset()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    rounds = [
        ({0: (("wide", 1.0),), 1: ()}, [0, 3, 7]),
        ({0: (("gated", 0.5), ("bounded", 1.0)), 1: (("wide", -0.5),), 2: ()}, [0, 2, 5, 11]),
        ({0: (("bounded", 0.3), ("gated", 1.0), ("wide", 0.2))}, [0, 5]),
        ({0: (), 1: ()}, [0, 4, 9]),
    ]
    with torch.no_grad():
        for index, (requests, bounds) in enumerate(rounds):
            boundaries = torch.tensor(bounds)
            x = torch.randn(bounds[-1] + 1, UNITS)
            slots.fill(*request_slots(requests, len(requests), IDS), boundaries)
            expected = by_hand(served, layer, x, requests, boundaries)
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
            if index == 0:
                frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
