"""actsteer: steer language and diffusion models by transporting activations (AcT).

model, tok = actsteer.load_model("smollm2-135m")
steering = actsteer.fit(model, tok, source=..., target=..., modules="post-attn-ln")
with steering.applied(model, strength=0.5):
    model.generate(...)
steering = actsteer.calibrate(steering, model, tok, budget=1.0).steering  # λ: ΔPPL ≤ +1

The names below are imported when first used, so `import actsteer` (and the CLI's --help) does
not pay for torch, transformers, diffusers or the evaluation stack up front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from actsteer.errors import ActSteerError
from actsteer.version import __version__

if TYPE_CHECKING:
    from actsteer.calibration import CalibrationResult, calibrate
    from actsteer.diffusion import load_pipeline
    from actsteer.fitting import fit
    from actsteer.gate_calibration import calibrate_gate
    from actsteer.gates import GateSettings
    from actsteer.models import load_model
    from actsteer.modes import Denoising, EndToEnd, Independent, Sequential
    from actsteer.steering import Steering, SteeringInfo, steered

#: public name -> the module that defines it
_LAZY = {
    "CalibrationResult": "actsteer.calibration",
    "calibrate": "actsteer.calibration",
    "calibrate_gate": "actsteer.gate_calibration",
    "GateSettings": "actsteer.gates",
    "load_pipeline": "actsteer.diffusion",
    "fit": "actsteer.fitting",
    "load_model": "actsteer.models",
    "Independent": "actsteer.modes",
    "Sequential": "actsteer.modes",
    "EndToEnd": "actsteer.modes",
    "Denoising": "actsteer.modes",
    "Steering": "actsteer.steering",
    "SteeringInfo": "actsteer.steering",
    "steered": "actsteer.steering",
}

__all__ = [
    "ActSteerError",
    "CalibrationResult",
    "Denoising",
    "EndToEnd",
    "GateSettings",
    "Independent",
    "Sequential",
    "Steering",
    "SteeringInfo",
    "__version__",
    "calibrate",
    "calibrate_gate",
    "fit",
    "load_model",
    "load_pipeline",
    "steered",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'actsteer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
