"""Folding a steering into the model's weights, and exporting the steered checkpoint.

With support "all" and a fixed λ the map T_λ(a) = ω̃ ⊙ a + c (ω̃ = 1 + λ(ω − 1), c = λβ) is
affine, so it folds into the module that produced `a`:

- LayerNorm with bias, and GroupNorm (a diffusers UNet's norms, one map per channel):
  γ' = ω̃γ, δ' = ω̃δ + c.
- Linear (or GPT-2's Conv1D) output: W' = diag(ω̃)W, b' = ω̃b + c.
- RMSNorm: the scale takes ω̃ (γ' = ω̃γ, or for Gemma's (1 + γ) form γ' = ω̃(1 + γ) − 1); the
  shift c moves into the biases of the Linear layers reading the norm, since W(h + c) = Wh + Wc.
  Where those layers have no bias, the config flag that makes stock transformers create them
  (attention_bias, mlp_bias) is set and zero biases are added wherever that flag adds them.

The folded model runs at the plain model's speed; `export` writes it as a checkpoint that stock
`transformers` (and any engine that reads its checkpoints) loads without actsteer. A diffusers
pipeline folds too: its components are edited in place, so both halves of a classifier-free-
guidance batch and the negative prompts' encoding are steered (hooks with `cfg="both"`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from actsteer.capture import model_family
from actsteer.errors import ActSteerError
from actsteer.steer import Steering

_LAYER = r"(?:.*\.)?layers\.\d+\."
#: Config flags that make transformers build biases, with the modules each flag gives one.
BIAS_FLAGS = {
    "attention_bias": _LAYER + r"self_attn\.[qkvo]_proj",
    "mlp_bias": _LAYER + r"mlp\.(?:gate|up|down)_proj",
}
#: Per family: norms whose output is read by Linear layers (relative names in the same block).
NORM_READERS = {
    "llama": {
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    },
    "gemma": {
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    },
}


def _is_rms_norm(module: nn.Module) -> bool:
    return "rmsnorm" in type(module).__name__.lower()


def _linear_weight_out_first(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): Linear stores it so, GPT-2's Conv1D transposed."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def _enable_bias_flag(model: nn.Module, name: str) -> None:
    """Give `name` a bias by setting the config flag that creates it (zero biases everywhere)."""
    for flag, pattern in BIAS_FLAGS.items():
        if re.fullmatch(pattern, name) and hasattr(model.config, flag):
            setattr(model.config, flag, True)
            for other, module in model.named_modules():
                if re.fullmatch(pattern, other) and module.bias is None:
                    weight = module.weight
                    module.bias = nn.Parameter(
                        torch.zeros(module.out_features, dtype=weight.dtype, device=weight.device)
                    )
            return
    raise ActSteerError(
        f"folding needs a bias on {name!r}, which this architecture builds without one and "
        "offers no config flag for; steer other modules or keep the steering as hooks"
    )


def _add_bias(model: nn.Module, name: str, module: nn.Module, shift: torch.Tensor) -> None:
    if module.bias is None:
        _enable_bias_flag(model, name)
    module.bias.data += shift.to(module.bias.dtype)


def _norm_readers(model: nn.Module, name: str) -> list[str]:
    family = model_family(model) or ""
    block, _, leaf = name.rpartition(".")
    readers = NORM_READERS.get(family, {}).get(leaf)
    if readers is None:
        raise ActSteerError(
            f"the shift β of {name!r} cannot be folded: its output is not read only by Linear "
            "layers that can take a bias (for example it is added to the residual stream or "
            "feeds the LM head); steer other modules, or keep the steering as hooks"
        )
    return [f"{block}.{reader}" for reader in readers]


def fold(
    steering: Steering, model: nn.Module, strength: float = 1.0, support: str | None = None
) -> nn.Module:
    """Edit the weights of `model` (a causal LM or a diffusers pipeline) in place so it computes
    the steered model; returns it.

    Only the unbounded support "all" is affine and folds exactly: pass support="all" when the
    steering's default support is bounded.
    """
    support = support or steering.default_support
    if support != "all":
        raise ActSteerError(
            f"support {support!r} only transports activations inside per-unit bounds, which is "
            "not affine and cannot be folded into weights exactly; fold with support='all' "
            "(every activation is transported) or keep the steering as hooks"
        )
    if not isinstance(strength, int | float):
        raise ActSteerError("folding takes one number as strength, not a per-row tensor")
    steering.check_strength(strength)
    from actsteer.artifact import check_compatible
    from actsteer.diffusion import is_pipeline, module_tree

    tree = module_tree(model)
    check_compatible(steering, tree)
    lookup = dict(tree.named_modules())
    gemma = not is_pipeline(model) and model_family(model) == "gemma"
    # Norms first: their shifts land in reader biases that the readers' own maps then scale.
    order = sorted(steering.maps, key=lambda n: not _is_rms_norm(lookup[n]))
    with torch.no_grad():
        for name in order:
            module, amap = lookup[name], steering.maps[name]
            if getattr(module, "weight", None) is None:
                raise ActSteerError(
                    f"cannot fold into {name!r} ({type(module).__name__}): it has no weights; "
                    "keep the steering as hooks for this module"
                )
            scale = (1 + strength * (amap.omega - 1)).to(module.weight.device, torch.float64)
            shift = (strength * amap.beta).to(module.weight.device, torch.float64)
            _fold_one(tree, name, module, scale, shift, gemma)
    return model


def _fold_one(
    model: nn.Module,
    name: str,
    module: nn.Module,
    scale: torch.Tensor,
    shift: torch.Tensor,
    gemma: bool,
) -> None:
    weight = module.weight
    if isinstance(module, nn.LayerNorm | nn.GroupNorm):
        weight.data = (scale * weight.double()).to(weight.dtype)
        if module.bias is None:
            if shift.any():
                raise ActSteerError(f"{name!r} has no bias to fold the shift β into")
            return
        module.bias.data = (scale * module.bias.double() + shift).to(weight.dtype)
    elif _is_rms_norm(module):
        if gemma:  # Gemma computes x̂ · (1 + γ)
            weight.data = (scale * (1 + weight.double()) - 1).to(weight.dtype)
        else:
            weight.data = (scale * weight.double()).to(weight.dtype)
        if shift.any():
            lookup = dict(model.named_modules())
            for reader in _norm_readers(model, name):
                linear = lookup[reader]
                _add_bias(model, reader, linear, _linear_weight_out_first(linear).double() @ shift)
    elif isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        out_first = _linear_weight_out_first(module)
        out_first.data.copy_((scale.unsqueeze(1) * out_first.double()).to(weight.dtype))
        if module.bias is not None:
            module.bias.data = (scale * module.bias.double()).to(weight.dtype)
        if shift.any():
            _add_bias(model, name, module, shift)
    else:
        raise ActSteerError(
            f"cannot fold into {name!r} ({type(module).__name__}): folding covers LayerNorm, "
            "GroupNorm, RMSNorm and Linear outputs; keep the steering as hooks for other modules"
        )


def export(
    steering: Steering,
    model: nn.Module,
    tokenizer,
    directory: str | Path,
    strength: float = 1.0,
    support: str | None = None,
) -> Path:
    """Fold the steering into `model` and save a stock transformers checkpoint to `directory`."""
    directory = Path(directory)
    fold(steering, model, strength, support)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    note = {
        "folded_by": "actsteer",
        "method": steering.method,
        "strength": strength,
        "support": "all",
        "modules": steering.modules,
        "model": steering.info.get("model", {}).get("name"),
        "data": steering.info.get("data"),
    }
    (directory / "actsteer_fold.json").write_text(json.dumps(note, indent=2))
    return directory
