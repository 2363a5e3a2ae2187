"""Steering artifacts: one .safetensors file, tensors per module plus JSON metadata.

Tensors: `<module>.omega`, `<module>.beta`, `<module>.support.<name>.lo|hi`. The header's
"actsteer" entry holds the JSON description (format version, method, model name and
fingerprint, modules, pooling, data, default strength, library version) and a checksum of the
tensor bytes, so a damaged file is refused instead of steering with garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from actsteer.errors import ActSteerError
from actsteer.maps import AffineMap
from actsteer.steer import Steering

FORMAT_VERSION = 1
_KEY = "actsteer"


def model_fingerprint(model: nn.Module) -> list[str]:
    """Every parameter's name and shape ("name:576x576"): identifies an architecture."""
    return [f"{name}:{'x'.join(map(str, p.shape))}" for name, p in model.named_parameters()]


def module_width(module: nn.Module) -> int | None:
    """Number of output units of a module, when its parameters tell."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear layer
        return module.weight.shape[1]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:
        return weight.shape[0]
    return None


def check_compatible(steering: Steering, model: nn.Module) -> None:
    """Refuse a steering fitted on another model, naming the first mismatch."""
    origin = steering.info.get("model", {}).get("name", "another model")
    lookup = dict(model.named_modules())
    for name, amap in steering.maps.items():
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
    expected = steering.info.get("model", {}).get("fingerprint")
    if expected is None:
        return
    actual = model_fingerprint(model)
    if expected != actual:
        ours, theirs = (
            dict(e.rsplit(":", 1) for e in expected),
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


def _tensors(steering: Steering) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, amap in steering.maps.items():
        tensors[f"{name}.omega"] = amap.omega
        tensors[f"{name}.beta"] = amap.beta
        for support, (lo, hi) in amap.bounds.items():
            tensors[f"{name}.support.{support}.lo"] = lo
            tensors[f"{name}.support.{support}.hi"] = hi
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].numpy().tobytes())
    return digest.hexdigest()


def save_steering(steering: Steering, path: str | Path) -> Path:
    """Write `steering` to `path` (.safetensors); returns the path."""
    from actsteer import __version__

    path = Path(path)
    tensors = _tensors(steering)
    header = {
        **steering.info,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "modules": steering.modules,
        "supports": sorted(next(iter(steering.maps.values())).bounds) if steering.maps else [],
        "checksum": _checksum(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={_KEY: json.dumps(header)})
    return path


def load_steering(path: str | Path) -> Steering:
    """Read a steering file; anything missing, foreign or damaged is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ActSteerError(f"no steering file at {str(path)!r}")
    damaged = f"{str(path)!r} is not a readable actsteer steering file"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ActSteerError(f"{damaged} (damaged or not safetensors): {err}") from None
    if _KEY not in metadata:
        raise ActSteerError(f"{damaged}: it is safetensors but has no actsteer metadata")
    try:
        info = json.loads(metadata[_KEY])
    except json.JSONDecodeError as err:
        raise ActSteerError(f"{damaged}: its metadata is not valid JSON ({err})") from None
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise ActSteerError(
            f"{str(path)!r} uses steering format {info['format_version']}, newer than this "
            f"actsteer reads ({FORMAT_VERSION}); upgrade actsteer"
        )
    if info.get("checksum") != _checksum(tensors):
        raise ActSteerError(f"{damaged}: its tensors do not match their checksum (file damaged)")
    maps = {}
    for name in info.get("modules", []):
        try:
            bounds = {
                s: (tensors[f"{name}.support.{s}.lo"], tensors[f"{name}.support.{s}.hi"])
                for s in info.get("supports", [])
            }
            maps[name] = AffineMap(tensors[f"{name}.omega"], tensors[f"{name}.beta"], bounds)
        except KeyError as err:
            raise ActSteerError(f"{damaged}: tensor {err.args[0]!r} is missing") from None
    if not maps:
        raise ActSteerError(f"{damaged}: it steers no module")
    for key in ("format_version", "library_version", "modules", "supports", "checksum"):
        info.pop(key, None)
    return Steering(maps, info)
