"""The one transport: every place that applies a map computes T_λ(a) here.

    T_λ(a) = ω̃ ⊙ a + λβ,  ω̃ = 1 + λ(ω − 1),   where lo < a < hi;   a elsewhere

The support (lo, hi) is open, as in the reference implementation: an activation exactly on a
bound (a one-token text is its own pooled sample) stays as it is. λ is one number, one per row
((B,)), or one per token ((B, T) for a (B, T, D) output, (N,) for a batch flattened to (N, D)):
whatever a hook's strength sources (actsteer.sources) or an engine's request boundaries
(actsteer.integrations.batch) made of the steering's λ. Layouts: units last ((N, D),
(B, T, D)) or channels on axis 1 ((B, C, H, W): one map per channel).

Hugging Face hooks, the vLLM plugin, LinEAS training and (through the hooks) the server all call
`Transport`. On CPU the optional fused kernel (actsteer.kernels) computes the same in one pass,
bit for bit; elsewhere (GPUs, tensors the kernel declines, training) torch ops do.
"""

from __future__ import annotations

import torch

from actsteer.errors import ActSteerError
from actsteer.kernels import fused_kernel

Bounds = tuple[torch.Tensor, torch.Tensor]
#: How many strengths' coefficients a Transport keeps (a hook alternates between few).
KEPT = 4


def coefficients(
    omega_minus_one: torch.Tensor, beta: torch.Tensor, strength: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ω̃, λβ) in float32 for λ of any shape S: (*S, D) tensors, ω̃ = 1 + λ(ω − 1).

    The one place the λ formula lives (the transport, folding and control vectors use it).
    """
    lam = torch.as_tensor(strength, dtype=torch.float32, device=beta.device).unsqueeze(-1)
    return lam * omega_minus_one + 1, lam * beta


class Transport:
    """One map ready to apply: ω − 1 and β in float32, the support's bounds (None: "all").

    Calling it transports an output at a strength. ω̃ and λβ are computed per strength tensor,
    dtype and device; those of a strength tensor used a second time are kept (a hook reuses
    one per `set_strength`, while an engine builds one per pass and uses it once per module,
    where the kernel's per-token entry computes them in its loop instead). Parameters that
    need a gradient (LinEAS training) are never kept nor given to the kernel.
    """

    def __init__(
        self,
        omega: torch.Tensor,
        beta: torch.Tensor,
        bounds: Bounds | None = None,
        fused: bool = True,
    ) -> None:
        self.omega_minus_one = omega.float() - 1
        self.beta = beta.float()
        self.bounds = bounds
        self.units = omega.shape[0]
        self.trained = omega.requires_grad or beta.requires_grad
        self.fused = fused and not self.trained
        self.placed: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}
        self.kept: list[tuple[torch.Tensor, tuple, tuple[torch.Tensor, torch.Tensor]]] = []
        self.seen: list[torch.Tensor] = []

    def __call__(self, a: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
        """T_λ(a) for λ = `strength` (a number, per row or per token; see the module)."""
        lam = self.strength_for(a, strength)
        kernel = self.kernel_for(a)
        kept = self.kept_coefficients(lam, a)
        per_token = kernel is not None and kept is None and lam.ndim > 0 and a.ndim < 4
        if per_token and a.is_contiguous():
            om1, beta, lo, hi = self.parameters(a.device, a.dtype)
            spread = lam.view(*lam.shape, *[1] * (a.ndim - 1 - lam.ndim)).expand(a.shape[:-1])
            tokens = a.view(-1, self.units)
            out = kernel.transport_tokens(om1, beta, lo, hi, spread.reshape(-1), tokens)
            if out is not None:
                return out.view(a.shape)
        scale, shift = kept or self.coefficients_for(lam, a)
        if kernel is not None and lam.ndim <= 1:
            lo, hi = self.parameters(a.device, a.dtype)[2:]
            out = kernel.transport(scale, shift, lo, hi, lam.numel() if lam.ndim else 0, False, a)
            if out is not None:
                return out
        bounds = None
        if self.bounds is not None:
            lo, hi = self.parameters(a.device, a.dtype)[2:]
            bounds = (_laid_out(lo, a), _laid_out(hi, a))
        return transport_ops(a, _laid_out(scale, a), _laid_out(shift, a), bounds)

    def strength_for(self, a: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
        """λ as a float32 tensor, checked against the layout and shape of `a`."""
        if a.ndim not in (2, 3, 4):
            raise ActSteerError(f"cannot steer a module output of shape {tuple(a.shape)}")
        if a.shape[1 if a.ndim == 4 else -1] != self.units:
            raise ActSteerError(
                f"cannot steer a module output of shape {tuple(a.shape)} with a map of "
                f"{self.units} units"
            )
        lam = torch.as_tensor(strength, dtype=torch.float32)
        if lam.ndim == 1 and lam.shape[0] != a.shape[0]:
            raise per_row_mismatch(lam.shape[0], a.shape[0])
        leading = 1 if a.ndim == 4 else a.ndim - 1
        if lam.ndim > leading or lam.shape != a.shape[: lam.ndim]:
            raise ActSteerError(
                f"a strength of shape {tuple(lam.shape)} does not fit a module output of shape "
                f"{tuple(a.shape)}: give one λ, one per row or one per token"
            )
        return lam

    def kernel_for(self, a: torch.Tensor):
        """The fused kernel where it may serve `a` (a CPU tensor; it declines what else it
        cannot take), else None."""
        if not self.fused or a.device.type != "cpu":
            return None
        return fused_kernel()

    def parameters(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """ω − 1 and β (float32) and the bounds in `dtype` (±∞ for "all"), on `device`."""
        key = (device, dtype)
        placed = self.placed.get(key)
        if placed is None:
            if self.bounds is None:
                infinity = torch.full((self.units,), torch.inf, dtype=dtype, device=device)
                lo, hi = -infinity, infinity
            else:
                lo, hi = (b.to(device, dtype) for b in self.bounds)
            om1, beta = self.omega_minus_one.to(device), self.beta.to(device)
            placed = self.placed[key] = (om1, beta, lo, hi)
        return placed

    def kept_coefficients(
        self, lam: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ω̃, λβ kept for this very strength tensor, or None (computed and kept here when the
        tensor comes a second time, or is one number)."""
        if self.trained:
            return None
        key = (a.device, a.dtype)
        for kept, kept_key, pair in self.kept:
            if kept is lam and kept_key == key:
                return pair
        if lam.ndim > 0 and not any(seen is lam for seen in self.seen):
            self.seen = [*self.seen[-KEPT + 1 :], lam]
            return None
        pair = self.coefficients_for(lam, a)
        self.kept = [*self.kept[-KEPT + 1 :], (lam, key, pair)]
        return pair

    def coefficients_for(
        self, lam: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ω̃ and λβ for λ, of shape (*λ's shape, D), rounded to a's dtype on a's device."""
        om1, beta = self.parameters(a.device, a.dtype)[:2]
        scale, shift = coefficients(om1, beta, lam.to(a.device))
        return scale.to(a.dtype), shift.to(a.dtype)

    def kernel_hook(
        self, strength: torch.Tensor, dtype: torch.dtype, in_place: bool, fallback: object
    ) -> object | None:
        """A forward hook of the fused kernel with this map at `strength` (one λ, or one per
        row) bound for outputs in `dtype`: no Python frame runs per call, and `fallback`
        serves every output the kernel does not take. None where no kernel serves."""
        kernel = fused_kernel() if self.fused else None
        lam = torch.as_tensor(strength, dtype=torch.float32)
        if kernel is None or lam.ndim > 1:
            return None
        om1, beta, lo, hi = self.parameters(torch.device("cpu"), dtype)
        scale, shift = coefficients(om1, beta, lam)
        rows = lam.numel() if lam.ndim else 0
        return kernel.hook(scale.to(dtype), shift.to(dtype), lo, hi, rows, in_place, fallback)


def transport_ops(
    a: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bounds: Bounds | None
) -> torch.Tensor:
    """The transport as torch ops (GPUs, training, what the kernel declines): ω̃ ⊙ a + λβ in one
    rounding (addcmul), kept where lo < a < hi; `scale`, `shift` and the bounds broadcast
    against `a`."""
    moved = torch.addcmul(shift, a, scale)
    return moved if bounds is None else torch.where(inside(a, *bounds), moved, a)


def inside(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Where `a` lies in the open support lo < a < hi (the test every transport makes)."""
    return (a > lo) & (a < hi)


def per_row_mismatch(values: int, rows: int) -> ActSteerError:
    """The error of a per-row strength whose length is not the batch's."""
    return ActSteerError(
        f"the per-row strength has {values} values but the batch has {rows} rows; give one λ "
        "per row (beam search and num_return_sequences > 1 add rows)"
    )


def _laid_out(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(*S, D) coefficients or (D,) bounds shaped to broadcast against `a`: units last, or on
    axis 1 of a (B, C, H, W) output."""
    if a.ndim == 4:
        return t.view(*t.shape, 1, 1)
    lead = t.ndim - 1
    return t.view(*t.shape[:-1], *([1] * (a.ndim - 1 - lead)), t.shape[-1])
