"""Does a steering fit a model? Fingerprints, module widths, and the check that names the
first mismatch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import nn

from actsteer.errors import ActSteerError
from actsteer.maps import UnitMap


def model_fingerprint(model: nn.Module) -> list[str]:
    """Every parameter's name and shape ("name:576x576"): identifies an architecture."""
    return [f"{name}:{'x'.join(map(str, p.shape))}" for name, p in model.named_parameters()]


def module_width(module: nn.Module) -> int | None:
    """Number of output units of a module, when its parameters tell."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear layer
        return cast(torch.Tensor, module.weight).shape[1]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:
        return weight.shape[0]
    return None


def check_compatible(
    maps: Mapping[str, UnitMap],
    model: nn.Module,
    origin: str = "",
    fingerprint: list[str] | None = None,
) -> None:
    """Refuse maps fitted on another model (`origin`, with its `fingerprint`), naming the
    first mismatch."""
    origin = origin or "another model"
    lookup = dict(model.named_modules())
    for name, amap in maps.items():
        if name not in lookup:
            raise ActSteerError(
                f"steering was fitted on {origin!r} and steers module {name!r}, "
                "which this model does not have; fit a steering for this model"
            )
        width = module_width(lookup[name])
        if width is not None and width != amap.dim:
            raise ActSteerError(
                f"steering was fitted on {origin!r}: module {name!r} has {amap.dim} units there "
                f"but {width} in this model; fit a steering for this model"
            )
    if fingerprint is None:
        return
    actual = model_fingerprint(model)
    if fingerprint != actual:
        ours, theirs = (
            dict(e.rsplit(":", 1) for e in fingerprint),
            dict(e.rsplit(":", 1) for e in actual),
        )
        for param, shape in ours.items():
            if theirs.get(param) != shape:
                found = theirs.get(param, "missing")
                raise ActSteerError(
                    f"steering was fitted on {origin!r}, whose parameter {param!r} has shape "
                    f"{shape}; in this model it is {found}; fit a steering for this model"
                )
        extra = next(p for p in theirs if p not in ours)
        raise ActSteerError(
            f"steering was fitted on {origin!r}, which has no parameter {extra!r}; "
            "fit a steering for this model"
        )
