"""Applying maps to a running model: one forward hook per module, and the handle that owns them.

The hook computes T_λ(a) = ω̃ ⊙ a + λβ inside the support, a outside it, from tensors prepared
once per strength (AffineMap.at) and placed once on the device and in the dtype of the tensors
the module actually produces (a layer that accelerate offloads has its parameters on `meta`
until it runs). The plain path is torch ops; on CPU the fused kernel of `actsteer.kernels`
does the same in one pass, bit for bit, where it applies.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from actsteer.choices import GUIDANCE_MODES, POSITIONS, SUPPORTS
from actsteer.errors import ActSteerError
from actsteer.guards import enter, guard_of, leave, reach, warn_far_strength
from actsteer.guidance import Guidance
from actsteer.kernels import fused_kernel
from actsteer.maps import AffineMap
from actsteer.tree import DENOISERS, PipelineModules, is_pipeline, module_tree, stream_index

Strength = float | torch.Tensor
#: Modules whose forward returns a new tensor no one else holds: a hook that sees it first may
#: overwrite it (exact types: a subclass may return something it keeps).
FRESH_OUTPUT = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)

Prepared = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]


class Steerable(Protocol):
    """What a handle needs of a steering: its maps, its λ range and its model check."""

    maps: dict[str, AffineMap]

    def check_strength(self, strength: Strength) -> None: ...

    def check_compatible(self, model: nn.Module) -> None: ...


class PassPhase:
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


def _layout(t: torch.Tensor, ndim: int, per_row: bool) -> torch.Tensor:
    """A (D,) or per-row (B, D) tensor shaped to broadcast against an output of `ndim` axes:
    units last for (B, D) and (B, T, D), channels on axis 1 for (B, C, H, W)."""
    if ndim == 4:
        return t.view(*t.shape, 1, 1)
    return t.unsqueeze(-2) if per_row and ndim == 3 else t


class ModuleHook:
    """The forward hook of one module: a map, its support, the positions and rows it acts on.

    `guidance` is set for modules of a pipeline steered in "conditional" mode: a text encoder's
    module then acts on the prompt call only, a denoiser's module on the second (conditional)
    half of a CFG batch only. `cfg_rows`: a pipeline steered in "both" mode, whose denoiser
    batches have twice the rows of a per-row strength (both halves share it).
    """

    def __init__(
        self,
        amap: AffineMap,
        support: str,
        module: nn.Module,
        positions: str = "all",
        phase: PassPhase | None = None,
        cfg_rows: bool = False,
        component: str = "",
        guidance: Guidance | None = None,
    ) -> None:
        self.amap = amap
        self.bounds = amap.support(support)
        self.units = amap.dim
        param = next(module.parameters(), None)
        on_cpu = param is None or param.device.type == "cpu"
        self.kernel = fused_kernel() if on_cpu else None
        self.kernel_dtype = param.dtype if param is not None else torch.float32
        self.cfg_rows = cfg_rows
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
        self.rows = 0
        self.variants: dict[int, torch.Tensor] = {}
        self.placed: dict[tuple[int, int, torch.device, torch.dtype], Prepared] = {}
        self.infinite: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_strength(self, strength: torch.Tensor, first_hook: bool = False) -> object:
        """Take a new λ (a number or one per row) and return the forward hook to register:
        where the hook is direct and the kernel can read the parameters, the kernel's own hook
        with them bound (no Python runs per call; it calls this object for any output it does
        not take), else this object.

        first_hook: no other forward hook sees the module's output before this one, so the
        kernel may overwrite a norm's fresh output instead of allocating another (a hook added
        later with prepend=True runs first and would see its tensor overwritten).
        """
        lam = strength.float().cpu()
        self.rows = lam.shape[0] if lam.ndim == 1 else 0
        self.variants = {self.rows: lam}
        if self.cfg_rows and self.rows:
            self.variants[2 * self.rows] = lam.repeat(2)  # [unconditional; conditional] halves
        self.placed = {}
        if self.kernel is None or not self.direct:
            return self
        scale, shift, bounds = self._prepared(self.rows, 3, torch.device("cpu"), self.kernel_dtype)
        lo, hi = bounds or self._unbounded(self.kernel_dtype)
        in_place = first_hook and self.fresh_output
        bound = self.kernel.hook(scale, shift, lo, hi, self.rows, in_place, self.cfg_halves, self)
        return self if bound is None else bound  # None: parameters the kernel cannot read

    def _unbounded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's bounds for support "all": ±∞, made once per dtype."""
        bounds = self.infinite.get(dtype)
        if bounds is None:
            infinity = torch.full((self.units,), torch.inf, dtype=dtype)
            bounds = self.infinite[dtype] = (-infinity, infinity)
        return bounds

    def _prepared(self, rows: int, ndim: int, device: torch.device, dtype: torch.dtype) -> Prepared:
        """ω̃, λβ and the bounds for `rows` rows (0: one λ for all) of an `ndim`-axis output, on
        `device` in `dtype`: computed on the first call that needs them, then reused."""
        key = (rows, ndim, device, dtype)
        prepared = self.placed.get(key)
        if prepared is None:
            lam = self.variants.get(rows)
            if lam is None:
                raise self._mismatch(rows)

            def place(t: torch.Tensor, per_row: bool = False) -> torch.Tensor:
                return _layout(t, ndim, per_row).to(device, dtype)

            scale, shift = self.amap.at(lam)
            bounds = None if self.bounds is None else (place(self.bounds[0]), place(self.bounds[1]))
            prepared = self.placed[key] = (
                place(scale, bool(rows)),
                place(shift, bool(rows)),
                bounds,
            )
        return prepared

    def _transport(self, a: torch.Tensor, second_half_only: bool = False) -> torch.Tensor:
        """ω̃·a + λβ inside the support, a outside, exactly; with second_half_only, the first
        half of the rows (a CFG batch's unconditional half) unchanged."""
        first_row = a.shape[0] // 2 if second_half_only else 0
        rows = a.shape[0] - first_row if self.rows else 0
        if a.ndim not in (2, 3, 4):
            raise (
                self._mismatch(rows)
                if rows
                else ActSteerError(f"cannot steer a module output of shape {tuple(a.shape)}")
            )
        scale, shift, bounds = self._prepared(rows, a.ndim, a.device, a.dtype)
        if a.shape[1 if a.ndim == 4 else -1] != self.units:
            raise ActSteerError(
                f"cannot steer a module output of shape {tuple(a.shape)} with a map of "
                f"{self.units} units"
            )
        if self.kernel is not None:
            lo, hi = bounds or self._unbounded(a.dtype)
            steered = self.kernel.transport(scale, shift, lo, hi, rows, False, second_half_only, a)
            if steered is not None:
                return steered
        part = a[first_row:] if first_row else a
        steered = torch.addcmul(shift, part, scale)
        if bounds is not None:
            lo, hi = bounds
            steered = torch.where((part >= lo) & (part <= hi), steered, part)
        return torch.cat([a[:first_row], steered]) if first_row else steered

    def _mismatch(self, rows: int) -> ActSteerError:
        return ActSteerError(
            f"the per-row strength has {self.rows} values but the batch has {rows} rows; give "
            "one λ per row (beam search and num_return_sequences > 1 add rows)"
        )

    def __call__(self, module: nn.Module, args: object, output: object) -> object:
        if self.phase is not None and self.phase.prompt != self.on_prompt:
            return None
        guidance = self.guidance
        if (
            guidance is not None
            and self.text_encoder
            and guidance.negative_prompts(self.text_encoder)
        ):
            return None
        a = output[self.stream] if isinstance(output, tuple) else output
        if not isinstance(a, torch.Tensor):
            raise ActSteerError(
                f"module output of type {type(a).__name__} cannot be steered; "
                "choose modules that return a tensor"
            )
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
    """Hooks of one steering on one model; change λ with set_strength, undo with remove.

    guidance: for diffusers pipelines under classifier-free guidance, steer only the
    "conditional" half (and only the prompts' text encoding) or "both" halves alike.
    """

    def __init__(
        self,
        steering: Steerable,
        model: nn.Module,
        strength: Strength,
        support: str,
        positions: str = "all",
        guidance: str = "conditional",
    ) -> None:
        if support not in SUPPORTS:
            raise ActSteerError(f"unknown support {support!r}; choose one of {', '.join(SUPPORTS)}")
        if positions not in POSITIONS:
            raise ActSteerError(
                f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}"
            )
        if guidance not in GUIDANCE_MODES:
            raise ActSteerError(
                f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCE_MODES)}"
            )
        conditional = is_pipeline(model) and guidance == "conditional"
        self.guidance = Guidance(model) if conditional else None
        tree = module_tree(model)
        steering.check_compatible(tree)
        lookup = dict(tree.named_modules())
        self.steering = steering
        self.model = tree
        self.phase = PassPhase() if positions in ("prompt", "generated") else None
        both_halves = isinstance(tree, PipelineModules) and guidance == "both"
        self.hooks = {
            name: ModuleHook(
                amap, support, lookup[name], positions, self.phase, cfg_rows=both_halves,
                component=name.split(".", 1)[0], guidance=self.guidance,
            )
            for name, amap in steering.maps.items()
        }  # fmt: skip
        self.modules = {name: lookup[name] for name in steering.maps}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.forward_hooks: dict[str, object] = {}  # what is registered on each module
        self.strength = torch.zeros(())
        self.reach = reach(steering.maps)  # for the far-λ warning, once: λ only scales it
        enter(self, tree)  # refuses the same steering applied twice
        try:
            self.set_strength(strength)
        except BaseException:
            leave(self, tree)
            raise

    def set_strength(self, strength: Strength) -> None:
        """Change λ. A scalar λ = 0 removes the hooks, so outputs are the untouched model's."""
        self.steering.check_strength(strength)
        lam = torch.as_tensor(strength, dtype=torch.float32)
        if lam.ndim > 1:
            raise ActSteerError(f"strength must be a number or a (batch,) tensor, got {lam.shape}")
        self._unhook()
        self.strength = lam
        if lam.ndim == 0 and lam.item() == 0.0:
            guard_of(self.model).update()
            return
        warn_far_strength(self.reach, lam)
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
        guard_of(self.model).update()  # one check of the model's output per forward

    def _unhook(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.forward_hooks = {}

    def remove(self) -> None:
        """Detach every hook: the model is exactly the untouched model again."""
        self._unhook()
        leave(self, self.model)
