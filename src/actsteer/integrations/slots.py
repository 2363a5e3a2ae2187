"""Per-request steering inside a compiled graph: persistent per-token slots, stacked tables.

An engine that compiles its forward (torch.compile, CUDA graphs) runs one graph for every
batch, so the graph cannot branch on which request wants what. Instead each steered module
holds its maps stacked in a table (row 0 the identity), and the engine keeps one persistent
buffer pair per *slot* k (a request's k-th steering): the steering id and λ of every token.
Once per step, before the forward, `TokenSlots.fill` writes them in place from the requests'
specs and the step's request boundaries; the graph reads them (`TableSteering`, a forward hook
traced into the graph) and computes, for k = 0 … K−1,

    row = local[id_k]        (this module's row of that steering; 0 where it does not steer it)
    λ'  = λ_k · g            (g = σ(w_row · a + b_row) for a gated row, else 1)
    a   ← ω̃ ⊙ a + λ'β_row   where lo_row < a < hi_row,  ω̃ = 1 + λ'(ω_row − 1)

through the one transport's own functions (actsteer.transport's `coefficients` and
`transport_ops`; the gate's logit folded as actsteer.gates.folded), one row per token.
Unsteered tokens read row 0 (ω̃ = 1, λ'β = 0): a is passed through unchanged. Changing λ, the
batch's mix of requests or how many there are writes buffers and never changes the graph.
Knows no engine.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from actsteer.gates import Gate, GateSettings, folded
from actsteer.transport import Transport, coefficients, transport_ops
from actsteer.tree import output_tensor, with_output

#: The prefix of the buffers registered on a steered module, and their names.
PREFIX = "actsteer_"
BUFFERS = (
    "local", "om1", "beta", "lo", "hi", "gate_weight", "gate_bias", "gated", "slot_ids",
    "slot_lams",
)  # fmt: skip


class TokenSlots:
    """The persistent per-token buffers: `ids` (slots, capacity) long, `lams` (slots, capacity)
    float32, on the model's device. Their storage never changes; `fill` rewrites them."""

    def __init__(self, slots: int, capacity: int, device: torch.device) -> None:
        self.ids = torch.zeros(slots, capacity, dtype=torch.long, device=device)
        self.lams = torch.zeros(slots, capacity, device=device)
        self.positions = torch.arange(capacity, device=device)

    def fill(
        self, steering: torch.Tensor, strength: torch.Tensor, query_start_loc: torch.Tensor | None
    ) -> None:
        """Spread per-request slots over this step's tokens: request r owns tokens
        query_start_loc[r] to query_start_loc[r + 1]; every other token (padding, or all of
        them when `query_start_loc` is None) gets id 0 and λ 0."""
        if query_start_loc is None or steering.shape[1] == 0:
            self.ids.zero_()
            self.lams.zero_()
            return
        device = self.ids.device
        ends = query_start_loc[1 : steering.shape[1] + 1].to(device, torch.long)
        owner = torch.searchsorted(ends, self.positions, right=True)  # past the end: size
        pad = (steering.shape[0], 1)
        self.ids.copy_(torch.cat([steering, steering.new_zeros(pad)], 1).to(device)[:, owner])
        self.lams.copy_(torch.cat([strength, strength.new_zeros(pad)], 1).to(device)[:, owner])


class TableSteering:
    """Forward hook of one module for traced execution: every slot's row of the module's
    stacked tables at the slot's per-token λ (see the module docstring). The tables and the
    slots are buffers registered on the module (names starting with PREFIX), so a compiler
    lifts them as graph inputs like the weights, and in-place updates are seen.

    maps: steering id → (transport, token gate or None) of the steerings that steer this
    module. stream: the module is a decoder block, whose (hidden, residual) sum is steered.
    """

    def __init__(
        self,
        module: nn.Module,
        maps: Mapping[int, tuple[Transport, tuple[Gate, GateSettings] | None]],
        steerings: int,
        slots: TokenSlots,
        dtype: torch.dtype,
        stream: bool,
    ) -> None:
        device = slots.ids.device
        units = next(iter(maps.values()))[0].units
        rows = len(maps) + 1
        local = torch.zeros(steerings + 1, dtype=torch.long)
        om1, beta = torch.zeros(rows, units), torch.zeros(rows, units)
        lo = torch.full((rows, units), -torch.inf, dtype=dtype)
        hi = torch.full((rows, units), torch.inf, dtype=dtype)
        weight, bias = torch.zeros(rows, units), torch.zeros(rows)
        gated = torch.zeros(rows, dtype=torch.bool)
        for row, (steering_id, (transport, gate)) in enumerate(sorted(maps.items()), start=1):
            local[steering_id] = row
            om1[row], beta[row] = transport.omega_minus_one, transport.beta
            if transport.bounds is not None:
                lo[row], hi[row] = (b.to(dtype) for b in transport.bounds)
            if gate is not None:
                weight[row], bias[row] = folded(*gate)
                gated[row] = True
        self.bounded = any(t.bounds is not None for t, _ in maps.values())
        self.gated = bool(gated.any())
        self.slots = slots.ids.shape[0]
        self.stream = stream
        tables = {
            "local": local, "om1": om1, "beta": beta, "lo": lo, "hi": hi,
            "gate_weight": weight, "gate_bias": bias, "gated": gated,
        }  # fmt: skip
        for name, table in tables.items():
            module.register_buffer(PREFIX + name, table.to(device), persistent=False)
        module.register_buffer(PREFIX + "slot_ids", slots.ids, persistent=False)
        module.register_buffer(PREFIX + "slot_lams", slots.lams, persistent=False)

    def __call__(self, module: nn.Module, args: object, output: object) -> object:
        a = output_tensor(output, residual=self.stream)
        tokens = a.shape[0]
        t = {name: getattr(module, PREFIX + name) for name in BUFFERS}
        for slot in range(self.slots):
            row = t["local"][t["slot_ids"][slot, :tokens]]
            lam = t["slot_lams"][slot, :tokens]
            if self.gated:
                z = torch.addmm(t["gate_bias"], a.float(), t["gate_weight"].T)
                g = torch.sigmoid(z.gather(1, row.unsqueeze(1)).squeeze(1))
                lam = torch.where(t["gated"][row], g * lam, lam)
            scale, shift = (c.to(a.dtype) for c in coefficients(t["om1"][row], t["beta"][row], lam))
            a = transport_ops(
                a, scale, shift, (t["lo"][row], t["hi"][row]) if self.bounded else None
            )
        return with_output(output, a, residual=self.stream)
