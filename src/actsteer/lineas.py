"""LinEAS, end-to-end estimation (Rodriguez, Suau et al., NeurIPS 2025, arXiv 2503.10679).

The same per-unit affine maps T(a) = ω ⊙ a + β on every chosen module as the AcT methods, but
trained jointly by gradient descent through the frozen model, so a map accounts for what the
maps upstream of it already moved:

    loss = Σ_modules Σ_units W2²(pooled activations of the source texts with ALL maps applied,
                                 pooled activations of the target texts on the plain model)

Each 1-D W2² is computed on sorted samples, unequal counts matched on a common quantile grid
(`maps.quantile_grid`, as `maps.couple` does); the target's quantiles are recorded once
(`capture.record`) and sorted once. The maps act during training as they do when applied: at
λ = 1, with the fit's support (the method's default "all"), on every token position.

Parametrisation: Adam trains ω and b = β / σ, σ being each unit's spread (standard deviation)
of the plain model's pooled source samples, so a learning rate means the same on modules whose
activations differ in scale (SmolLM2's post-attn-ln outputs: median σ ≈ 0.04 under mean
pooling, against which an unscaled step of 0.1 in β, the paper's learning rate, diverged).

Sparsity: a sparse-group-lasso penalty on (ω − 1, b), applied as a proximal step after each
Adam step. Groups are each unit's pair (ω_u − 1, b_u) and each module's 2·D numbers, with
weights derived from the one knob s = `sparsity`:

    unit weight   w = s · L₀ / U            (L₀ the loss at the start, U the number of units)
    module weight w · MODULE_SHARE · √D     (D the module's units; MODULE_SHARE = 0.25)

so a unit stays touched only while moving it by one unit of (ω, b) would change the loss by
more than s times the mean loss per unit at the start, and a whole module only while its
gradient's norm beats the module weight. The step is taken in Adam's metric (each group's
threshold η·w divided by its mean Adam denominator √v̂ + ε, as in proximal Adam), which keeps
that rule whatever the gradients' scale. s = 0 is no penalty; the more, the more units (then
modules) end exactly at ω = 1, β = 0.

Defaults (SmolLM2-135M, post-attn-ln, 32 + 32 texts; docs/benchmarks.md): 100 steps, Adam at
learning rate 0.02 (0.05 fits the training texts closer and the held-out ones slightly worse;
the held-out distance is flat from about step 60), sparsity 1 (modes.DEFAULT_SPARSITY: on
texts never seen in training it moved held-out sources closest, 0.45–0.62 of the unsteered
distance where sparsity 0 gave 0.50–0.77 and Linear-AcT 0.74–0.83), identity start, seed 0, one
step = 32 source texts (EndToEnd.texts_per_step; all of them when there are fewer, else a random
subset each step: 16 per step ran twice as fast but ended further from held-out targets),
truncated at fit's max_length like the recording, so both sets are pooled over the same spans.
fit's batch_size is the recording's.

Held-out selection (EndToEnd.held_out > 0): that share of each set's texts is kept out of
training (drawn with the seed); at every loss-curve point and after the last step the W2 loss
of the held-out source texts through the steered model against the held-out target texts is
measured, and the maps of the best check are returned (its step: info.data["training"]
["chosen_step"]). The end-to-end maps fit their own texts closer than new ones (docs/
benchmarks.md), so the step that moves unseen texts closest is not always the last.

Cost: one forward and backward pass of 32 source texts per step (gradients only for
ω, b; the model's weights are frozen and the pass stops after the last steered module), plus
one recording pass per set. Memory: that pass's autograd graph (32 × max_length
tokens), whatever the number of texts; target samples are capped by budget_mb as in every fit.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from actsteer.capture import POOLINGS, batches, forward_body, pool, record
from actsteer.choices import check_choice
from actsteer.errors import ActSteerError
from actsteer.gates import Gate, fit_gate
from actsteer.maps import AffineMap, UnitMap, quantile_grid, support_bounds
from actsteer.methods.linear_act import fit_linear
from actsteer.trained_gates import GATE_PENALTY, PENALTY_TOKENS, TrainableGate
from actsteer.transport import Transport
from actsteer.tree import model_device, output_tensor, stream_index, with_output

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from actsteer.gates import GateSettings
    from actsteer.modes import EndToEnd
    from actsteer.steering import SteeringInfo

#: The module-level group weight relative to √D times the unit-level one.
MODULE_SHARE = 0.25
#: At most this many quantile levels per module enter the loss (`all` pooling: tokens beyond it
#: are subsampled each step; the target's quantile function is kept at this many levels).
GRID_CAP = 4096
#: Loss-curve points kept in the steering's description.
CURVE_POINTS = 20


# ---------------------------------------------------------------------------------------------
# the loss


def sorted_quantiles(samples: torch.Tensor, cap: int = GRID_CAP) -> torch.Tensor:
    """Column-sorted samples, as at most `cap` evenly spaced quantile levels."""
    ordered = samples.float().sort(dim=0).values
    return quantile_grid(ordered, cap) if ordered.shape[0] > cap else ordered


def w2_per_unit(source: torch.Tensor, target_sorted: torch.Tensor) -> torch.Tensor:
    """Per-unit W2² (D,) between (N, D) samples and column-sorted (M, D) samples: the mean
    squared gap of their quantile functions on max(N, M) levels (differentiable in source)."""
    ordered = source.sort(dim=0).values
    size = max(ordered.shape[0], target_sorted.shape[0])
    gap = quantile_grid(ordered, size) - quantile_grid(target_sorted, size)
    return (gap * gap).mean(0)


def w2_loss(
    source: dict[str, torch.Tensor], target_sorted: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Σ over modules of Σ over units of W2²: the LinEAS loss (without its penalty)."""
    return torch.stack(
        [w2_per_unit(source[name].float(), target_sorted[name]).sum() for name in source]
    ).sum()


def end_to_end_distance(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> float:
    """The LinEAS loss between recorded samples {module: (N, D)} of steered source texts and
    plain target texts: how far the steered model's activations are from the target's."""
    return float(w2_loss(source, {name: sorted_quantiles(target[name]) for name in source}))


# ---------------------------------------------------------------------------------------------
# the sparse-group-lasso proximal step


def proximal_step(
    omega: torch.Tensor,
    beta: torch.Tensor,
    unit_threshold: float | torch.Tensor,
    module_threshold: float,
) -> None:
    """Group soft-thresholding of (ω − 1, β) in place: unit pairs (by one threshold, or one per
    unit), then the whole module.

    For nested groups this composition (leaves first) is the exact proximal operator of the
    sparse group lasso. Pairs and modules shrunk to nothing end at exactly ω = 1, β = 0.
    """
    with torch.no_grad():
        d_omega, d_beta = omega - 1, beta.clone()
        norm = torch.sqrt(d_omega * d_omega + d_beta * d_beta)
        keep = (1 - unit_threshold / norm.clamp(min=1e-30)).clamp(min=0)
        d_omega, d_beta = d_omega * keep, d_beta * keep
        total = float(torch.sqrt((d_omega * d_omega).sum() + (d_beta * d_beta).sum()))
        factor = max(0.0, 1 - module_threshold / total) if total > 0 else 0.0
        omega.copy_(d_omega * factor + 1)
        beta.copy_(d_beta * factor + 0.0)  # + 0.0: no -0.0 left behind


# ---------------------------------------------------------------------------------------------
# training


class _Stop(Exception):
    """Ends a forward pass once every steered module has produced its output."""


@dataclass
class Trainable:
    """One module's map while training: ω and the shift b = β / σ, with σ the per-unit spread
    (standard deviation) of the plain model's pooled source samples (1 where that is ~0), so
    that a learning rate, and the penalty's pair (ω − 1, b), mean the same on every module
    whatever the scale of its activations. Support bounds: None for "all"."""

    omega: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def start(
        cls,
        omega: torch.Tensor,
        beta: torch.Tensor,
        source: torch.Tensor,
        bounds: tuple[torch.Tensor, torch.Tensor] | None,
        device: torch.device,
    ) -> Trainable:
        spread = source.float().std(0, correction=0)
        scale = torch.where(spread > 1e-6 * (1 + source.float().mean(0).abs()), spread, 1.0)
        return cls(
            omega.float().to(device).requires_grad_(True),
            (beta.float() / scale).to(device).requires_grad_(True),
            scale.to(device),
            None if bounds is None else (bounds[0].to(device), bounds[1].to(device)),
        )

    def beta(self) -> torch.Tensor:
        return self.shift * self.scale

    def finite(self) -> bool:
        return bool(torch.isfinite(self.omega).all() and torch.isfinite(self.shift).all())


class TrainingHooks:
    """Differentiable forward hooks: each applies its module's map at λ = 1 (times its gate per
    token, when the gates train too) through the one transport (inside the support, a outside),
    keeps the pooled steered activations for the loss, and the pass stops once every module has
    been seen.

    Set `mask` (the batch's attention mask) and `rows` (for `all` pooling: which real tokens
    to keep, or None for all) before each pass.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, Trainable],
        pooling: str,
        gates: dict[str, TrainableGate] | None = None,
        gating: GateSettings | None = None,
    ) -> None:
        self.params = params
        self.pooling = pooling
        self.gates = gates or {}
        self.gating = gating
        self.mask: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.pooled: dict[str, torch.Tensor] = {}
        lookup = dict(model.named_modules())
        self.handles = [lookup[name].register_forward_hook(self._hook(name)) for name in params]

    def _hook(self, name: str):
        trainable = self.params[name]

        def hook(module: nn.Module, args: object, output: object) -> object:
            stream = stream_index(module)
            a = output_tensor(output, stream)
            assert self.mask is not None, "TrainingHooks.mask must be set before a forward pass"
            transport = Transport(trainable.omega, trainable.beta(), trainable.bounds)
            gate = self.gates.get(name)
            strength = (
                1.0
                if gate is None or self.gating is None
                else gate.strength(a, self.mask, self.gating)
            )
            steered = transport(a, strength)
            samples = pool(steered.float(), self.mask, self.pooling)
            self.pooled[name] = samples if self.rows is None else samples[self.rows]
            if len(self.pooled) == len(self.params):
                raise _Stop
            return with_output(output, steered, stream)

        return hook

    def run(self, body: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One forward pass of `batch`: the pooled steered samples of every module."""
        self.pooled = {}
        with suppress(_Stop):
            body(**batch, use_cache=False)
        missing = [name for name in self.params if name not in self.pooled]
        if missing:
            raise ActSteerError(f"module {missing[0]!r} is never called in a forward pass; drop it")
        return self.pooled

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """The model with every parameter's requires_grad off and every module in eval mode, both
    restored afterwards (also on error)."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


def split_off(
    texts: Sequence[str], share: float, seed: int, what: str
) -> tuple[list[str], list[str]]:
    """(kept, held out): `share` of the texts (at least one), drawn with `seed`; at least two
    texts must be kept."""
    held = max(1, round(len(texts) * share))
    if len(texts) - held < 2:
        raise ActSteerError(
            f"held_out={share:g} of {len(texts)} {what} texts leaves {len(texts) - held} to train "
            "on; give more texts or a smaller held_out"
        )
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    out = set(order[:held])
    return [t for i, t in enumerate(texts) if i not in out], [texts[i] for i in sorted(out)]


@dataclass
class HeldOut:
    """The texts kept out of training and the best step on them: source texts (steered when
    measured), the target's sorted quantiles (plain model), the distance at each check, and
    the parameters at the smallest one."""

    source: list[str]
    target_sorted: dict[str, torch.Tensor]
    target_texts: int
    curve: list[list[float]] = field(default_factory=list)
    best: float = float("inf")
    best_step: int = 0
    snapshot: list[torch.Tensor] = field(default_factory=list)

    def check(self, step: int, distance: float, tensors: Sequence[torch.Tensor]) -> None:
        """Record the distance after `step` steps; keep the parameters if it is the best."""
        self.curve.append([step, distance])
        if distance < self.best:
            self.best, self.best_step = distance, step
            self.snapshot = [t.detach().clone() for t in tensors]

    def restore(self, tensors: Sequence[torch.Tensor]) -> None:
        """Put the best step's parameters back."""
        with torch.no_grad():
            for t, kept in zip(tensors, self.snapshot, strict=True):
                t.copy_(kept)


def _initial(
    settings: EndToEnd, source: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if settings.init == "linear-act":
        return fit_linear(source, target)
    width = source.shape[1]
    return torch.ones(width), torch.zeros(width)


def _say_expected_time(first_step: float, steps: int) -> None:
    """After the first step, how long training will take (on stderr; the bar then shows its
    own remaining time)."""
    total = first_step * steps
    estimate = f"{total / 60:.0f} min" if total >= 90 else f"{total:.0f} s"
    tqdm.write(
        f"actsteer: LinEAS takes {first_step:.1f} s per step here: about {estimate} for "
        f"{steps} steps (fewer with training_steps / --training-steps)",
        file=sys.stderr,
    )


def fit_end_to_end(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    source: Sequence[str],
    target: Sequence[str],
    names: Sequence[str],
    info: SteeringInfo,
    settings: EndToEnd,
    *,
    batch_size: int,
    budget_mb: float,
    progress: bool,
    gating: GateSettings | None = None,
) -> tuple[dict[str, UnitMap], dict[str, Gate]]:
    """Train the maps of `names` jointly (LinEAS), with a gate per module when `gating` is
    given (actsteer.trained_gates); the settings and the loss curve go to
    info.data["training"]. batch_size is the recording passes' number of texts."""
    pooling, max_length, support = info.pooling, info.max_length, info.support
    assert pooling is not None and max_length is not None and support is not None
    check_choice(pooling, POOLINGS, "pooling")
    recorded: dict[str, Any] = dict(
        pooling=pooling,
        batch_size=batch_size,
        max_length=max_length,
        budget_mb=budget_mb / 2,
        progress=progress,
    )
    device = model_device(model)
    held: HeldOut | None = None
    if settings.held_out > 0:
        (source, held_source), (target, held_target) = (
            split_off(texts, settings.held_out, settings.seed, what)
            for texts, what in ((source, "source"), (target, "target"))
        )
        held_samples = record(
            model, tokenizer, held_target, names, desc="held-out target", **recorded
        )
        held = HeldOut(
            list(held_source),
            {name: sorted_quantiles(held_samples[name]).to(device) for name in names},
            len(held_target),
        )
        del held_samples
    target_samples = record(model, tokenizer, target, names, desc="target", **recorded)
    plain_source = record(model, tokenizer, source, names, desc="source", **recorded)
    target_sorted = {name: sorted_quantiles(target_samples[name]).to(device) for name in names}
    supports = {name: support_bounds(plain_source[name]) for name in names}
    params: dict[str, Trainable] = {}
    for name in names:
        x = plain_source[name].float()
        omega, beta = _initial(settings, x, target_samples[name].float())
        bounds = None if support == "all" else supports[name][support]
        params[name] = Trainable.start(omega, beta, x, bounds, device)
    del target_samples, plain_source
    gates, target_tokens = {}, {}
    if gating is not None:
        tokens = {
            what: record(model, tokenizer, texts, names, desc=f"gate: {what}",
                         **{**recorded, "pooling": "all"})
            for what, texts in (("source", source), ("target", target))
        }  # fmt: skip
        for name in names:
            gates[name] = TrainableGate.start(
                fit_gate(tokens["source"][name], tokens["target"][name]), device
            )
            target_tokens[name] = tokens["target"][name][:PENALTY_TOKENS].to(device).clone()
        del tokens  # fmt: skip
    curve = _train(
        model, tokenizer, list(source), list(names), params, target_sorted, settings,
        pooling=pooling, max_length=max_length, progress=progress,
        gates=gates, gating=gating, target_tokens=target_tokens, held=held,
    )  # fmt: skip
    maps = {
        name: AffineMap(
            t.omega.detach().cpu().clone(), t.beta().detach().cpu().clone(), supports[name]
        )
        for name, t in params.items()
    }
    touched = sum(int(((m.omega != 1) | (m.beta != 0)).sum()) for m in maps.values())
    units = sum(m.dim for m in maps.values())
    info.data["training"] = {
        **asdict(settings),
        "optimizer": "adam",
        "module_share": MODULE_SHARE,
        "loss_curve": curve,
        **(
            {}
            if held is None
            else {
                "held_out_texts": [len(held.source), held.target_texts],
                "held_out_curve": held.curve,
                "chosen_step": held.best_step,
            }
        ),
        "units_touched": touched,
        "units": units,
        "modules_touched": sum(bool(((m.omega != 1) | (m.beta != 0)).any()) for m in maps.values()),
    }
    if gating is not None:
        info.gate = {
            **gating.to_json(),
            "fit": {"trained": "jointly with the maps (lineas)", "penalty": GATE_PENALTY,
                    "source_texts": len(source), "target_texts": len(target)},
        }  # fmt: skip
    trained: dict[str, UnitMap] = dict(maps)
    return trained, {name: gate.frozen() for name, gate in gates.items()}


def penalise(optimizer: torch.optim.Adam, params: Iterable[Trainable], step: float) -> None:
    """The proximal step of the penalty (weight × step size `step`) in Adam's metric: each
    group's threshold is divided by its mean Adam denominator √v̂ + ε, so a group stays
    touched while the loss's gradient on it is larger than the weight (the lasso's rule)."""
    group = optimizer.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    for t in params:
        denominators = []
        for x in (t.omega, t.shift):
            state = optimizer.state[x]
            bias = 1 - beta2 ** float(state["step"])
            denominators.append((state["exp_avg_sq"] / bias).sqrt() + eps)
        unit = (denominators[0] + denominators[1]) / 2
        module = step * MODULE_SHARE * t.omega.numel() ** 0.5 / float(unit.mean())
        proximal_step(t.omega, t.shift, step / unit, module)


def _train(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    source: list[str],
    names: list[str],
    params: dict[str, Trainable],
    target_sorted: dict[str, torch.Tensor],
    settings: EndToEnd,
    *,
    pooling: str,
    max_length: int,
    progress: bool,
    gates: dict[str, TrainableGate],
    gating: GateSettings | None,
    target_tokens: dict[str, torch.Tensor],
    held: HeldOut | None = None,
) -> list[list[float]]:
    """Adam on ω and b = β/σ with the proximal step (and on the gates, with their penalty);
    returns the loss curve [[step, loss], …], the last point the loss after the final step.
    With `held`, the W2 distance of the held-out texts is checked at every curve point and
    after the last step, and the parameters of the best check are restored at the end."""
    generator = torch.Generator().manual_seed(settings.seed)
    tensors = [x for t in params.values() for x in (t.omega, t.shift)]
    tensors += [x for g in gates.values() for x in (g.weight, g.bias)]
    start: list[float] = []  # L₀, the W2 loss at the first step (the penalty's scale)
    optimizer = torch.optim.Adam(tensors, lr=settings.learning_rate)
    lr, s = settings.learning_rate, settings.sparsity
    device = model_device(model)
    every = max(1, settings.training_steps // CURVE_POINTS)
    curve: list[list[float]] = []
    body = forward_body(model, names)
    units = sum(t.omega.numel() for t in params.values())
    weight: float | None = None

    def loss_of_step() -> torch.Tensor:
        picked = source
        if len(source) > settings.texts_per_step:
            order = torch.randperm(len(source), generator=generator)[: settings.texts_per_step]
            picked = [source[i] for i in sorted(order.tolist())]
        batch = next(batches(tokenizer, picked, len(picked), max_length, device))
        hooks.mask = batch["attention_mask"].bool()
        real = int(hooks.mask.sum())
        hooks.rows = None
        if pooling == "all" and real > GRID_CAP:
            hooks.rows = torch.randperm(real, generator=generator)[:GRID_CAP].to(device)
        loss = w2_loss(hooks.run(body, batch), target_sorted)
        if gating is None:
            return loss
        if not start:
            start.append(float(loss.detach()))
        shut = torch.stack([gates[n].open_on(target_tokens[n], gating) for n in gates]).mean()
        return loss + GATE_PENALTY * start[0] * shut

    def held_out_distance() -> float:
        assert held is not None
        pooled: dict[str, list[torch.Tensor]] = {name: [] for name in params}
        hooks.rows = None
        with torch.no_grad():
            for batch in batches(
                tokenizer, held.source, settings.texts_per_step, max_length, device
            ):
                hooks.mask = batch["attention_mask"].bool()
                for name, samples in hooks.run(body, batch).items():
                    pooled[name].append(samples)
        steered = {name: torch.cat(parts) for name, parts in pooled.items()}
        return float(w2_loss(steered, held.target_sorted))

    def check(loss: torch.Tensor, step: int) -> None:
        bad = not torch.isfinite(loss) or not all(t.finite() for t in params.values())
        bad = bad or not all(g.finite() for g in gates.values())
        if bad:
            raise ActSteerError(
                f"LinEAS training diverged: the loss is {float(loss.detach())} at step {step} of "
                f"{settings.training_steps} (learning_rate={lr:g}); lower the learning rate, e.g. "
                f"learning_rate={lr / 10:g}"
            )

    with frozen(model), torch.inference_mode(False), torch.enable_grad():
        hooks = TrainingHooks(model, params, pooling, gates, gating)
        try:
            bar = tqdm(
                range(settings.training_steps), desc="lineas", disable=not progress, leave=False
            )
            started = time.perf_counter()
            for step in bar:
                if step == 1 and progress:
                    _say_expected_time(time.perf_counter() - started, settings.training_steps)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of_step()
                check(loss, step)
                loss.backward()
                optimizer.step()
                if s > 0:
                    if weight is None:  # s × the mean loss per unit at the start
                        weight = s * float(loss.detach()) / units
                    penalise(optimizer, params.values(), lr * weight)
                value = float(loss.detach())
                if step % every == 0:
                    curve.append([step, value])
                done = step + 1
                if held is not None and done % every == 0 and done < settings.training_steps:
                    held.check(done, held_out_distance(), tensors)
                bar.set_postfix(loss=f"{value:.4g}")
            with torch.no_grad():  # the loss after the last step, for the curve
                final = loss_of_step()
            check(final, settings.training_steps)
            curve.append([settings.training_steps, float(final)])
            if held is not None:
                held.check(settings.training_steps, held_out_distance(), tensors)
                held.restore(tensors)
        finally:
            hooks.remove()
    return curve
