"""The steering file format: one .safetensors file, tensors per module plus JSON metadata.

Tensors: `<module>.omega`, `<module>.beta`, `<module>.support.<name>.lo|hi`, and for a gated
steering `<module>.gate.weight|bias` (format 2; format 1 files, without gates, still load). The
header's "actsteer" entry holds the JSON description (format version, method, model name and
fingerprint, modules, pooling, data, default strength, the gate's settings, library version) and
a checksum of the tensor bytes, so a damaged file is refused instead of steering with garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from actsteer.errors import ActSteerError
from actsteer.gates import Gate
from actsteer.maps import AffineMap
from actsteer.outputs import written_file
from actsteer.version import __version__

FORMAT_VERSION = 2
_KEY = "actsteer"


def _tensors(maps: dict[str, AffineMap], gates: dict[str, Gate]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, amap in maps.items():
        tensors[f"{name}.omega"] = amap.omega
        tensors[f"{name}.beta"] = amap.beta
        for support, (lo, hi) in amap.bounds.items():
            tensors[f"{name}.support.{support}.lo"] = lo
            tensors[f"{name}.support.{support}.hi"] = hi
    for name, gate in gates.items():
        tensors[f"{name}.gate.weight"] = gate.weight
        tensors[f"{name}.gate.bias"] = gate.bias
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].numpy().tobytes())
    return digest.hexdigest()


def write_steering(
    maps: dict[str, AffineMap],
    info: dict[str, Any],
    path: str | Path,
    gates: dict[str, Gate] | None = None,
) -> Path:
    """Write maps (and gates) and their JSON description to `path` (.safetensors), replacing
    it in one step, with the user's usual permissions; returns the path."""
    path = Path(path)
    tensors = _tensors(maps, gates or {})
    header = {
        **info,
        # format 2 only where it is needed: an ungated file stays readable by older versions
        "format_version": FORMAT_VERSION if gates else 1,
        "library_version": __version__,
        "modules": list(maps),
        "supports": sorted(next(iter(maps.values())).bounds) if maps else [],
        "checksum": _checksum(tensors),
    }
    with written_file(path) as scratch:  # never a half-written file at `path`
        save_file(tensors, str(scratch), metadata={_KEY: json.dumps(header)})
    return path


def read_steering(
    path: str | Path,
) -> tuple[dict[str, AffineMap], dict[str, Gate], dict[str, Any]]:
    """Maps, gates and JSON description of a steering file; anything missing, foreign or
    damaged is a clear error."""
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
    gates = {
        name: Gate(tensors[f"{name}.gate.weight"], tensors[f"{name}.gate.bias"])
        for name in maps
        if f"{name}.gate.weight" in tensors and f"{name}.gate.bias" in tensors
    }
    if bool(gates) != bool(info.get("gate")):
        raise ActSteerError(f"{damaged}: its gate tensors and its gate settings disagree")
    for key in ("format_version", "library_version", "modules", "supports", "checksum"):
        info.pop(key, None)
    return maps, gates, info
