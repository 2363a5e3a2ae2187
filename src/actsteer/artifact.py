"""The steering file format: one .safetensors file, tensors per module plus JSON metadata.

Tensors: `<module>.omega`, `<module>.beta` (affine maps), `<module>.knots.x|y` (quantile maps)
or `<module>.joint.mean|basis|core|delta` (joint maps; both format 3),
`<module>.support.<name>.lo|hi`, and for a gated steering `<module>.gate.weight|bias` (format
2). Each file has the lowest format that holds it, so older versions read what they can;
format 1 and 2 files load. The
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
from actsteer.maps import MAP_TENSORS, AffineMap, UnitMap, from_tensors
from actsteer.outputs import written_file
from actsteer.version import __version__

FORMAT_VERSION = 3
_KEY = "actsteer"


def _tensors(maps: dict[str, UnitMap], gates: dict[str, Gate]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, amap in maps.items():
        for key, tensor in amap.tensors().items():
            tensors[f"{name}.{key}"] = tensor
        for support, (lo, hi) in amap.bounds.items():
            tensors[f"{name}.support.{support}.lo"] = lo
            tensors[f"{name}.support.{support}.hi"] = hi
    for name, gate in gates.items():
        tensors[f"{name}.gate.weight"] = gate.weight
        tensors[f"{name}.gate.bias"] = gate.bias
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def _lowest_format(maps: dict[str, UnitMap], gates: dict[str, Gate] | None) -> int:
    """3 with maps that are not affine, 2 with gates, else 1 (readable by older versions)."""
    if any(not isinstance(amap, AffineMap) for amap in maps.values()):
        return FORMAT_VERSION
    return 2 if gates else 1


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].numpy().tobytes())
    return digest.hexdigest()


def write_steering(
    maps: dict[str, UnitMap],
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
        "format_version": _lowest_format(maps, gates),
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
) -> tuple[dict[str, UnitMap], dict[str, Gate], dict[str, Any]]:
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
        except KeyError as err:
            raise ActSteerError(f"{damaged}: tensor {err.args[0]!r} is missing") from None
        own = {key: tensors[f"{name}.{key}"] for key in MAP_TENSORS if f"{name}.{key}" in tensors}
        try:
            maps[name] = from_tensors(own, bounds)
        except KeyError as err:
            raise ActSteerError(f"{damaged}: tensor '{name}.{err.args[0]}' is missing") from None
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
