"""Folding maps into the weights of the modules that produce the activations they move.

With support "all" and a fixed λ the map T_λ(a) = ω̃ ⊙ a + c (ω̃, c = AffineMap.at(λ)) is
affine, so it folds into the module that produced `a`:

- LayerNorm with bias, and GroupNorm (a diffusers UNet's norms, one map per channel):
  γ' = ω̃γ, δ' = ω̃δ + c.
- Linear (or a transposed linear such as GPT-2's Conv1D) output: W' = diag(ω̃)W, b' = ω̃b + c.
- RMSNorm: the scale takes ω̃ (γ' = ω̃γ, or for a (1 + γ) norm γ' = ω̃(1 + γ) − 1); the shift c
  moves into the biases of the Linear layers reading the norm, since W(h + c) = Wh + Wc. Where
  those layers have no bias, the config flag that makes stock transformers create them is set
  and zero biases are added wherever that flag adds them.
- A decoder block's output (the residual stream, the "residual" preset): only a pure shift
  (ω̃ = 1: Mean-AcT, ActAdd, ITI-c) folds, into the bias of the Linear layer whose output the
  block adds last to the stream (h + W x + c = h + (W x + c)). A scale cannot: the stream is
  the sum of every earlier block's writes and has no weight of its own.

A joint map (joint-act) at a fixed λ is T_λ(a) = M a + c with a full matrix M
(`JointMap.matrix`): into a Linear output W' = MW, b' = Mb + c; into the Linear layers reading
a norm W' = WM, b' = Wc + b (the norm itself keeps its weights); never into a block's output.

What each architecture needs (norm readers, (1 + γ) offset, bias flags, transposed layers)
comes from `actsteer.families`. A fold is recorded in the model's config (`actsteer_folded`, saved
with the checkpoint), so that the same steering is not applied or folded a second time. Every
fold checks itself: the folded model must reproduce the
hooked model's outputs on a probe input (an LM's logits on a few tokens; for a pipeline, each
folded module on random input), or the weights are restored and the fold refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
from torch import nn

from actsteer.errors import ActSteerError
from actsteer.families import Family, family_of
from actsteer.maps import AffineMap, JointMap, UnitMap
from actsteer.tree import is_pipeline, module_tree

#: Largest |folded − hooked| on the probe, relative to the largest |hooked| output (≥ 1).
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
HALF_TOLERANCE = 5e-2  # float16, bfloat16


#: The config attribute listing the steerings folded into a model: {digest, method, strength,
#: model} each.
FOLDED = "actsteer_folded"
#: What to do with a steering that does not fold.
HOOKS_INSTEAD = "keep the steering as hooks (steering.applied, actsteer serve)"


def folded_records(model: nn.Module) -> list[dict[str, Any]]:
    """The steerings folded into `model`'s weights, as its config records them ([] if none)."""
    records = getattr(getattr(model, "config", None), FOLDED, None)
    return list(records) if isinstance(records, list) else []


def _record_fold(model: nn.Module, record: dict[str, Any]) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, FOLDED, [*folded_records(model), record])


def _is_rms_norm(module: nn.Module) -> bool:
    return "rmsnorm" in type(module).__name__.lower()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or _is_rms_norm(module)


def check_foldable(amap: UnitMap) -> None:
    """Refuse a map that is not affine over the whole activation (a quantile map)."""
    if not isinstance(amap, AffineMap | JointMap):
        raise ActSteerError(
            f"folding into weights needs an affine map (ω ⊙ a + β, or a joint M a + c) and this "
            f"steering's maps are {amap.kind} (piecewise linear per unit, not affine); "
            + HOOKS_INSTEAD
        )


class _Edits:
    """The weights, biases and config flags a fold changes, kept so it can be undone (only what
    changes: a reader's bias, not its weight)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tensors: dict[tuple[nn.Module, str], torch.Tensor | None] = {}
        self.flags: dict[str, Any] = {}

    def remember(self, module: nn.Module, *names: str) -> None:
        """Keep the current value of the module's parameters `names` (None: it has none)."""
        for name in names:
            if (module, name) not in self.tensors:
                value = getattr(module, name, None)
                self.tensors[module, name] = None if value is None else value.data.clone()

    def set_flag(self, flag: str) -> None:
        self.flags.setdefault(flag, getattr(self.model.config, flag))
        setattr(self.model.config, flag, True)

    def undo(self) -> None:
        for (module, name), value in self.tensors.items():
            if value is None:
                setattr(module, name, None)
            else:
                getattr(module, name).data = value
        for flag, value in self.flags.items():
            setattr(self.model.config, flag, value)


class _Folder:
    """Folds maps into one model's weights, recording every edit."""

    def __init__(self, tree: nn.Module, family: Family) -> None:
        self.tree, self.family = tree, family
        self.lookup = dict(tree.named_modules())
        self.edits = _Edits(tree)

    def out_first(self, module: nn.Module) -> torch.Tensor:
        """A linear layer's weight as (out, in), whichever way the layer stores it."""
        transposed = type(module).__name__ in self.family.transposed_linears
        weight = cast(torch.Tensor, module.weight)
        return weight.T if transposed else weight

    def is_linear(self, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.Linear) or type(module).__name__ in self.family.transposed_linears
        )

    def is_block(self, name: str) -> bool:
        """Is `name` a decoder block, whose output is the residual stream?"""
        pattern = self.family.presets.get("residual")
        return pattern is not None and re.fullmatch(pattern, name) is not None

    def fold_residual(self, name: str, amap: AffineMap, strength: float) -> None:
        """A shift of a block's output into the bias of the block's last residual writer."""
        scale, shift = amap.at(strength)
        scaled = int((scale != 1).sum())
        if scaled:
            raise ActSteerError(
                f"cannot fold the map of {name!r}: it scales {scaled} unit(s) of the residual "
                "stream (ω ≠ 1), which is the sum of every earlier block's writes and has no "
                "weight of its own; only a pure shift (ω = 1: mean-act, actadd, iti-c) of a "
                "block's output folds. To fold Linear-AcT steer linear outputs (attn-out, "
                "mlp-out) or norms (post-attn-ln, layernorms), or keep the steering as hooks"
            )
        writer = self.family.residual_writer
        if writer is None:
            raise ActSteerError(
                f"the shift of {name!r} cannot be folded: in the {self.family.name!r} family a "
                "block's last write to the residual stream comes out of a norm without a bias; "
                "keep the steering as hooks, or steer other modules"
            )
        if shift.any():
            target = f"{name}.{writer}"
            linear = self.lookup[target]
            self.add_bias(target, linear, shift.to(next(linear.parameters()).device, torch.float64))

    def fold(self, name: str, amap: UnitMap, strength: float) -> None:
        if isinstance(amap, JointMap):
            self.fold_joint(name, amap, strength)
            return
        assert isinstance(amap, AffineMap)  # check_foldable refused the rest
        if self.is_block(name):
            self.fold_residual(name, amap, strength)
            return
        module = self.lookup[name]
        if getattr(module, "weight", None) is None:
            raise ActSteerError(
                f"cannot fold into {name!r} ({type(module).__name__}): it has no weights; "
                "keep the steering as hooks for this module"
            )
        self.edits.remember(module, "weight", "bias")
        weight = module.weight
        scale, shift = (t.to(weight.device, torch.float64) for t in amap.at(strength))
        if isinstance(module, nn.LayerNorm | nn.GroupNorm):
            weight.data = (scale * weight.double()).to(weight.dtype)
            if module.bias is None:
                if shift.any():
                    raise ActSteerError(f"{name!r} has no bias to fold the shift β into")
                return
            module.bias.data = (scale * module.bias.double() + shift).to(weight.dtype)
        elif _is_rms_norm(module):
            offset = self.family.norm_offset  # the norm computes x̂ · (offset + γ)
            weight.data = (scale * (offset + weight.double()) - offset).to(weight.dtype)
            if shift.any():
                for reader in self.readers(name):
                    linear = self.lookup[reader]
                    self.add_bias(reader, linear, self.out_first(linear).double() @ shift)
        elif self.is_linear(module):
            out_first = self.out_first(module)
            out_first.data.copy_((scale.unsqueeze(1) * out_first.double()).to(weight.dtype))
            if module.bias is not None:
                module.bias.data = (scale * module.bias.double()).to(weight.dtype)
            if shift.any():
                self.add_bias(name, module, shift)
        else:
            raise ActSteerError(
                f"cannot fold into {name!r} ({type(module).__name__}): folding covers LayerNorm, "
                "GroupNorm, RMSNorm and Linear outputs; keep the steering as hooks for other "
                "modules"
            )

    def fold_joint(self, name: str, jmap: JointMap, strength: float) -> None:
        """M, c of a joint map into the Linear layer producing `name`, or into those reading
        the norm `name`."""
        module = self.lookup[name]
        if self.is_block(name) or not (self.is_linear(module) or _is_norm(module)):
            raise ActSteerError(
                f"cannot fold the joint map of {name!r} ({type(module).__name__}): a matrix "
                "across units folds into a Linear layer's output or into the Linear layers "
                "reading a norm (attn-out, mlp-out, post-attn-ln, layernorms); keep the "
                "steering as hooks"
            )
        matrix, shift = jmap.matrix(strength)
        if self.is_linear(module):
            self.edits.remember(module, "weight", "bias")
            out_first = self.out_first(module)
            matrix = matrix.to(out_first.device)
            out_first.data.copy_((matrix @ out_first.double()).to(out_first.dtype))
            if module.bias is not None:
                bias = matrix @ module.bias.double()
                module.bias.data = bias.to(module.bias.dtype)
            if shift.any():
                self.add_bias(name, module, shift.to(out_first.device))
            return
        for reader in self.readers(name):
            linear = self.lookup[reader]
            self.edits.remember(linear, "weight", "bias")
            out_first = self.out_first(linear)
            weight = out_first.double()
            out_first.data.copy_((weight @ matrix.to(weight.device)).to(out_first.dtype))
            if shift.any():
                self.add_bias(reader, linear, weight @ shift.to(weight.device))

    def readers(self, name: str) -> list[str]:
        block, _, leaf = name.rpartition(".")
        readers = self.family.norm_readers.get(leaf)
        if readers is None:
            raise ActSteerError(
                f"the shift β of {name!r} cannot be folded: its output is not read only by "
                "Linear layers that can take a bias (for example it is added to the residual "
                "stream or feeds the LM head); steer other modules, or keep the steering as hooks"
            )
        return [f"{block}.{reader}" for reader in readers]

    def add_bias(self, name: str, module: nn.Module, shift: torch.Tensor) -> None:
        self.edits.remember(module, "bias")
        if module.bias is None:
            self.enable_bias_flag(name)
        bias = cast(torch.Tensor, module.bias)  # created by enable_bias_flag when missing
        bias.data += shift.to(bias.dtype)

    def enable_bias_flag(self, name: str) -> None:
        """Give `name` a bias by setting the config flag that creates it (zero biases
        everywhere the flag adds one)."""
        config = getattr(self.tree, "config", None)
        for flag, pattern in self.family.bias_flags.items():
            if re.fullmatch(pattern, name) and hasattr(config, flag):
                self.edits.set_flag(flag)
                for other, module in self.lookup.items():
                    if re.fullmatch(pattern, other) and module.bias is None:
                        self.edits.remember(module, "bias")
                        weight = module.weight
                        module.bias = nn.Parameter(
                            torch.zeros(
                                module.out_features, dtype=weight.dtype, device=weight.device
                            )
                        )
                return
        raise ActSteerError(
            f"folding needs a bias on {name!r}, which this architecture builds without one and "
            "offers no config flag for; steer other modules or keep the steering as hooks"
        )


def _probe(model: Any, tree: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """Outputs to compare hooked and folded: an LM's logits on a few fixed tokens, or each named
    module of a pipeline run on fixed random input of its width."""
    with torch.no_grad():
        if not is_pipeline(model):
            device = next(tree.parameters()).device
            vocab = getattr(tree.config, "vocab_size", 2)
            ids = (torch.arange(1, 9, device=device) % vocab).unsqueeze(0)
            return [tree(input_ids=ids).logits.float()]
        generator = torch.Generator().manual_seed(0)
        lookup = dict(tree.named_modules())
        outputs = []
        for name in names:
            module = lookup[name]
            weight = module.weight
            if isinstance(module, nn.GroupNorm):
                shape: tuple[int, ...] = (2, module.num_channels, 3, 3)
            elif isinstance(module, nn.Linear):
                shape = (2, module.in_features)
            else:
                shape = (2, weight.shape[0])
            x = torch.randn(shape, generator=generator).to(weight.device, weight.dtype)
            outputs.append(module(x).float())
        return outputs


def _agree(hooked: list[torch.Tensor], folded: list[torch.Tensor], dtype: torch.dtype) -> float:
    """The worst relative gap between hooked and folded probe outputs, or 0 within tolerance."""
    tolerance = TOLERANCE.get(dtype, HALF_TOLERANCE)
    worst = 0.0
    for a, b in zip(hooked, folded, strict=True):
        gap = ((a - b).abs().max() / a.abs().max().clamp(min=1)).item()
        if not gap <= tolerance:  # NaN too
            worst = max(worst, gap) if gap == gap else float("inf")
    return worst


def fold_maps(
    maps: Mapping[str, UnitMap],
    model: Any,
    strength: float,
    hooked: Callable[[], AbstractContextManager[Any]],
    record: dict[str, Any],
) -> None:
    """Fold `maps` at `strength` (support "all") into the weights of `model` in place, and add
    `record` to the model config's list of folded steerings.

    `hooked()` is a context in which the model runs with the same maps as hooks: the probe's
    reference. When the folded model disagrees with it the weights are restored and the fold
    refused, naming the gap.
    """
    for amap in maps.values():
        check_foldable(amap)
    tree = module_tree(model)
    family = family_of(tree, "folding")
    names = list(maps)
    with hooked():
        expected = _probe(model, tree, names)
    folder = _Folder(tree, family)
    # Norms first: their shifts land in reader biases that the readers' own maps then scale.
    # Blocks last: their shifts land in a writer's bias after its own map has scaled it.
    order = sorted(
        names, key=lambda n: 2 if folder.is_block(n) else int(not _is_rms_norm(folder.lookup[n]))
    )
    try:
        with torch.no_grad():
            for name in order:
                folder.fold(name, maps[name], strength)
        dtype = next(tree.parameters()).dtype
        gap = _agree(expected, _probe(model, tree, names), dtype)
        if gap:
            raise ActSteerError(
                f"the folded weights do not reproduce the hooked model on a probe input "
                f"(relative gap {gap:.2g}, family {family.name!r}): the weights are left "
                "unchanged; keep the steering as hooks, and report this model type"
            )
    except BaseException:
        folder.edits.undo()
        raise
    _record_fold(tree, record)
