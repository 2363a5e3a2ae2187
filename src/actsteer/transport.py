"""The one transport: every place that applies a map computes T_λ(a) here.

    T_λ(a) = ω̃ ⊙ a + λβ,  ω̃ = 1 + λ(ω − 1),   where lo < a < hi;   a elsewhere

A piecewise-linear monotone map per unit (quantile-act's knots x₀ < … < x_{K−1} ↦ y₀ … y_{K−1})
is the same interpolation, T_λ(a) = a + λ(T(a) − a), with T(a) = y_k + s_k (a − x_k) on the
segment k each activation lies in (`KnotTransport`; the end segments extend past the outer
knots; written about the segment's knot so steep segments lose nothing to rounding). A joint
map across units (joint-act: T(a) = a + U(C Uᵀ(a − m) + δ), a rank-r update) interpolates the
same way over the whole activation vector, each unit's change kept inside the support as for
the others (`LowRankTransport`).

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

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Prepared:
    """A strength made ready for outputs of one layout, dtype and device: ω̃ and λβ as the
    kernel reads them (`rows` = 0 for one λ, B for one per row, -1 where the kernel's
    per-row entry cannot read them) and as views that broadcast against the output, and the
    bounds likewise (None for "all" in the views)."""

    scale: torch.Tensor
    shift: torch.Tensor
    rows: int
    lo: torch.Tensor
    hi: torch.Tensor
    scale_view: torch.Tensor
    shift_view: torch.Tensor
    bounds_view: Bounds | None


class Transport:
    """One map ready to apply: ω − 1 and β in float32, the support's bounds (None: "all").

    Calling it transports an output at a strength. ω̃ and λβ are prepared per strength tensor
    and output layout, dtype and device; those of a strength tensor used a second time are kept
    (a hook reuses one per `set_strength`, while an engine builds one per pass and uses it once
    per module, where the kernel's per-token entry computes them in its loop instead).
    Parameters that need a gradient (LinEAS training) are never kept nor given to the kernel.
    The kernel is looked up when the Transport is made (`fused=False`: never).
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
        self.kernel = fused_kernel() if fused and not self.trained else None
        self.placed: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}
        self.kept: list[tuple[torch.Tensor, tuple, Prepared]] = []
        self.seen: list[torch.Tensor] = []

    def __call__(self, a: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
        """T_λ(a) for λ = `strength` (a number, per row or per token; see the module)."""
        lam = self.strength_for(a, strength)
        kernel = self.kernel if a.is_cpu else None
        prepared = self.kept_for(lam, a)
        if prepared is None:  # a per-row or per-token strength's first use
            if kernel is not None and a.ndim < 4 and a.is_contiguous():
                om1, beta, lo, hi = self.parameters(a.device, a.dtype)
                spread = lam.view(*lam.shape, *[1] * (a.ndim - 1 - lam.ndim))
                per_token = spread.expand(a.shape[:-1]).reshape(-1)
                out = kernel.transport_tokens(om1, beta, lo, hi, per_token, a.view(-1, self.units))
                if out is not None:
                    return out.view(a.shape)
            prepared = self.prepare(lam, a)
        if kernel is not None and prepared.rows >= 0:
            p = prepared
            out = kernel.transport(p.scale, p.shift, p.lo, p.hi, p.rows, False, a)
            if out is not None:
                return out
        return transport_ops(a, prepared.scale_view, prepared.shift_view, prepared.bounds_view)

    def strength_for(self, a: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
        """λ as a float32 tensor, checked against the layout and shape of `a`."""
        return checked_strength(a, strength, self.units)

    def parameters(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """ω − 1 and β (float32) and the bounds in `dtype` (±∞ for "all"), on `device`."""
        key = (device, dtype)
        placed = self.placed.get(key)
        if placed is None:
            lo, hi = _bounds_or_infinite(self.bounds, self.units, device, dtype)
            om1, beta = self.omega_minus_one.to(device), self.beta.to(device)
            placed = self.placed[key] = (om1, beta, lo, hi)
        return placed

    def kept_for(self, lam: torch.Tensor, a: torch.Tensor) -> Prepared | None:
        """What was prepared for this very strength tensor and a's layout, or None (prepared
        and kept here when the tensor comes a second time, or is one number)."""
        if self.trained:
            return None if lam.ndim else self.prepare(lam, a)
        key = (a.ndim, a.dtype, a.device)
        for kept, kept_key, prepared in self.kept:
            if kept is lam and kept_key == key:
                return prepared
        if lam.ndim and not any(seen is lam for seen in self.seen):
            self.seen = [*self.seen[-KEPT + 1 :], lam]
            return None
        prepared = self.prepare(lam, a)
        self.kept = [(lam, key, prepared), *self.kept[: KEPT - 1]]
        return prepared

    def prepare(self, lam: torch.Tensor, a: torch.Tensor) -> Prepared:
        """ω̃ and λβ for λ (of shape (*λ's shape, D), rounded to a's dtype on a's device) and
        the bounds, for the kernel and as views laid out against `a`."""
        om1, beta, lo, hi = self.parameters(a.device, a.dtype)
        scale, shift = (t.to(a.dtype) for t in coefficients(om1, beta, lam.to(a.device)))
        bounds = None if self.bounds is None else (_laid_out(lo, a), _laid_out(hi, a))
        rows = -1 if lam.ndim > 1 else lam.numel() if lam.ndim else 0
        return Prepared(
            scale, shift, rows, lo, hi, _laid_out(scale, a), _laid_out(shift, a), bounds
        )

    def traced(
        self, a: torch.Tensor, strength: torch.Tensor, parameters: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """T_λ(a) as plain torch ops and nothing kept, for code torch.compile traces
        (actsteer.compiled): `parameters` from `self.parameters(a.device, a.dtype)`, λ a
        tensor on a's device (one, per row or per token)."""
        om1, beta, lo, hi = parameters
        scale, shift = (t.to(a.dtype) for t in coefficients(om1, beta, strength))
        bounds = (_laid_out(lo, a), _laid_out(hi, a))
        return transport_ops(a, _laid_out(scale, a), _laid_out(shift, a), bounds)

    def kernel_hook(
        self, strength: torch.Tensor, dtype: torch.dtype, in_place: bool, fallback: object
    ) -> object | None:
        """A forward hook of the fused kernel with this map at `strength` (one λ, or one per
        row) bound for outputs in `dtype`: no Python frame runs per call, and `fallback`
        serves every output the kernel does not take. None where no kernel serves."""
        lam = torch.as_tensor(strength, dtype=torch.float32)
        if self.kernel is None or lam.ndim > 1:
            return None
        om1, beta, lo, hi = self.parameters(torch.device("cpu"), dtype)
        scale, shift = coefficients(om1, beta, lam)
        rows = lam.numel() if lam.ndim else 0
        return self.kernel.hook(scale.to(dtype), shift.to(dtype), lo, hi, rows, in_place, fallback)


class KnotTransport:
    """A piecewise-linear monotone map per unit ready to apply (actsteer.maps.QuantileMap):
    knots x (D, K), increasing, and per segment k its slope minus one, s_k − 1, and its knot's
    shift y_k − x_k (D, K − 1), in float32; bounds as for `Transport`. The segment of each
    activation is found by binary search on its unit's knots (the end segments extend past
    the outer knots); then T_λ(a) = a + λ((y_k − x_k) + (s_k − 1)(a − x_k)) inside the open
    support. On CPU the fused kernel's `knot_tokens` computes the same in one pass (`fused`);
    elsewhere, and traced, torch ops do. No strength is kept."""

    kernel = None  # the affine kernel's hooks do not apply

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, bounds: Bounds | None = None, fused: bool = True
    ) -> None:
        x, y = x.float(), y.float()
        width = x[:, 1:] - x[:, :-1]
        slope = torch.where(width > 0, (y[:, 1:] - y[:, :-1]) / width.clamp_min(1e-30), 0.0)
        self.x = x.contiguous()
        self.slope_minus_one = slope - 1
        self.shift = (y - x)[:, :-1].contiguous()
        self.bounds = bounds
        self.units = x.shape[0]
        self.fused = fused_kernel() if fused else None
        #: the kernel's layout: knots (K, D), slope − 1 and shift (K − 1, D), level-major
        self.by_level = tuple(t.t().contiguous() for t in (self.x, slope - 1, self.shift))
        self.placed: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def __call__(self, a: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
        """T_λ(a) for λ = `strength` (a number, per row or per token; see the module)."""
        lam = checked_strength(a, strength, self.units).to(a.device)
        parameters = self.parameters(a.device, a.dtype)
        if self.fused is not None and a.is_cpu and a.ndim < 4 and a.is_contiguous():
            if lam.ndim:  # one λ per token
                spread = lam.view(*lam.shape, *[1] * (a.ndim - 1 - lam.ndim))
                per_token = spread.expand(a.shape[:-1]).reshape(-1).contiguous()
            else:  # one λ for all
                per_token = lam.reshape(1)
            lo, hi = parameters[3:]
            out = self.fused.knot_tokens(*self.by_level, lo, hi, per_token, a.view(-1, self.units))
            if out is not None:
                return out.view(a.shape)
        return self.traced(a, lam, parameters)

    def parameters(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Knots, slope − 1 and shift per segment (float32) and the bounds in `dtype` (±∞ for
        "all"), on `device`."""
        key = (device, dtype)
        placed = self.placed.get(key)
        if placed is None:
            lo, hi = _bounds_or_infinite(self.bounds, self.units, device, dtype)
            x, sm1, shift = (t.to(device) for t in (self.x, self.slope_minus_one, self.shift))
            placed = self.placed[key] = (x, sm1, shift, lo, hi)
        return placed

    def traced(
        self, a: torch.Tensor, strength: torch.Tensor, parameters: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """T_λ(a) from `parameters` (`self.parameters(a.device, a.dtype)`), λ a tensor on a's
        device (one, per row or per token)."""
        x, sm1, shift, lo, hi = parameters
        channels = a.ndim == 4
        units_last = a.movedim(1, -1) if channels else a
        flat = units_last.reshape(-1, self.units)
        by_unit = flat.t().float().contiguous()
        found = torch.searchsorted(x, by_unit, right=True) - 1
        segment = found.clamp_(0, x.shape[1] - 2)
        knot = x.gather(1, segment)
        change = shift.gather(1, segment) + sm1.gather(1, segment) * (by_unit - knot)
        lam, lead = strength, units_last.shape[:-1]
        if lam.ndim:  # one λ per row of `flat`
            lam = lam.view(*lam.shape, *[1] * (len(lead) - lam.ndim)).expand(lead).reshape(-1)
        moved = flat + (lam.unsqueeze(-1) * change.t()).to(a.dtype)
        moved = torch.where(inside(flat, lo, hi), moved, flat)
        return moved.view(units_last.shape).movedim(-1, 1) if channels else moved.view(a.shape)

    def kernel_hook(
        self, strength: torch.Tensor, dtype: torch.dtype, in_place: bool, fallback: object
    ) -> object | None:
        """A forward hook of the fused kernel with this map at `strength` (one λ, or one per
        row) for outputs in `dtype`: no Python frame runs per call, and `fallback` serves every
        output the kernel does not take. None where no kernel serves. (It always writes a new
        tensor: `in_place` is the affine hook's.)"""
        lam = torch.as_tensor(strength, dtype=torch.float32)
        if self.fused is None or lam.ndim > 1:
            return None
        lo, hi = self.parameters(torch.device("cpu"), dtype)[3:]
        lams = lam.reshape(-1).contiguous()
        return self.fused.knot_hook(*self.by_level, lo, hi, lams, fallback)


class LowRankTransport:
    """A joint map across units ready to apply (actsteer.maps.JointMap): T(a) = a + U(C Uᵀ(a −
    m) + δ) with U (D, r) orthonormal, C (r, r), δ (r,) and m (D,) in float32, so T_λ(a) =
    a + λ U(C Uᵀ(a − m) + δ): two (D × r) products per token, each unit's change kept inside
    the open support as for `Transport` (bounds None: "all"). Torch ops, no strength kept,
    eager and traced alike."""

    kernel = None

    def __init__(
        self,
        mean: torch.Tensor,
        basis: torch.Tensor,
        core: torch.Tensor,
        delta: torch.Tensor,
        bounds: Bounds | None = None,
    ) -> None:
        self.mean, self.basis = mean.float(), basis.float().contiguous()
        self.core, self.delta = core.float(), delta.float()
        self.bounds = bounds
        self.units = mean.shape[0]
        self.placed: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def __call__(self, a: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
        """T_λ(a) for λ = `strength` (a number, per row or per token; see the module)."""
        lam = checked_strength(a, strength, self.units).to(a.device)
        return self.traced(a, lam, self.parameters(a.device, a.dtype))

    def parameters(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """m, U, Cᵀ and δ in float32 and the bounds in `dtype` (None for "all") on `device`."""
        key = (device, dtype)
        placed = self.placed.get(key)
        if placed is None:
            tensors = (self.mean, self.basis, self.core.t().contiguous(), self.delta)
            bounds = () if self.bounds is None else (b.to(device, dtype) for b in self.bounds)
            placed = self.placed[key] = (*(t.to(device) for t in tensors), *bounds)
        return placed

    def traced(
        self, a: torch.Tensor, strength: torch.Tensor, parameters: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """T_λ(a) from `parameters` (`self.parameters(a.device, a.dtype)`), λ a tensor on a's
        device (one, per row or per token)."""
        mean, basis, core_t, delta, *bounds = parameters
        channels = a.ndim == 4
        units_last = a.movedim(1, -1) if channels else a
        flat = units_last.reshape(-1, self.units)
        coordinates = (flat.float() - mean) @ basis
        change = (coordinates @ core_t + delta) @ basis.t()
        lam, lead = strength, units_last.shape[:-1]
        if lam.ndim:  # one λ per row of `flat`
            lam = lam.view(*lam.shape, *[1] * (len(lead) - lam.ndim)).expand(lead).reshape(-1)
        moved = flat + (lam.unsqueeze(-1) * change).to(a.dtype)
        if bounds:
            moved = torch.where(inside(flat, *bounds), moved, flat)
        return moved.view(units_last.shape).movedim(-1, 1) if channels else moved.view(a.shape)

    def kernel_hook(self, *args: object) -> None:
        """No fused kernel serves a joint map."""
        return None


#: Whatever a map's `transport(support)` gives: each is called as T(a, λ).
AnyTransport = Transport | KnotTransport | LowRankTransport


def checked_strength(a: torch.Tensor, strength: float | torch.Tensor, units: int) -> torch.Tensor:
    """λ as a float32 tensor, checked against the layout and shape of `a` (for a map of
    `units` units)."""
    if a.ndim not in (2, 3, 4):
        raise ActSteerError(f"cannot steer a module output of shape {tuple(a.shape)}")
    if a.shape[1 if a.ndim == 4 else -1] != units:
        raise ActSteerError(
            f"cannot steer a module output of shape {tuple(a.shape)} with a map of {units} units"
        )
    lam = strength
    if not isinstance(lam, torch.Tensor) or lam.dtype != torch.float32:
        lam = torch.as_tensor(strength, dtype=torch.float32)
    if lam.ndim:
        if lam.ndim == 1 and lam.shape[0] != a.shape[0]:
            raise per_row_mismatch(lam.shape[0], a.shape[0])
        if lam.ndim > (1 if a.ndim == 4 else a.ndim - 1) or lam.shape != a.shape[: lam.ndim]:
            raise ActSteerError(
                f"a strength of shape {tuple(lam.shape)} does not fit a module output of "
                f"shape {tuple(a.shape)}: give one λ, one per row or one per token"
            )
    return lam


def _bounds_or_infinite(
    bounds: Bounds | None, units: int, device: torch.device, dtype: torch.dtype
) -> Bounds:
    """The bounds in `dtype` on `device`, or ±∞ for the support "all"."""
    if bounds is None:
        infinity = torch.full((units,), torch.inf, dtype=dtype, device=device)
        return -infinity, infinity
    lo, hi = (b.to(device, dtype) for b in bounds)
    return lo, hi


def transport_ops(
    a: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bounds: Bounds | None
) -> torch.Tensor:
    """The transport as torch ops (GPUs, training, what the kernel declines): ω̃ ⊙ a + λβ in one
    rounding (addcmul), kept where lo < a < hi; `scale`, `shift` and the bounds broadcast
    against `a`."""
    moved = torch.addcmul(shift, a, scale)
    if bounds is None:
        return moved
    return torch.where((a > bounds[0]) & (a < bounds[1]), moved, a)  # inside(), inlined


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
