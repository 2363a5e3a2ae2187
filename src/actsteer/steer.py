"""Steering: the fitted maps of named modules, and attaching them to a model with a strength λ.

The hot path is a forward hook per module that computes ω̃ ⊙ a + λβ (inside the support) from
tensors prepared once per strength on the module's device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from actsteer.capture import stream_index
from actsteer.errors import ActSteerError
from actsteer.kernels import fused_kernel
from actsteer.maps import SUPPORTS, AffineMap
from actsteer.methods import get_method

Strength = float | torch.Tensor
#: Token positions a steering acts on: every token, only the prompt's (the pass with nothing
#: cached yet), only generated tokens (passes that extend a KV cache), or each pass's last token.
POSITIONS = ("all", "prompt", "generated", "last")
#: Which half of a diffusers pipeline's classifier-free-guidance batch is steered: only the
#: conditional half (and only the prompt call of each text encoder, not the negative prompt's),
#: so guidance amplifies the transport, or both halves alike.
CFG_MODES = ("conditional", "both")


@dataclass
class Steering:
    """Per-module affine maps plus what is needed to apply, check and describe them.

    info holds the description that travels with an artifact: method, model name and
    fingerprint, pooling, mode, data description, default strength and support.
    max_strength (not saved) raises the method's upper λ bound: see `extrapolated`.
    """

    maps: dict[str, AffineMap]
    info: dict[str, Any] = field(default_factory=dict)
    max_strength: float | None = None

    @property
    def method(self) -> str:
        return self.info.get("method", "linear-act")

    @property
    def modules(self) -> list[str]:
        return list(self.maps)

    @property
    def default_support(self) -> str:
        return self.info.get("support", get_method(self.method).default_support)

    def check_strength(self, strength: Strength) -> None:
        """Raise a clear error for a λ outside the method's range."""
        get_method(self.method).check_strength(strength, self.max_strength)

    def extrapolated(self, upper: float) -> Steering:
        """The same steering, accepting λ up to `upper` beyond its method's range.

        AcT's λ interpolates between the untouched model (0) and the full transport (1);
        λ > 1 pushes past the target distribution, which the estimate says nothing about.
        Useful to chart where an induction saturates; not saved with the artifact.
        """
        if not math.isfinite(upper) or upper <= 0:
            raise ActSteerError(f"extrapolate to a finite λ > 0, got {upper}")
        return replace(self, max_strength=upper)

    def attach(
        self,
        model: nn.Module,
        strength: Strength = 1.0,
        support: str | None = None,
        positions: str = "all",
        cfg: str = "conditional",
    ) -> SteeringHandle:
        """Register the hooks; the handle sets the strength and removes them."""
        return SteeringHandle(
            self, model, strength, support or self.default_support, positions, cfg
        )

    @contextmanager
    def applied(
        self,
        model: nn.Module,
        strength: Strength = 1.0,
        support: str | None = None,
        positions: str = "all",
        cfg: str = "conditional",
    ) -> Iterator[SteeringHandle]:
        """Steer `model` inside the block; hooks are removed on exit, even on error.

        strength: λ as a number, or a (batch,) tensor giving each batch row its own λ.
        support: "q0-100" (default for mitigation), "q1-99", "q5-95" or "all" (induction).
        positions: "all" tokens, only the "prompt", only "generated" tokens (these two rely on
          generate's KV cache to tell the passes apart), or the "last" token of each pass.
        cfg: for diffusers pipelines under classifier-free guidance, steer only the
          "conditional" half (default; guidance then amplifies the transport) or "both" halves.
        """
        handle = self.attach(model, strength, support, positions, cfg)
        try:
            yield handle
        finally:
            handle.remove()

    def inverse(self) -> Steering:
        """The inverse maps: a steering that removes a concept becomes one that adds it."""
        info = {**self.info, "inverted": not self.info.get("inverted", False)}
        return Steering({name: m.inverse() for name, m in self.maps.items()}, info)

    def fold(
        self, model: nn.Module, strength: float = 1.0, support: str | None = None
    ) -> nn.Module:
        """Edit the model's weights so it is steered with no hooks (support "all" only)."""
        from actsteer.fold import fold

        return fold(self, model, strength, support)

    def save(self, path: str | Path) -> Path:
        """Write the steering to one .safetensors file (tensors + JSON metadata)."""
        from actsteer.artifact import save_steering

        return save_steering(self, path)

    @classmethod
    def load(cls, path: str | Path) -> Steering:
        """Read a steering saved with `save`; a damaged or foreign file is a clear error."""
        from actsteer.artifact import load_steering

        return load_steering(path)


class _PassPhase:
    """Model-level pre-hook: is the current forward pass the prompt pass (nothing cached yet)?"""

    def __init__(self) -> None:
        self.prompt = True

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # newer, older transformers
        if cache is None:
            self.prompt = True
        elif hasattr(cache, "get_seq_length"):
            self.prompt = cache.get_seq_length() == 0
        else:  # legacy tuple of per-layer (key, value)
            self.prompt = len(cache) == 0 or cache[0][0].shape[-2] == 0


class _GuidanceState:
    """What the hooks of a pipeline need to know about classifier-free guidance (CFG).

    How many times each text encoder ran since the denoiser last did (its first call encodes
    the prompts, a second one the negative prompts), and whether the current denoiser call's
    batch holds [unconditional; conditional] halves (`split`, set once per call): the
    pipeline's `do_classifier_free_guidance` where it has one, else a batch of twice the
    prompts the text encoder saw (so with one image per prompt).
    """

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.has_flag = hasattr(type(pipeline), "do_classifier_free_guidance")
        self.split = False
        self.text_calls: dict[str, int] = {}
        self.prompt_rows = 0

    def pre_hooks(self, tree: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Count text-encoder calls; a denoiser call starts a new count."""
        handles = []
        for name, component in tree.named_children():
            if name.startswith("text_encoder"):
                self.text_calls[name] = 0
                hook = partial(self._count, name)
                handles.append(component.register_forward_pre_hook(hook, with_kwargs=True))
            elif name in DENOISERS:
                handles.append(component.register_forward_pre_hook(self._reset, with_kwargs=True))
        return handles

    def _count(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.text_calls[name] += 1
        ids = args[0] if args else kwargs.get("input_ids")
        if self.text_calls[name] == 1 and isinstance(ids, torch.Tensor):
            self.prompt_rows = ids.shape[0]

    def _reset(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.text_calls = dict.fromkeys(self.text_calls, 0)
        if self.has_flag:
            self.split = bool(getattr(self.pipeline, "do_classifier_free_guidance", False))
        else:  # the latents: the denoiser's first argument (UNets) or hidden_states (DiTs)
            latents = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            rows = latents.shape[0] if isinstance(latents, torch.Tensor) else 0
            self.split = rows == 2 * self.prompt_rows


#: Pipeline components that denoise (their batch holds both CFG halves).
DENOISERS = ("unet", "transformer", "prior", "decoder")

#: Modules whose forward returns a new tensor no one else holds: a hook that sees it first may
#: overwrite it (exact types: a subclass may return something it keeps).
FRESH_OUTPUT = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)

#: Largest per-channel map tensor (elements) stored over a feature map's full H×W.
_SPATIAL = 1 << 16
Prepared = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]
ForwardHook = Callable[[nn.Module, object, object], object]


class _ModuleHook:
    """The hook of one module: λ-folded scale and shift, optional support bounds and positions.

    Scale, shift and bounds are prepared once per strength for every output layout the module
    may produce: (B, D) and (B, T, D) with units last, (B, C, H, W) with channels on axis 1 (a
    per-channel map, for convolutions), and, under classifier-free guidance (`cfg_rows`), a
    batch of twice the rows whose halves share the per-row strengths (`cfg` "both").

    `guidance` is set for modules of a pipeline steered in "conditional" mode: a text encoder's
    module then acts on the prompt call only, a denoiser's module on the second (conditional)
    half of a CFG batch only.
    """

    def __init__(
        self,
        amap: AffineMap,
        support: str,
        module: nn.Module,
        positions: str = "all",
        phase: _PassPhase | None = None,
        cfg_rows: bool = False,
        cfg: str = "both",
        component: str = "",
        guidance: _GuidanceState | None = None,
    ) -> None:
        param = next(module.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None else torch.float32
        self.bounds = amap.support(support)
        self.units = amap.omega.numel()
        self.kernel = fused_kernel() if self.device.type == "cpu" else None
        infinity = torch.full((self.units,), torch.inf, device=self.device, dtype=self.dtype)
        self.unbounded = (-infinity, infinity)  # the kernel's bounds for support "all"
        self.omega_minus_one = amap.omega.to(self.device, torch.float32) - 1
        self.beta = amap.beta.to(self.device, torch.float32)
        self.prepared: dict[tuple[int, int], Prepared] = {}
        self.spatial: dict[tuple[int, ...], Prepared] = {}
        self.rows = 0
        self.cfg_rows = cfg_rows
        self.conditional = cfg == "conditional"
        self.guidance = guidance
        self.text_encoder = component if component.startswith("text_encoder") else None
        self.denoiser = component in DENOISERS
        self.stream = stream_index(module)
        self.last_only = positions == "last"
        self.phase = phase
        self.on_prompt = positions == "prompt"
        # direct: every position of a tensor output on every call, the unconditional half of a
        # denoiser's CFG batch aside (no pass phase, no text-encoder call counting)
        counts_text_calls = guidance is not None and self.text_encoder is not None
        self.direct = phase is None and not self.last_only and not counts_text_calls
        self.cfg_halves = guidance if self.denoiser else None
        self.fresh_output = type(module) in FRESH_OUTPUT

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype)

    def _prepare(self, lam: torch.Tensor, ndim: int) -> Prepared:
        unit = (-1, 1, 1) if ndim == 4 else (-1,)
        if lam.ndim == 1:  # one λ per row: (B, 1, …) against units (D, …)
            lam = lam.view(-1, *[1] * (ndim - 1))
        scale = self._cast(1 + lam * self.omega_minus_one.view(unit))
        shift = self._cast(lam * self.beta.view(unit))
        bounds = None
        if self.bounds is not None:
            bounds = tuple(self._cast(b.to(self.device).view(unit)) for b in self.bounds)
        return scale, shift, bounds

    def set_strength(self, strength: torch.Tensor, first_hook: bool = False) -> ForwardHook:
        """Precompute ω̃ = 1 + λ(ω − 1) and λβ for each layout; λ is a scalar or (B,).

        Returns the forward hook to register: where the hook is direct, the fused kernel's own
        hook with these parameters bound (no Python runs per call; it calls this object for
        any output it does not take), else this object.

        first_hook: no other forward hook sees the module's output before this one, so the
        kernel may overwrite a norm's fresh output instead of allocating another (a hook added
        later with prepend=True runs first and would see its tensor overwritten).
        """
        lam = strength.to(self.device, torch.float32)
        self.spatial = {}
        self.rows = lam.shape[0] if lam.ndim == 1 else 0
        variants = {self.rows: lam}
        if self.cfg_rows and self.rows and not self.conditional:
            variants[2 * self.rows] = lam.repeat(2)  # [unconditional; conditional] halves
        self.prepared = {
            (rows, ndim): self._prepare(lam_rows, ndim)
            for rows, lam_rows in variants.items()
            for ndim in (2, 3, 4)
        }
        if self.kernel is None or not self.direct:
            return self
        scale, shift, bounds = self.prepared[(self.rows, 3)]
        lo, hi = bounds or self.unbounded
        in_place = first_hook and self.fresh_output
        bound = self.kernel.hook(scale, shift, lo, hi, self.rows, in_place, self.cfg_halves, self)
        return self if bound is None else bound  # None: parameters the kernel cannot read

    def _over_space(self, key: tuple[int, int], prepared: Prepared, a: torch.Tensor) -> Prepared:
        """Per-channel tensors (…, C, 1, 1) expanded to (…, C, H, W), once per shape.

        On CPU an elementwise op whose operand broadcasts along the innermost (H, W) axes runs
        several times slower than one on equal shapes, so small maps (≤ _SPATIAL elements per
        tensor) are stored over the feature map's full size.
        """
        shape = (*key, *a.shape[2:])
        cached = self.spatial.get(shape)
        if cached is None:
            scale, shift, bounds = prepared

            def full(t: torch.Tensor) -> torch.Tensor:
                return t.expand(*t.shape[:-2], *a.shape[2:]).contiguous()

            if scale.numel() * a.shape[2] * a.shape[3] > _SPATIAL:
                cached = prepared
            else:
                cached = full(scale), full(shift), bounds and (full(bounds[0]), full(bounds[1]))
            self.spatial[shape] = cached
        return cached

    def _transport(self, a: torch.Tensor, second_half_only: bool = False) -> torch.Tensor:
        """ω̃·a + λβ inside the support, a outside, exactly; with second_half_only, the first
        half of the rows (a CFG batch's unconditional half) unchanged.

        The fused kernel (actsteer.kernels) does it in one pass where it applies; otherwise
        torch ops do (and raise the errors for outputs that do not fit), the support mask built
        from float ops, outside = |sign(a − clamp(a, lo, hi))| ∈ {0, 1}, because comparisons
        and `where` on bool masks run several times slower per element on CPU; lerp(steered, a,
        outside) then returns steered where outside = 0 and a where it is 1, both bit-exact
        (lerp takes the form end − (end − start)·(1 − w) for w ≥ 0.5).
        """
        first_row = a.shape[0] // 2 if second_half_only else 0
        key = (a.shape[0] - first_row if self.rows else 0, a.ndim)
        prepared = self.prepared.get(key)
        if prepared is None:
            raise self._mismatch(a)
        if a.shape[1 if a.ndim == 4 else -1] != self.units:
            raise ActSteerError(
                f"cannot steer a module output of shape {tuple(a.shape)} with a map of "
                f"{self.units} units"
            )
        scale, shift, bounds = prepared
        if self.kernel is not None:
            lo, hi = bounds or self.unbounded
            steered = self.kernel.transport(
                scale, shift, lo, hi, key[0], False, second_half_only, a
            )
            if steered is not None:
                return steered
        part = a[first_row:] if first_row else a
        if a.ndim == 4:
            scale, shift, bounds = self._over_space(key, prepared, part)
        steered = torch.addcmul(shift, part, scale)
        if bounds is not None:
            lo, hi = bounds
            outside = torch.sub(part, torch.clamp(part, lo, hi)).sign_().abs_()
            steered = torch.lerp(steered, part, outside)
        return torch.cat([a[:first_row], steered]) if first_row else steered

    def _mismatch(self, a: torch.Tensor) -> ActSteerError:
        if self.rows:
            return ActSteerError(
                f"the per-row strength has {self.rows} values but the batch has {a.shape[0]} "
                "rows; give one λ per row (beam search and num_return_sequences > 1 add rows)"
            )
        return ActSteerError(f"cannot steer a module output of shape {tuple(a.shape)}")

    def __call__(self, module: nn.Module, args: object, output: object) -> object:
        if self.phase is not None and self.phase.prompt != self.on_prompt:
            return None
        guidance = self.guidance
        if (
            guidance is not None
            and self.text_encoder
            and guidance.text_calls[self.text_encoder] > 1
        ):
            return None  # the negative prompts' encoding
        a = output[self.stream] if isinstance(output, tuple) else output
        if guidance is not None and self.denoiser and guidance.split:
            # a CFG batch [unconditional; conditional]: steer its conditional half only
            return self._replace(output, self._transport(a, second_half_only=True))
        if self.last_only:
            steered = a.clone()
            steered[:, -1:] = self._transport(a[:, -1:])
        else:
            steered = self._transport(a)
        return self._replace(output, steered)

    def _replace(self, output: object, steered: torch.Tensor) -> object:
        """The module output with its steered tensor in place of the original."""
        if isinstance(output, tuple):
            return (*output[: self.stream], steered, *output[self.stream + 1 :])
        return steered


class SteeringHandle:
    """Hooks of one steering on one model; change λ with set_strength, undo with remove."""

    def __init__(
        self,
        steering: Steering,
        model: nn.Module,
        strength: Strength,
        support: str,
        positions: str = "all",
        cfg: str = "conditional",
    ) -> None:
        if support not in SUPPORTS:
            raise ActSteerError(f"unknown support {support!r}; choose one of {', '.join(SUPPORTS)}")
        if positions not in POSITIONS:
            raise ActSteerError(
                f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}"
            )
        if cfg not in CFG_MODES:
            raise ActSteerError(f"unknown cfg {cfg!r}; choose one of {', '.join(CFG_MODES)}")
        from actsteer.artifact import check_compatible
        from actsteer.diffusion import PipelineModules, is_pipeline, module_tree

        self.guidance = (
            _GuidanceState(model) if is_pipeline(model) and cfg == "conditional" else None
        )
        model = module_tree(model)
        pipeline = isinstance(model, PipelineModules)
        check_compatible(steering, model)
        lookup = dict(model.named_modules())
        self.steering = steering
        self.model = model
        self.phase = _PassPhase() if positions in ("prompt", "generated") else None
        self.hooks = {
            name: _ModuleHook(
                amap, support, lookup[name], positions, self.phase, cfg_rows=pipeline, cfg=cfg,
                component=name.split(".", 1)[0], guidance=self.guidance,
            )
            for name, amap in steering.maps.items()
        }  # fmt: skip
        self.modules = {name: lookup[name] for name in steering.maps}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.forward_hooks: dict[str, ForwardHook] = {}  # what is registered on each module
        self.set_strength(strength)

    def set_strength(self, strength: Strength) -> None:
        """Change λ. A scalar λ = 0 removes the hooks, so outputs are the untouched model's."""
        self.steering.check_strength(strength)
        lam = torch.as_tensor(strength, dtype=torch.float32)
        if lam.ndim > 1:
            raise ActSteerError(f"strength must be a number or a (batch,) tensor, got {lam.shape}")
        self._unhook()
        if lam.ndim == 0 and lam.item() == 0.0:
            return
        if self.phase is not None:
            self.handles.append(
                self.model.register_forward_pre_hook(self.phase, with_kwargs=True, prepend=True)
            )
        if self.guidance is not None:
            self.handles += self.guidance.pre_hooks(self.model)
        for name, hook in self.hooks.items():
            module = self.modules[name]
            first = not (module._forward_hooks or _global_forward_hooks)
            self.forward_hooks[name] = hook.set_strength(lam, first_hook=first)
            self.handles.append(module.register_forward_hook(self.forward_hooks[name]))

    def _unhook(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.forward_hooks = {}

    def remove(self) -> None:
        """Detach every hook: the model is exactly the untouched model again."""
        self._unhook()


@contextmanager
def steered(
    model: nn.Module,
    *steerings: tuple[Steering, Strength],
    support: str | None = None,
    positions: str = "all",
    cfg: str = "conditional",
) -> Iterator[list[SteeringHandle]]:
    """Apply several steerings at once, each with its own strength: `steered(m, (a, 1), (b, .5))`.

    Where two steer the same module they compose in the given order: b's map acts on the output
    of a's (and b's support is tested on those transported values).
    """
    with ExitStack() as stack:
        yield [
            stack.enter_context(steering.applied(model, strength, support, positions, cfg))
            for steering, strength in steerings
        ]
