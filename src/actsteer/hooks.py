"""Applying maps to a running model: one forward hook per module, and the handle that owns them.

A hook reads its module's output tensor, makes the strength of this call from the steering's λ
through its strength sources (actsteer.sources: positions, guidance halves), and puts back
what the one transport (actsteer.transport) makes of it. A hook with no sources on a CPU module
registers the fused kernel's own hook where the kernel is installed (no Python frame per call;
the Python hook serves whatever it declines).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from actsteer.choices import GATE_KINDS, GUIDANCE_MODES, POSITIONS, SUPPORTS, check_choice
from actsteer.compiled import forget_compiled_code, has_compiled_code
from actsteer.errors import ActSteerError
from actsteer.gates import Gate, GateSettings
from actsteer.guards import check_far_strength, enter, guard_of, leave, reach
from actsteer.guidance import Guidance
from actsteer.maps import UnitMap
from actsteer.sources import (
    BothHalves,
    ConditionalHalf,
    Gated,
    InPhase,
    LastPosition,
    PassPhase,
    PromptEncoding,
    Source,
)
from actsteer.tree import (
    DENOISERS,
    PipelineModules,
    is_pipeline,
    module_tree,
    output_tensor,
    stream_index,
    with_output,
)

Strength = float | torch.Tensor
#: Modules whose forward returns a new tensor no one else holds: a hook that sees it first may
#: overwrite it (exact types: a subclass may return something it keeps).
FRESH_OUTPUT = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


class Steerable(Protocol):
    """What a handle needs of a steering: its maps and gates, its λ range and its model check."""

    maps: dict[str, UnitMap]
    gates: dict[str, Gate]

    @property
    def gate_settings(self) -> GateSettings | None: ...

    @property
    def extrapolated_to(self) -> float | None: ...

    def check_strength(self, strength: Strength) -> None: ...

    def check_compatible(self, model: nn.Module) -> None: ...


def sees_output_first(module: nn.Module) -> bool:
    """Whether a forward hook registered now is the first to see the module's output: no hook
    of the module's and no global forward hook (torch keeps those in a private dict, read here
    alone; tests/test_hook_transport.py fails on a torch without it)."""
    return not (module._forward_hooks or torch_module._global_forward_hooks)


class ModuleHook:
    """The forward hook of one module: its map's transport at the strength that its sources
    make of the steering's λ. `traced` (a compiled model, actsteer.compiled): λ lives in one
    tensor on the module's device, updated in place, and the transport is plain torch ops."""

    def __init__(
        self,
        amap: UnitMap,
        support: str,
        module: nn.Module,
        sources: list[Source],
        traced: bool = False,
    ):
        self.transport = amap.transport(support, fused=not traced)
        self.sources = sources
        self.stream = stream_index(module)
        param = next(module.parameters(), None)
        self.on_cpu = param is None or param.device.type == "cpu"
        self.dtype = param.dtype if param is not None else torch.float32
        self.device = param.device if param is not None else torch.device("cpu")
        self.fresh_output = type(module) in FRESH_OUTPUT
        self.traced = traced
        self.lam = torch.zeros((), device=self.device if traced else None)
        self.parameters = self.transport.parameters(self.device, self.dtype) if traced else ()
        for source in sources if traced else ():
            if isinstance(source, Gated):  # placed now: traced code must not move them
                source.place(self.device)

    def set_strength(self, strength: torch.Tensor, first_hook: bool = False) -> object:
        """Take a new λ (a number or one per row) and return the forward hook to register:
        the fused kernel's own hook with this map bound where it serves (no sources, a CPU
        module), else this object.

        first_hook: no other forward hook sees the module's output before this one, so the
        kernel may overwrite a norm's fresh output instead of allocating another (a hook added
        later with prepend=True runs first and would see its tensor overwritten).
        """
        if self.traced:  # in place where the shape allows: compiled code reads this tensor
            lam = strength.float().to(self.device)
            if lam.shape == self.lam.shape:
                self.lam.copy_(lam)
            else:
                self.lam = lam.clone()
            return self
        self.lam = strength.float().cpu()
        if not self.on_cpu:
            return self
        if len(self.sources) == 1 and isinstance(self.sources[0], Gated):
            bound = self.gated_kernel_hook(self.sources[0])
        elif self.sources:
            return self
        else:
            in_place = first_hook and self.fresh_output
            bound = self.transport.kernel_hook(self.lam, self.dtype, in_place, self)
        return self if bound is None else bound

    def gated_kernel_hook(self, gate: Gated) -> object | None:
        """The fused kernel's forward hook computing `gate` and the transport at λ·g for
        outputs in the module's dtype (no Python frame per call but a context or prompt gate's
        prompt pass, which this hook serves with every output the kernel declines). None where
        no kernel serves."""
        kernel = self.transport.kernel
        if kernel is None or self.lam.ndim > 1:
            return None
        om1, beta, lo, hi = self.transport.parameters(torch.device("cpu"), self.dtype)
        kind = GATE_KINDS.index(gate.settings.kind)  # 0 token, 1 context, 2 prompt, as in C++
        weight, bias = gate.weight.cpu().contiguous(), gate.bias.cpu().reshape(1)
        lam = self.lam.contiguous()
        return kernel.gated_hook(om1, beta, lo, hi, weight, bias, lam, kind, gate, self)

    def __call__(self, module: nn.Module, args: object, output: object) -> object:
        a = output_tensor(output, self.stream)
        lam = self.lam
        for source in self.sources:
            made = source(lam, a)
            if made is None:
                return None
            lam = made
        if self.traced:
            return with_output(output, self.transport.traced(a, lam, self.parameters), self.stream)
        return with_output(output, self.transport(a, lam), self.stream)


def strength_sources(
    component: str,
    positions: str,
    phase: PassPhase | None,
    guidance: Guidance | None,
    both_halves: bool,
    gate: Gated | None = None,
) -> list[Source]:
    """The sources of a hook on a module of `component` (a pipeline's part, or "" for a model):
    positions, then the guidance half (a denoiser) or the prompts' encoding (a text encoder),
    then the gate."""
    sources: list[Source] = []
    if phase is not None and positions in ("prompt", "generated"):
        sources.append(InPhase(phase, prompt=positions == "prompt"))
    if positions == "last":
        sources.append(LastPosition())
    if guidance is not None and component.startswith("text_encoder"):
        sources.append(PromptEncoding(guidance, component))
    if guidance is not None and component in DENOISERS:
        sources.append(ConditionalHalf(guidance))
    if both_halves:
        sources.append(BothHalves())
    if gate is not None:
        sources.append(gate)
    return sources


class SteeringHandle:
    """Hooks of one steering on one model; change λ with set_strength, undo with remove.

    guidance: for diffusers pipelines under classifier-free guidance, steer only the
    "conditional" half (and only the prompts' text encoding) or "both" halves alike.
    gated: apply the steering's gates where it has some (False: exactly the ungated steering).
    `gates` holds each module's gate source (its `last` values show what was steered).
    """

    def __init__(
        self,
        steering: Steerable,
        model: nn.Module,
        strength: Strength,
        support: str,
        positions: str = "all",
        guidance: str = "conditional",
        gated: bool = True,
    ) -> None:
        check_choice(support, SUPPORTS, "support")
        check_choice(positions, POSITIONS, "positions")
        check_choice(guidance, GUIDANCE_MODES, "guidance")
        conditional = is_pipeline(model) and guidance == "conditional"
        self.guidance = Guidance(model) if conditional else None
        tree = module_tree(model)
        steering.check_compatible(tree)
        lookup = dict(tree.named_modules())
        self.steering = steering
        self.model = tree
        settings = steering.gate_settings if gated else None
        carried = settings is not None and settings.kind != "token"
        self.phase = PassPhase() if positions in ("prompt", "generated") or carried else None
        self.positions = positions
        self.both_halves = isinstance(tree, PipelineModules) and guidance == "both"
        self.gates = {
            name: Gated(gate, settings, self.phase)
            for name, gate in steering.gates.items()
            if settings is not None
        }
        self.support = support
        self.modules = {name: lookup[name] for name in steering.maps}
        self.traced = False
        self.hooks = self._module_hooks()
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.forward_hooks: dict[str, object] = {}  # what is registered on each module
        self.strength = torch.zeros(())
        self.reach = reach(steering.maps)  # for the far-λ checks, once: λ only scales it
        enter(self, tree)  # refuses the same steering applied twice
        try:
            self.set_strength(strength)
        except BaseException:
            leave(self, tree)
            raise

    def _module_hooks(self) -> dict[str, ModuleHook]:
        """One hook per steered module (traced ones for a compiled model, actsteer.compiled)."""
        return {
            name: ModuleHook(
                amap, self.support, self.modules[name],
                strength_sources(
                    name.split(".", 1)[0], self.positions, self.phase, self.guidance,
                    self.both_halves, self.gates.get(name),
                ),
                traced=self.traced,
            )
            for name, amap in self.steering.maps.items()
        }  # fmt: skip

    def _trace_if_compiled(self) -> None:
        """Switch to traced hooks once the model has compiled code (see actsteer.compiled),
        refusing what traced hooks cannot carry; the compiled code is reset to see them."""
        if self.traced or isinstance(self.model, PipelineModules):
            return
        if not has_compiled_code(self.model):
            return
        if self.phase is not None or self.guidance is not None or self.positions != "all":
            raise ActSteerError(
                "this model runs compiled code (torch.compile, or transformers' compiled "
                "generation with a static cache), whose traced hooks take positions='all' and "
                "token gates only: use those, or a model that is not compiled"
            )
        self._unhook()
        self.traced = True
        self.hooks = self._module_hooks()
        forget_compiled_code(self.model)

    def set_strength(self, strength: Strength) -> None:
        """Change λ. A scalar λ = 0 removes the hooks, so outputs are the untouched model's
        (traced hooks stay, at the identity, and take λ in place: see actsteer.compiled)."""
        self.steering.check_strength(strength)
        lam = torch.as_tensor(strength, dtype=torch.float32)
        if lam.ndim > 1:
            raise ActSteerError(f"strength must be a number or a (batch,) tensor, got {lam.shape}")
        self._trace_if_compiled()
        if self.traced and self.handles:
            check_far_strength(self.reach, lam, self.steering.extrapolated_to)
            self.strength = lam
            for hook in self.hooks.values():
                hook.set_strength(lam)
            return
        self._unhook()
        self.strength = lam
        if lam.ndim == 0 and lam.item() == 0.0 and not self.traced:
            guard_of(self.model).update()
            return
        check_far_strength(self.reach, lam, self.steering.extrapolated_to)
        if self.phase is not None:
            self.handles.append(
                self.model.register_forward_pre_hook(self.phase, with_kwargs=True, prepend=True)
            )
        if self.guidance is not None:
            self.handles += self.guidance.pre_hooks(self.model)
        for name, hook in self.hooks.items():
            module = self.modules[name]
            first = sees_output_first(module)
            self.forward_hooks[name] = hook.set_strength(lam, first_hook=first)
            self.handles.append(module.register_forward_hook(self.forward_hooks[name]))
        guard_of(self.model).update()  # one check of the model's output per forward

    def _unhook(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.forward_hooks = {}

    def remove(self) -> None:
        """Detach every hook: the model is exactly the untouched model again (compiled code
        traced with the hooks is reset: see actsteer.compiled)."""
        self._unhook()
        leave(self, self.model)
        if not isinstance(self.model, PipelineModules):
            forget_compiled_code(self.model)
