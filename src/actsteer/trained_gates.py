"""Gates trained with the maps (DSAS with LinEAS): what `actsteer.lineas` adds when it trains a
gated steering end to end.

Each module's gate starts from its logistic probe (actsteer.gates.fit_gate) and is trained
with the maps through the frozen model: during training every source token is steered at its
gate g (λ = 1), so the W2 loss pulls a gate open where transporting helps. What keeps gates shut
on neutral text is a penalty on the target texts' tokens:

    loss = Σ_modules Σ_units W2²(steered source, plain target)
           + ρ · L₀ · mean over modules of the mean gate on the target texts' tokens

L₀ is the W2 loss at the first step (so ρ is unit-free; GATE_PENALTY = 1: gates wide open on
every target token cost as much as the whole loss at the start), and the target tokens are
the plain model's (recorded once: where gates upstream are shut, as they should be on target
text, those are the activations a gate sees). The penalty scores each target token's own gate
whatever the kind; during training a context gate follows the running mean over each text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actsteer.gates import Gate, GateSettings

#: ρ, the weight of the shut-on-target penalty relative to the loss at the start.
GATE_PENALTY = 1.0
#: Target tokens per module kept for the penalty.
PENALTY_TOKENS = 4096


@dataclass
class TrainableGate:
    """One module's gate while training: w and b with gradients, on the model's device."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def start(cls, gate: Gate, device: torch.device) -> TrainableGate:
        return cls(
            gate.weight.float().to(device).requires_grad_(True),
            gate.bias.float().to(device).requires_grad_(True),
        )

    def strength(self, a: torch.Tensor, mask: torch.Tensor, settings: GateSettings) -> torch.Tensor:
        """Each token's gate for a right-padded (B, T, D) batch with its (B, T) mask."""
        score = torch.matmul(a.float(), self.weight) + self.bias
        if settings.kind != "token":
            real = mask.to(score.dtype)
            total, count = (score * real).cumsum(1), real.cumsum(1).clamp_min(1)
            running = total / count
            score = (
                running
                if settings.kind == "context"
                else running.gather(
                    1, (mask.sum(1, keepdim=True) - 1).clamp_min(0).long()
                ).expand_as(score)
            )
        return torch.sigmoid((score - settings.threshold) / settings.tau)

    def open_on(self, tokens: torch.Tensor, settings: GateSettings) -> torch.Tensor:
        """The mean gate over (N, D) token activations (each token's own score)."""
        score = torch.matmul(tokens, self.weight) + self.bias
        return torch.sigmoid((score - settings.threshold) / settings.tau).mean()

    def finite(self) -> bool:
        return bool(torch.isfinite(self.weight).all() and torch.isfinite(self.bias).all())

    def frozen(self) -> Gate:
        return Gate(self.weight.detach().cpu().clone(), self.bias.detach().cpu().clone())
